"""Ray job: `synthpert baseline`. Non-LLM baselines (retrieval, ...) with the official metrics.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/baseline.py [ARGS of `synthpert baseline --help`]
"""

from _entry import run

if __name__ == "__main__":  # spawned helpers (vLLM, multiprocessing) re-import __main__
    run("baseline")
