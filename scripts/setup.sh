#!/usr/bin/env bash
# Create a virtual environment (default .venv) with the CPU build of PyTorch and MedDIFT with its
# test extra. Usage: bash scripts/setup.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
# The CPU wheel first: a plain `torch` requirement would pull the CUDA build.
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet -e ".[test]"
echo "MedDIFT installed in $venv"
