#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default: `meddift demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh .venv
.venv/bin/meddift demo "$@"
