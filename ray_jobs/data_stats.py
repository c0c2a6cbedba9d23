"""Ray job: `synthpert data stats`. PerturbQA counts per cell line / split / class.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/data_stats.py [ARGS of `synthpert data stats --help`]
"""

from _entry import run

if __name__ == "__main__":  # spawned helpers (vLLM, multiprocessing) re-import __main__
    run("data", "stats")
