#!/usr/bin/env bash
# Set up (see setup.sh) and run the main job: generate from a prompt with the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mlx-qwen35 generate "$@"
