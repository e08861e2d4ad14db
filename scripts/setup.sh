#!/usr/bin/env bash
# Make .venv with Colossus LM and its test tools. On a machine without an NVIDIA GPU, torch comes
# as the CPU build (from pip's own sources if they have it, else PyTorch's CPU index), never the
# multi-GB CUDA build. A machine with a GPU gets the default (CUDA) torch from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"

if .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: keeping the torch already in .venv ($(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: installing torch==$TORCH_VERSION with CUDA from PyPI"
    $PIP install -q "torch==$TORCH_VERSION"
else
    echo "setup: no GPU: installing the CPU build of torch==$TORCH_VERSION"
    # The +cpu build from wherever pip already looks (a local wheel, a mirror) with its
    # dependencies from the usual indexes; PyPI has no +cpu builds, so elsewhere this fails at once
    # and PyTorch's CPU index is asked instead.
    $PIP install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null \
        || $PIP install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi
$PIP install -q -e ".[test]"

# tests/test_web_page.py drives the chat page in a headless Chromium through Playwright. Playwright's
# own browser download (`playwright install chromium`) needs the open internet, so a system Chromium
# is used where that build is absent: Debian's, from apt, when we are root. Without any Chromium
# that test is skipped, and says why.
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || command -v google-chrome >/dev/null 2>&1 || command -v google-chrome-stable >/dev/null 2>&1 \
    || .venv/bin/python -c "import os, sys; from playwright.sync_api import sync_playwright
with sync_playwright() as p: sys.exit(not os.path.exists(p.chromium.executable_path))" 2>/dev/null; then
    :
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    echo "setup: installing chromium (apt) for the chat page's browser test"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/tmp/setup-chromium.log 2>&1; then
        echo "setup: apt could not install chromium (see /tmp/setup-chromium.log): tests/test_web_page.py will be skipped" >&2
    fi
else
    echo "setup: no Chromium found: tests/test_web_page.py will be skipped (install chromium, or run" \
        ".venv/bin/playwright install chromium where the internet is reachable)" >&2
fi
echo "setup: done. Try: .venv/bin/colossus train"
