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
echo "setup: done. Try: .venv/bin/colossus train"
