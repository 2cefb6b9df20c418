#!/usr/bin/env bash
# MONAI Label 0.8.5 for apps/monailabel in its own virtual environment (default: <bundle>/.venv-monailabel).
#   bash apps/monailabel/install.sh [VENV]          # from anywhere; about 4 minutes on 2 CPU cores
# The bundle's environment is not touched: MONAI Label's full dependency set would bring numpy<2 and torchvision.
set -euo pipefail
BUNDLE="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$BUNDLE/.venv-monailabel}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
"${PIP[@]}" torch==2.13.0                                   # first, so a CUDA build installed the same way is kept
"${PIP[@]}" -r "$BUNDLE/requirements.txt"                   # the bundle's own runtime (monai 1.6.1, numpy 2)
"${PIP[@]}" -r "$BUNDLE/apps/monailabel/requirements.txt"   # what the server imports
"${PIP[@]}" --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
# what the app imports: MONAI Label's app and BasicInferTask, and the bundle's serving side
(cd "$BUNDLE" && "$VENV/bin/python" -c "import monailabel.app, monailabel.tasks.infer.basic_infer, scripts.serving")
echo "MONAI Label $("$VENV/bin/python" -c 'import monailabel; print(monailabel.__version__)') in $VENV"
