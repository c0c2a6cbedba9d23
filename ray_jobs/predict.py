"""Ray job: `synthpert predict`. One model (base, or a LoRA adapter folder / registry URI) over the split's evaluation tuples.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/predict.py [ARGS of `synthpert predict --help`]
"""

from _entry import run

if __name__ == "__main__":  # spawned helpers (vLLM, multiprocessing) re-import __main__
    run("predict")
