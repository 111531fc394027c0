#!/usr/bin/env bash
# Creates .venv inside the repository and installs the tested versions.
# Usage: bash setup.sh                      (PYTHON=python3.11 bash setup.sh to choose the interpreter)
#        bash setup.sh --with-openmmlab     also mmcv/mmsegmentation/mmdetection (setup_openmmlab.sh)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "setup.sh: $PYTHON is $("$PYTHON" --version 2>&1); Python 3.10 or newer is needed (set PYTHON=...)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip_install() {
    # some mirrors' pip configuration warns about every index location it skips; keep the real messages
    .venv/bin/python -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
echo "setup.sh: installing into .venv (torch 2.14.1, torchvision 0.29.1, then requirements.txt)"
pip_install --upgrade pip
# the tested versions first, then the rest of the ranges in requirements.txt
pip_install "torch==2.14.1" "torchvision==0.29.1"
pip_install -r requirements.txt
.venv/bin/python - <<'PY'
import torch, torchvision, timm
print(f"setup.sh: ready (.venv: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__})")
PY
if [ "${1:-}" = "--with-openmmlab" ]; then
    bash setup_openmmlab.sh
fi
