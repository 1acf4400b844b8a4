#!/usr/bin/env bash
# Regenerate requirements.lock: install requirements.txt + requirements-dev.txt into a throw-away venv and
# freeze every installed distribution with its exact version. CUDA libraries and triton are Linux-only
# dependencies of torch, so they get a platform marker.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3.11}" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet -r requirements.txt -r requirements-dev.txt
{
  echo "# The whole resolved environment (Python 3.11, Linux x86_64): every package, exact version."
  echo "# Made by scripts/lock.sh from requirements.txt and requirements-dev.txt; do not edit by hand."
  "$tmp/venv/bin/pip" freeze --all --exclude pip |
    sed -E 's/^((nvidia|cuda)-[^=]*|triton)==(.*)$/\1==\3 ; sys_platform == "linux"/'
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) packages)"
