#!/usr/bin/env bash
# Scaling out, tried on one machine: PostgreSQL (Debian's package) with a role and two databases, and an MLflow
# tracking server on 127.0.0.1 backed by it (docs/scaling_out.md).
#
#   bash scripts/local_services.sh start      # PostgreSQL, role, databases, then `mlflow server` on 127.0.0.1:5000
#   bash scripts/local_services.sh postgres   # only PostgreSQL, the role and the databases (what the tests need)
#   bash scripts/local_services.sh status
#   bash scripts/local_services.sh stop       # the tracking server, then PostgreSQL
#
# PostgreSQL is installed with apt-get where it is missing, and started with pg_ctlcluster: both need root (or sudo).
# The role `reproai` (password `reproai`, allowed to create databases) owns two databases, reproai_optuna (Optuna's
# studies) and reproai_mlflow (the tracking server's runs): each tool migrates its own schema, and both keep an
# `alembic_version` table, so they cannot share one database. The password is for a try-out on 127.0.0.1 only.
# The server's log, process id and artifacts are in .services/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
ROLE=reproai
PASSWORD=${REPROAI_PG_PASSWORD:-reproai}
PG_PORT=5432
MLFLOW_PORT=${MLFLOW_PORT:-5000}
STATE=.services
URL="postgresql://$ROLE:$PASSWORD@127.0.0.1:$PG_PORT"

say() { echo "local_services: $*"; }
die() { echo "local_services: $*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "'$*' needs root: run this script as root or install sudo."
  fi
}

as_postgres() {  # from /, which the postgres user can read (not every working directory is)
  if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else (cd / && sudo -u postgres "$@"); fi
}

cluster() {  # "VERSION NAME STATUS" of the first PostgreSQL cluster
  pg_lsclusters --no-header | awk 'NR == 1 {print $1, $2, $4}'
}

start_postgres() {
  if ! command -v pg_lsclusters >/dev/null; then
    say "PostgreSQL is not installed: installing Debian's package"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  read -r version name status < <(cluster) || die "pg_lsclusters lists no PostgreSQL cluster: create one with pg_createcluster."
  if [ "$status" != online ]; then
    as_root pg_ctlcluster "$version" "$name" start
  fi
  for _ in $(seq 60); do
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break
    sleep 0.5
  done
  pg_isready -q -h 127.0.0.1 -p "$PG_PORT" || die "PostgreSQL $version/$name does not answer on 127.0.0.1:$PG_PORT (see /var/log/postgresql/)."
  as_postgres psql -q -v ON_ERROR_STOP=1 -c "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$ROLE') THEN
        CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD';
      END IF;
    END \$\$;"
  for database in reproai_optuna reproai_mlflow; do
    if [ -z "$(as_postgres psql -tAc "SELECT 1 FROM pg_database WHERE datname = '$database'")" ]; then
      as_postgres createdb -O "$ROLE" "$database"
    fi
  done
  say "PostgreSQL $version/$name on 127.0.0.1:$PG_PORT: role $ROLE, databases reproai_optuna and reproai_mlflow"
}

mlflow_bin() {
  if [ -x .venv/bin/mlflow ]; then echo .venv/bin/mlflow; else command -v mlflow || die "mlflow is not installed: run bash scripts/setup_env.sh first."; fi
}

start_server() {
  mkdir -p "$STATE"
  if [ -f "$STATE/mlflow_server.pid" ] && kill -0 "$(cat "$STATE/mlflow_server.pid")" 2>/dev/null; then
    say "the tracking server already runs (pid $(cat "$STATE/mlflow_server.pid"))"
  else
    # without MLflow's job runner for its GenAI features (8 processes more, ~30 CPU s at start): runs need none of it
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$(mlflow_bin)" server --backend-store-uri "$URL/reproai_mlflow" --artifacts-destination "$PWD/$STATE/mlartifacts" \
      --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 2 >"$STATE/mlflow_server.log" 2>&1 &
    echo $! >"$STATE/mlflow_server.pid"
    for _ in $(seq 120); do
      curl -fs "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null && break
      kill -0 "$(cat "$STATE/mlflow_server.pid")" 2>/dev/null || die "the tracking server stopped; its log: $STATE/mlflow_server.log"
      sleep 0.5
    done
    curl -fs "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null || die "the tracking server did not answer in 60 s; its log: $STATE/mlflow_server.log"
  fi
  say "MLflow tracking server on http://127.0.0.1:$MLFLOW_PORT (log: $STATE/mlflow_server.log). In every worker's shell:"
  echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
  echo "export OPTUNA_STORAGE=$URL/reproai_optuna"
}

stop_server() {
  if [ -f "$STATE/mlflow_server.pid" ]; then
    kill -- -"$(cat "$STATE/mlflow_server.pid")" 2>/dev/null || true  # the server and its workers (one group)
    rm -f "$STATE/mlflow_server.pid"
    say "tracking server stopped"
  fi
}

case "${1:-}" in
  start) start_postgres; start_server ;;
  postgres) start_postgres ;;
  status)
    pg_lsclusters
    curl -fs "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null && say "tracking server: up on 127.0.0.1:$MLFLOW_PORT" || say "tracking server: down" ;;
  stop)
    stop_server
    read -r version name status < <(cluster) || exit 0
    [ "$status" = online ] && as_root pg_ctlcluster "$version" "$name" stop && say "PostgreSQL $version/$name stopped"
    ;;
  *) die "usage: bash scripts/local_services.sh start|postgres|status|stop" ;;
esac
