#!/usr/bin/env bash
# Set up (if needed) and run lowbit's main job on the bundled default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lowbit explain fp8_e4m3 -- -0.5 0.3 1.2 -2.1
.venv/bin/lowbit explain int4 --granularity group:2 -- -0.5 0.3 1.2 -2.1
