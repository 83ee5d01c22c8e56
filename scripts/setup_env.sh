#!/usr/bin/env bash
# Create (or reuse) a virtualenv with the package and what its tests need; torch is the CPU build.
# Usage: bash scripts/setup_env.sh [VENV_DIR] [TRANSFORMERS_VERSION]
#   With a transformers version, the venv gets only what the Hub files need (torch, that transformers, pytest):
#   the files every checkpoint ships are tested on it, the rest of the package is not.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
transformers_version="${2:-}"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# torch pinned first and on every install: a bare range would let pip pull a multi-GB CUDA build.
"${pip[@]}" install "torch==2.13.0"
if [ -z "$transformers_version" ]; then
    "${pip[@]}" install -e ".[dev]" "torch==2.13.0"
else
    "${pip[@]}" install "transformers==$transformers_version" "torch==2.13.0" numpy "pytest>=8"
    "${pip[@]}" install --no-deps -e .
fi
"$venv/bin/python" -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__} in $venv')"
