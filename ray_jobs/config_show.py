"""Ray job: `synthpert config show`. Print the resolved config as the cluster sees it (files, --set overrides).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env ray_jobs/runtime_env.yaml -- python ray_jobs/config_show.py [ARGS of `synthpert config show --help`]
"""

from _entry import run

if __name__ == "__main__":  # spawned helpers (vLLM, multiprocessing) re-import __main__
    run("config", "show")
