#!/usr/bin/env bash
# Set up lowbit on a fresh machine: a virtual environment in .venv, the CPU wheel of
# torch 2.13.0 first (a looser requirement could pull a multi-GB CUDA build), then lowbit
# with its extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
fi
# distributed: Ray, for the sweeps on Ray (bench/sensitivity --ray) and their tests
.venv/bin/python -m pip install -q -e ".[models,report,dev,bench,onnx,distributed]"
# compressed-tensors (lowbit export --to compressed-tensors) asks for a newer torch than the
# pinned CPU wheel satisfies on paper: install it without letting pip touch torch
.venv/bin/python -m pip install -q --no-deps "compressed-tensors>=0.20"
.venv/bin/python -m pip install -q loguru psutil pydantic
