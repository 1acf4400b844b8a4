#!/usr/bin/env bash
# Run the quickstart end to end under one supported Python: a fresh clone of this repository's HEAD, .venv made with
# that Python, then `bash scripts/tutorial.sh` and the whole suite as CI runs it (PostgreSQL started, REPROAI_CI=1).
# CI runs Python 3.11 only; this is how 3.12 and 3.13 are checked (README, "Prerequisites"). Needs root or sudo for
# PostgreSQL, ~7 GB of disk for the clone's .venv, and the first time a large torch download (pip keeps it in its
# cache for the next time).
#   bash scripts/check_python.sh 3.13                 # finds python3.13 on PATH, else pyenv's newest 3.13.x
#   PYTHON=/opt/python3.12/bin/python3 bash scripts/check_python.sh 3.12
#   KEEP=/tmp/check-3.13 bash scripts/check_python.sh 3.13   # the clone (and its runs) kept there
set -euo pipefail
main() {  # the whole script is read before it runs: editing the file meanwhile cannot change a running check
  local version=${1:?"usage: bash scripts/check_python.sh 3.11|3.12|3.13"}
  case $version in
    3.11 | 3.12 | 3.13) ;;
    *) echo "reproai supports Python 3.11, 3.12 and 3.13, not $version." >&2; exit 1 ;;
  esac
  cd "$(dirname "$0")/.."
  repo=$(pwd)
  version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true; }
  python=${PYTHON:-}
  found=$([ -z "$python" ] || version_of "$python")
  if [ -n "$python" ] && [ "$found" != "$version" ]; then
    echo "PYTHON=$python is ${found:-not a Python}, not Python $version." >&2
    exit 1
  fi
  if [ -z "$python" ]; then
    for candidate in "python$version" $(ls -d "$HOME"/.pyenv/versions/"$version".*/bin/python 2>/dev/null | sort -rV); do
      if [ "$(version_of "$candidate")" = "$version" ]; then
        python=$(command -v "$candidate")
        break
      fi
    done
  fi
  if [ -z "$python" ]; then
    echo "No Python $version found (python$version on PATH, or pyenv's): install one (pyenv install $version," \
      "uv python install $version, conda, python.org), or set PYTHON=/path/to/python$version." >&2
    exit 1
  fi
  dir=${KEEP:-$(mktemp -d)}
  mkdir -p "$dir"
  log=$dir/summary.log
  echo "Python $("$python" -c 'import sys; print(sys.version.split()[0])') ($python); HEAD $(git rev-parse --short HEAD);" \
    "$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | xargs); $(date -u +%F)" | tee "$log"
  git diff --quiet HEAD || echo "(uncommitted changes are not in the clone: it checks HEAD as committed)" | tee -a "$log"
  git clone --quiet "$repo" "$dir/reproai"
  cd "$dir/reproai"
  export PYTHON=$python
  step() {  # step NAME SUMMARY COMMAND...: run it, its output into NAME.log; its time and its line matching SUMMARY
    local name=$1 summary=$2 start=$SECONDS
    shift 2
    if "$@" > "$dir/$name.log" 2>&1; then
      echo "$name: passed in $((SECONDS - start)) s ($(grep -E "$summary" "$dir/$name.log" | tail -n 1))" | tee -a "$log"
    else
      echo "$name: FAILED after $((SECONDS - start)) s; its output: $dir/$name.log (this folder is kept)" | tee -a "$log"
      exit 1
    fi
  }
  step tutorial "^Done in" bash scripts/tutorial.sh
  [ "$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$version" ] ||
    { echo "the clone's .venv is not Python $version" | tee -a "$log"; exit 1; }
  bash scripts/local_services.sh postgres > "$dir/postgres.log" 2>&1
  export REPROAI_CI=1
  step suite " passed" bash scripts/test.sh -q -p no:cacheprovider
  [ -n "${KEEP:-}" ] || rm -rf "$dir"  # the summary above is all that is kept
}
main "$@"
