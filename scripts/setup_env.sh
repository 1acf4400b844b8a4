#!/usr/bin/env bash
# Create .venv with the newest supported Python found (3.13, 3.12 or 3.11; PYTHON=/path/to/python picks one) and
# install the locked environment (requirements.lock, the same pins on every supported version) into it.
# Re-running is cheap: nothing is installed again while requirements.lock is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
supported="3.11 3.12 3.13"
how="Install one (python.org, your package manager, pyenv or conda: environment.yml), or set PYTHON=/path/to/python3.13."
version_of() {  # "3.12" for a Python that runs and has venv, else nothing
  "$1" -c 'import sys, venv, ensurepip; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}
python=${PYTHON:-}
if [ -n "$python" ]; then
  version=$(version_of "$python")
  if [ -z "$version" ] || [[ " $supported " != *" $version "* ]]; then
    echo "PYTHON=$python is ${version:-not a Python with venv}: reproai needs Python 3.11, 3.12 or 3.13 with venv." \
      "$how" >&2
    exit 1
  fi
else
  for candidate in python3.13 python3.12 python3.11 python3 python; do
    version=$(command -v "$candidate" >/dev/null && version_of "$candidate" || true)
    if [ -n "$version" ] && [[ " $supported " == *" $version "* ]]; then
      python=$candidate
      break
    fi
  done
  if [ -z "$python" ]; then
    echo "reproai needs Python 3.11, 3.12 or 3.13 with venv, and found none on PATH. $how" >&2
    exit 1
  fi
fi
if [ -e .venv ]; then
  have=$(version_of .venv/bin/python)
  if [[ " $supported " != *" ${have:-none} "* ]]; then
    echo ".venv holds Python ${have:-that does not run}; reproai needs 3.11, 3.12 or 3.13: remove .venv" \
      "(rm -rf .venv) and run this again." >&2
    exit 1
  elif [ -n "${PYTHON:-}" ] && [ "$have" != "$version" ]; then
    echo ".venv holds Python $have, and PYTHON=$python is $version: remove .venv (rm -rf .venv) and run this again" \
      "to make it with $version." >&2
    exit 1
  fi
else
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
