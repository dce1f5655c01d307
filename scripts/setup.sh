#!/usr/bin/env bash
# Create .venv (if missing) and install efficient-attn into it, editable.
#   bash scripts/setup.sh        # the library and its CLI
#   bash scripts/setup.sh dev    # plus test dependencies (pytest, hypothesis, xformers)
#   bash scripts/setup.sh peers  # plus the peer implementations benchmarked with --peers
# PyTorch: installs the pinned CPU build (torch==2.13.0) unless a torch is already in the venv, so a GPU user who
# installed their own CUDA build keeps it. Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0+cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --disable-pip-version-check -q "${TORCH_SPEC:-torch==2.13.0}"
fi
target="."
if [ -n "$extras" ]; then
  target=".[$extras]"
fi
.venv/bin/pip install --disable-pip-version-check -q -e "$target"
.venv/bin/python -c "import torch, efficient_attn; print('efficient-attn', efficient_attn.__version__, 'with torch', torch.__version__)"
