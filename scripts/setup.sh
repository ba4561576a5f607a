#!/usr/bin/env bash
# Sets up .venv with torch (the CUDA build: its headers compile fusedlr's CUDA kernels too) and
# builds fusedlr in place. Safe to rerun: what is there already is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "torch>=2.6" numpy pytest expecttest ninja matplotlib
# the frameworks tests/test_frameworks.py trains in (versions tested with torch 2.14.1)
.venv/bin/python -m pip install -q "transformers==5.24.0" "accelerate==1.15.0" "lightning==2.6.6" "timm==1.0.31"
.venv/bin/python -m pip install -q --no-build-isolation -e .
.venv/bin/python -c "import torch, fusedlr; print('fusedlr', fusedlr.__version__, 'on torch', torch.__version__, \
'(CUDA kernels built)' if fusedlr.cuda_built() else '(CPU kernels only)')"
