#!/usr/bin/env bash
# Install paic into ./.venv (CPU torch + onnxruntime + test tools) and run the demo:
# prune the bundled ResNet-20 to 95% sparsity. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: the CPU wheel (on these machines it is on disk; elsewhere PyTorch's CPU index)
"$VENV/bin/python" -m pip install -q torch==2.13.0 \
  || "$VENV/bin/python" -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
"$VENV/bin/python" -m pip install -q -e '.[cpu,test,plot]'
"$VENV/bin/paic" optimize examples/models/resnet20.onnx --sparsity 0.95 -o pruned.onnx --report report.json --force
