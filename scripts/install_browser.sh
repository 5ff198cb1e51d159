#!/bin/sh
# Headless Chromium (Debian's package) and fonts for tests/test_app.py's browser test. Run as root (CI).
# Playwright drives this system browser: never run `playwright install` (it downloads one).
set -eu
if [ "$(id -u)" -ne 0 ]; then
    echo "note: not root, so chromium is not installed; the browser test will skip (sudo $0 to install)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core fonts-noto-color-emoji
chromium --version 2>/dev/null || true
