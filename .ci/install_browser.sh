#!/bin/sh
# Installs Debian's chromium for the headless-browser tests (tests/test_visualize.py), which
# fail in CI without it. Idempotent: does nothing when chromium is already on PATH.
set -eu
command -v chromium >/dev/null 2>&1 && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null 2>&1 || { echo "install_browser.sh: chromium is still missing" >&2; exit 1; }
