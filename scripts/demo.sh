#!/usr/bin/env bash
# Set up (if needed) and run lowbit's main job on the bundled default model (SmolLM2-135M):
# quantize it with a few recipes and print quality, size and speed beside FP32.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lowbit demo "$@"
