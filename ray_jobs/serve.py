"""Ray job: `synthpert serve`. The OpenAI-compatible Ray Serve endpoint (base model + LoRA adapters).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/serve.py [ARGS of `synthpert serve --help`]
"""

from _entry import run

if __name__ == "__main__":  # spawned helpers (vLLM, multiprocessing) re-import __main__
    run("serve")
