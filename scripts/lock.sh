#!/usr/bin/env bash
# Regenerate requirements.lock: install requirements.txt + requirements-dev.txt into a throw-away venv of the first
# Python of PYTHONS and freeze every installed distribution with its exact version. CUDA libraries and triton are
# Linux-only dependencies of torch, so they get a platform marker. Then resolve the lock on every other Python of
# PYTHONS (pip --dry-run, no install): each must install exactly the lock's packages, or this fails and names the
# difference, which then needs a python_version marker. One lock for every supported Python keeps one set of bits.
#   PYTHONS="python3.11 python3.12 python3.13" bash scripts/lock.sh      (the default; each must run)
#   bash scripts/lock.sh --check      only the second part, for the lock as it is, on every Python of PYTHONS
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a pythons <<< "${PYTHONS:-python3.11 python3.12 python3.13}"
versions=()
for python in "${pythons[@]}"; do
  if ! version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    echo "lock.sh checks the lock on every supported Python, and $python does not run: set PYTHONS to the three" \
      "interpreters (e.g. PYTHONS=\"python3.11 ~/.pyenv/versions/3.12.1/bin/python ...\")." >&2
    exit 1
  fi
  versions+=("$version")
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ "${1:-}" = --check ]; then
  cp requirements.lock "$tmp/requirements.lock"
else
  "${pythons[0]}" -m venv "$tmp/venv"
  "$tmp/venv/bin/pip" install --quiet -r requirements.txt -r requirements-dev.txt
  {
    echo "# The whole resolved environment (Python $(echo "${versions[*]}" | sed "s/ /, /g"), Linux x86_64): every package, exact version."
    echo "# Made by scripts/lock.sh from requirements.txt and requirements-dev.txt; do not edit by hand."
    "$tmp/venv/bin/pip" freeze --all --exclude pip |
      sed -E 's/^((nvidia|cuda)-[^=]*|triton)==(.*)$/\1==\3 ; sys_platform == "linux"/'
  } > "$tmp/requirements.lock"
fi
for i in "${!pythons[@]}"; do
  [ "$i" -eq 0 ] && [ "${1:-}" != --check ] && continue
  "${pythons[$i]}" -m venv "$tmp/venv-$i"
  "$tmp/venv-$i/bin/pip" install --quiet --disable-pip-version-check --dry-run --ignore-installed \
    --report "$tmp/report-$i.json" -r "$tmp/requirements.lock"
  "$tmp/venv-$i/bin/python" - "$tmp/requirements.lock" "$tmp/report-$i.json" "${versions[$i]}" <<'EOF'
import json, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
lock = {norm(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", open(sys.argv[1]).read(), re.M)}
report = json.load(open(sys.argv[2]))["install"]
got = {norm(p["metadata"]["name"]): p["metadata"]["version"] for p in report}
extra = sorted(f"{n}=={v}" for n, v in got.items() if lock.get(n) != v)
missing = sorted(f"{n}=={v}" for n, v in lock.items() if n not in got)
if extra or missing:
    sys.exit(f"On Python {sys.argv[3]} the lock resolves differently: adds {extra or 'nothing'}, leaves out "
             f"{missing or 'nothing'}. Give those lines a python_version marker.")
print(f"Python {sys.argv[3]}: the lock installs exactly its {len(lock)} packages")
EOF
done
[ "${1:-}" = --check ] && exit 0
mv "$tmp/requirements.lock" requirements.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) packages)"
