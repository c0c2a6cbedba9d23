"""Ray job: `synthpert evaluate`. Official metrics for a predictions file, or LLM evaluation against the endpoint.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/evaluate.py [ARGS of `synthpert evaluate --help`]
"""

from _entry import run

if __name__ == "__main__":  # spawned helpers (vLLM, multiprocessing) re-import __main__
    run("evaluate")
