#!/usr/bin/env bash
# Repeat the context of a rare bit-for-bit failure: the test modules in CI's order, up to and including the one that
# failed, in a fresh clone of the committed code, as .ci/run runs them (PostgreSQL started, REPROAI_CI=1), N times.
# It stops at the first failing run and keeps that run's log and the stores its bit-for-bit test kept
# (tests/conftest.py: assert_bit_identical names the first step where the two runs parted).
#
#   bash scripts/repeat_suite.sh                          # 3 times, up to tests/test_step_3.py
#   bash scripts/repeat_suite.sh 5 tests/test_step_2.py   # 5 times, up to step 2's tests
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-3}
last=${2:-tests/test_step_3.py}
[ -f "$last" ] || { echo "No test module $last: give one of $(ls tests/test_*.py | tr '\n' ' ')" >&2; exit 2; }
modules=()
for module in $(ls tests/test_*.py | sort); do  # pytest's own order, as CI runs them
  modules+=("$module")
  [ "$module" = "$last" ] && break
done
keep=$(mktemp -d /tmp/reproai-repeat-suite.XXXXXX)
git clone --quiet . "$keep/clone"
echo "Repeating ${modules[*]} ${repeats} times in a fresh clone of $(git rev-parse --short HEAD) ($keep/clone)"
bash scripts/local_services.sh postgres
for run in $(seq 1 "$repeats"); do
  log=$keep/run-$run.log
  started=$(date +%s)
  if (cd "$keep/clone" && CI=true REPROAI_CI=1 REPROAI_EVIDENCE_DIR="$keep/evidence-$run" \
      bash scripts/test.sh "${modules[@]}") >"$log" 2>&1; then
    echo "run $run/$repeats: passed in $(($(date +%s) - started)) s: $(grep -E '[0-9]+ passed' "$log" | tail -1)"
  else
    echo "run $run/$repeats: FAILED after $(($(date +%s) - started)) s. Log: $log; kept stores: $keep/evidence-$run"
    grep -E "^(FAILED|ERROR)|Not bit for bit" "$log" | head -20
    exit 1
  fi
done
echo "$repeats of $repeats runs passed; logs in $keep"
