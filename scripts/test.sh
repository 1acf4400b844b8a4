#!/usr/bin/env bash
# Set up .venv and run the whole test suite (CPU, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
