#!/usr/bin/env bash
# Set up igpt in ./.venv: torch first (the right build for this machine), then igpt with its test extra.
#
# Which torch:
#   - IGPT_TORCH set (e.g. IGPT_TORCH="torch==2.6.0+cu124 --index-url ..."): exactly that.
#   - a GPU (nvidia-smi lists one): the default torch from the package index (a CUDA build on Linux).
#   - no GPU: a CPU build. A local CPU wheel (pip's find-links) is used if pip has one; otherwise PyTorch's
#     CPU-only index. Never the multi-GB CUDA build, which a bare `pip install deepspeed` would pull.
# An existing torch in .venv is kept. Re-running is cheap and safe.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)

if .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: keeping torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
elif [ -n "${IGPT_TORCH:-}" ]; then
  # shellcheck disable=SC2086
  "${pip[@]}" install $IGPT_TORCH
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: GPU found; installing the default (CUDA) torch"
  "${pip[@]}" install "torch>=2.4"
else
  wheels="$(mktemp -d)"
  if "${pip[@]}" download -q --no-deps --no-index -d "$wheels" "torch==2.13.0" >/dev/null 2>&1; then
    echo "setup: no GPU; installing the local CPU wheel $(ls "$wheels")"
    "${pip[@]}" install "$wheels"/torch-*.whl
  else
    echo "setup: no GPU; installing torch from PyTorch's CPU-only index"
    "${pip[@]}" install torch --index-url https://download.pytorch.org/whl/cpu
  fi
  rm -rf "$wheels"
fi

"${pip[@]}" install -e ".[test]"
.venv/bin/python -c "import torch, ray, deepspeed, mlflow; print('setup: ok: torch', torch.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__, '| mlflow', mlflow.__version__)"
