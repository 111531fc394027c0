#!/usr/bin/env bash
# Installs OpenMMLab into the repository's .venv (run `bash setup.sh` first) for semantic_segmentation/ and
# detection/: mmengine 0.10.7, mmcv 2.1.0 built from source WITH its compiled ops, mmsegmentation 1.2.2
# (+ ftfy, regex) and mmdetection 3.3.0 (the newest releases that accept mmcv < 2.2).
#
# No prebuilt mmcv wheel exists for current PyTorch, so mmcv is compiled once (about 15 minutes on 2 cores,
# CPU ops; with CUDA ops when a GPU is visible or FORCE_CUDA=1) and the wheel is kept in
#   ${BOOTMAE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bootmae/wheels}/mmcv-2.1.0-<torch>-<python>-<cpu|cuda>/
# so a re-run (or CI on the same machine) installs it in seconds. Usage: bash setup_openmmlab.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
    echo "setup_openmmlab.sh: .venv/bin/python not found; run 'bash setup.sh' first" >&2
    exit 1
fi
MMCV_VERSION=2.1.0
CACHE_ROOT=${BOOTMAE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bootmae/wheels}

pip_install() {
    # some mirrors' pip configuration warns about every index location it skips; keep the real messages
    "$PY" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# mmcv's setup.py and mmengine's package helpers import pkg_resources, which setuptools 81+ no longer ships;
# ninja makes the extension build parallel
pip_install "setuptools<81" wheel ninja
pip_install "mmengine==0.10.7"

# the built extension is tied to the exact torch build, the interpreter and the CPU/CUDA choice
read -r TORCH_TAG PY_TAG VARIANT < <("$PY" - <<'PY'
import os, sys, torch
cuda = torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"
print(torch.__version__.replace("+", "_"), f"cp{sys.version_info.major}{sys.version_info.minor}",
      "cuda" if cuda else "cpu")
PY
)
WHEEL_DIR="$CACHE_ROOT/mmcv-$MMCV_VERSION-torch$TORCH_TAG-$PY_TAG-$VARIANT"

mmcv_ok() {
    # installed, the right version, and its compiled ops load against this torch
    "$PY" - <<PY >/dev/null 2>&1
import mmcv, mmcv.ops, torch
assert mmcv.__version__ == "$MMCV_VERSION"
from mmcv.ops import nms
nms(torch.rand(3, 4), torch.rand(3), 0.5)
PY
}

if mmcv_ok; then
    echo "setup_openmmlab.sh: mmcv $MMCV_VERSION with ops already installed"
else
    WHEEL=$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$WHEEL" ]; then
        echo "setup_openmmlab.sh: building mmcv $MMCV_VERSION with $VARIANT ops for torch $TORCH_TAG (about 15 minutes on 2 cores; cached in $WHEEL_DIR)"
        BUILD=$(mktemp -d)
        trap 'rm -rf "$BUILD"' EXIT
        # the sdist only: its setup.py imports torch, so it is built against .venv's torch (no isolation)
        "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV_VERSION" -d "$BUILD" \
            2> >(grep -v -e "is ignored: it is neither a file nor a directory" -e "pkg_resources is deprecated" >&2)
        tar -xzf "$BUILD"/mmcv-"$MMCV_VERSION".tar.gz -C "$BUILD"
        # PyTorch 2.10+ headers need C++20; mmcv 2.1.0 asks for C++17
        sed -i "s/-std=c++17/-std=c++20/g; s#/std:c++17#/std:c++20#g" "$BUILD/mmcv-$MMCV_VERSION/setup.py"
        START=$(date +%s)
        mkdir -p "$WHEEL_DIR"
        # the compiler's and setuptools' pages of warnings go to a log, shown only when the build fails
        LOG="$WHEEL_DIR/build.log"
        if ! MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip wheel -v --no-deps --no-build-isolation \
                "$BUILD/mmcv-$MMCV_VERSION" -w "$BUILD/wheel" >"$LOG" 2>&1; then
            tail -n 40 "$LOG" >&2
            echo "setup_openmmlab.sh: building mmcv failed; the full log is $LOG" >&2
            exit 1
        fi
        # copy then rename, so an interrupted run never leaves a half-written wheel in the cache
        for f in "$BUILD"/wheel/mmcv-*.whl; do
            cp "$f" "$WHEEL_DIR/.$(basename "$f").part" && mv "$WHEEL_DIR/.$(basename "$f").part" "$WHEEL_DIR/$(basename "$f")"
        done
        echo "setup_openmmlab.sh: mmcv built in $(( $(date +%s) - START )) s"
        WHEEL=$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl | head -n 1)
    else
        echo "setup_openmmlab.sh: installing the cached $WHEEL"
    fi
    pip_install --force-reinstall --no-deps "$WHEEL"
    # its runtime requirements (the wheel's own, installed without resolving mmcv again)
    pip_install addict numpy packaging Pillow pyyaml yapf opencv-python
fi

# mmsegmentation 1.2.2 imports ftfy and regex (its text encoders) at start-up
pip_install "mmsegmentation==1.2.2" "mmdet==3.3.0" ftfy regex

"$PY" - <<'PY'
import mmcv, mmcv.ops, mmengine, mmseg, mmdet
from mmcv.ops import roi_align  # noqa: F401  (Mask R-CNN's RoI ops must be compiled)
print(f"setup_openmmlab.sh: ready (mmengine {mmengine.__version__}, mmcv {mmcv.__version__} with ops, "
      f"mmsegmentation {mmseg.__version__}, mmdet {mmdet.__version__})")
PY
