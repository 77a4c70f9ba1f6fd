#!/usr/bin/env bash
# Create a virtual environment (default .venv) with the CPU build of PyTorch and MedDIFT with its
# test extra. Usage: bash scripts/setup.sh [VENV_DIR]
# A later run does nothing (and says so) while pyproject.toml and MedDIFTLib/requirements.txt are unchanged
# and the install imports.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
stamp="$venv/.meddift-installed"
wanted="$(cat pyproject.toml MedDIFTLib/requirements.txt | sha256sum | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] \
    && "$venv/bin/python" -c "import torch, MedDIFTLib" 2>/dev/null; then
  echo "MedDIFT is up to date in $venv"
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
# The CPU wheel first: a plain `torch` requirement would pull the CUDA build.
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
# setuptools warns about editable installs on every run; the layout it warns of is intended here.
PYTHONWARNINGS=ignore "$venv/bin/python" -m pip install --quiet -e ".[test]"
echo "$wanted" > "$stamp"
echo "MedDIFT installed in $venv"
