"""Ray job: `synthpert generate`. Teacher traces + judge grades -> the SFT dataset.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/generate.py [ARGS of `synthpert generate --help`]
"""

from _entry import run

if __name__ == "__main__":  # spawned helpers (vLLM, multiprocessing) re-import __main__
    run("generate")
