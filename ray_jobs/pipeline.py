"""Ray job: `synthpert pipeline`. The whole pipeline: data -> traces -> judge -> train cot/raw -> evaluate -> register -> report.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/pipeline.py [ARGS of `synthpert pipeline --help`]
"""

from _entry import run

if __name__ == "__main__":  # spawned helpers (vLLM, multiprocessing) re-import __main__
    run("pipeline")
