#!/usr/bin/env bash
# Headless Chromium for the HTML page tests (tests/headless_browser.py), from Debian's
# packages. Idempotent: does nothing when `chromium` is already on PATH. Needs root
# (CI runs as root); elsewhere it says what to run and exits 0, and the browser tests
# skip (they fail instead when CI=true, so CI cannot pass without the browser).
set -u
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: chromium not found; install it (Debian: apt-get install chromium)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null \
    || echo "install_chromium: apt-get install chromium failed" >&2
exit 0
