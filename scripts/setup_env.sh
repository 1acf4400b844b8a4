#!/usr/bin/env bash
# Create .venv with Python 3.11 and install the locked environment (requirements.lock) into it.
# Re-running is cheap: nothing is installed again while requirements.lock is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python=$candidate
      break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "reproai needs Python 3.11 (with venv); none found on PATH. Install it, or set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $("$python" --version)"
  "$python" -m venv .venv
fi
stamp=.venv/.requirements.lock.sha256
lock_hash=$(.venv/bin/python -c 'import hashlib; print(hashlib.sha256(open("requirements.lock", "rb").read()).hexdigest())')
if [ "$(cat "$stamp" 2>/dev/null)" != "$lock_hash" ]; then
  echo "Installing requirements.lock into .venv (the first time: torch is a large download)"
  if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock; then
    echo "Installing requirements.lock failed (above: pip's reason). The environment takes about 7 GB (torch" \
      "and its CUDA libraries); $(df -h . | awk 'NR == 2 {print $4}') is free here. Free some and run this again." >&2
    exit 1
  fi
  echo "$lock_hash" > "$stamp"
fi
