#!/usr/bin/env bash
# Create .venv with mlx-qwen35 installed (extras in $1, e.g. "test"), plus OpenBLAS for MLX's CPU backend and
# a C compiler for its matrix-vector forwarding (mlx_qwen35/platform.py) on Debian/Ubuntu when we are allowed
# to install them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null; then
  missing=""
  ldconfig -p | grep -q libopenblas.so.0 || missing=" libopenblas0-pthread"
  command -v cc >/dev/null || missing="$missing gcc libc6-dev"
  if [ -n "$missing" ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  elif [ -n "$missing" ]; then
    echo "note: install$missing for a fast CPU backend (sudo apt-get install$missing)" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
extras=${1:+[$1]}
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
