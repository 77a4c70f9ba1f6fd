#!/usr/bin/env bash
# Set up (if needed) and run the test suite (slow and GPU tests are deselected by default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh .venv
.venv/bin/python -m pytest -q "$@"
