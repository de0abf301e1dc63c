#!/usr/bin/env bash
# Debian's Chromium + ChromeDriver for tests/tools/test_web_demo.py (playwright drives /usr/bin/chromium;
# it never downloads a browser). Idempotent: installs only what is missing. Needs root (or sudo).
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -eq 0 ]; then
    echo "chromium and chromedriver already installed: $(chromium --version 2>/dev/null || true)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
echo "installed: ${missing[*]} ($(chromium --version 2>/dev/null || true))"
