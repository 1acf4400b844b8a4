#!/usr/bin/env bash
#SBATCH --job-name=reproai
#SBATCH --array=0-3
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=12:00:00
#SBATCH --output=reproai-%A_%a.out
#
# Step 4 or 5 as a SLURM job array: every task is one worker; the workers share Optuna's studies in PostgreSQL and
# log to one MLflow tracking server (docs/scaling_out.md). Submit from the repository root, with the environment
# active and both addresses exported:
#
#   export OPTUNA_STORAGE=postgresql://reproai:PASSWORD@DBHOST:5432/reproai_optuna
#   export MLFLOW_TRACKING_URI=http://TRACKINGHOST:5000
#   sbatch --export=ALL,REPROAI_STEP=4 scripts/slurm_array.sh                          # task i: fold i (2 x 2 folds)
#   sbatch --export=ALL,REPROAI_STEP=5,REPROAI_MODE=worker --array=0-7 scripts/slurm_array.sh  # 8 workers, every fold
#
# REPROAI_MODE=fold (default): task i runs one fold, outer fold i / N_NESTED and inner fold i % N_NESTED, so
#   --array=0-(N_ROOT * N_NESTED - 1) covers the first N_ROOT x N_NESTED folds (REPROAI_N_NESTED, default 2).
# REPROAI_MODE=worker: every task runs the same command (step 4's default folds, or REPROAI_ARGS) and the tasks
#   share each fold's trials; any number of tasks, started whenever the queue allows.
# REPROAI_ARGS: more flags for train.py, e.g. "--n-trials 20" (step 4) or "--config my_config.py" (step 5).
# The workers' torch threads are the task's CPUs: a rerun needs the same count to give the same bits.
# REPROAI_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
step=${REPROAI_STEP:?set REPROAI_STEP to 4 or 5}
mode=${REPROAI_MODE:-fold}
task=${SLURM_ARRAY_TASK_ID:?run this with sbatch --array, or set SLURM_ARRAY_TASK_ID}
storage=${OPTUNA_STORAGE:?export OPTUNA_STORAGE=postgresql://… (docs/scaling_out.md)}
: "${MLFLOW_TRACKING_URI:?export MLFLOW_TRACKING_URI=http://… (docs/scaling_out.md)}"
n_nested=${REPROAI_N_NESTED:-2}
[ "$step" = 4 ] || [ "$step" = 5 ] || { echo "REPROAI_STEP=$step: give 4 or 5." >&2; exit 1; }

command=("${PYTHON:-python}" "step_$step/train.py")
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && command+=(--num-threads "$SLURM_CPUS_PER_TASK")
if [ "$step" = 4 ]; then command+=(--storage "$storage"); else command+=(--set "search.storage=$storage"); fi
case "$mode" in
  fold)
    root=$((task / n_nested)) nested=$((task % n_nested))
    if [ "$step" = 4 ]; then
      command+=(--root-split "$root" --nested-split "$nested")
    else
      command+=(--set "cv.root_split=$root" --set "cv.nested_split=$nested")
    fi ;;
  worker) ;;
  *) echo "REPROAI_MODE=$mode: give fold or worker." >&2; exit 1 ;;
esac
# shellcheck disable=SC2206 # REPROAI_ARGS is split into words on purpose
command+=(${REPROAI_ARGS:-})
echo "task $task on $(hostname): ${command[*]}"
[ -n "${REPROAI_DRY_RUN:-}" ] || exec "${command[@]}"
