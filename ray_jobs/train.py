"""Ray job: `synthpert train`. LoRA fine-tuning with Ray Train + DeepSpeed ZeRO.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/train.py [ARGS of `synthpert train --help`]
"""

from _entry import run

if __name__ == "__main__":  # spawned helpers (vLLM, multiprocessing) re-import __main__
    run("train")
