#!/usr/bin/env bash
# Create .venv with mlx-qwen35 installed (extras in $1, e.g. "test"), plus OpenBLAS for MLX's CPU backend
# on Debian/Ubuntu when we are allowed to install it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null && ! ldconfig -p | grep -q libopenblas.so.0; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null
  else
    echo "note: install libopenblas0-pthread for a fast CPU BLAS (sudo apt-get install libopenblas0-pthread)" >&2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
extras=${1:+[$1]}
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
