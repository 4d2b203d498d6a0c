#!/usr/bin/env bash
# Install Debian's `chromium` (a real headless browser for tests/test_report_samples.py) when
# /usr/bin/chromium is missing. Idempotent: does nothing when it is already there.
# Needs root (or passwordless sudo) and apt-get; exits 2 when neither is available, so a
# caller can tell "cannot install here" from a failed install (any other non-zero status).
set -euo pipefail

CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
    echo "chromium already installed: $CHROMIUM"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "cannot install chromium: no apt-get on this machine" >&2
    exit 2
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "cannot install chromium: not root and no passwordless sudo" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium >/dev/null
if [ ! -x "$CHROMIUM" ]; then
    echo "apt-get installed chromium but $CHROMIUM is missing" >&2
    exit 1
fi
echo "installed: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
