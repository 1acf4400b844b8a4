#!/usr/bin/env bash
# The whole tutorial in quick mode on a CPU: set up .venv, build the synthetic stand-in, then run every step.
# Each command's wall time is printed after it ("[12 s] ..."); benchmarks/README.md keeps one measured table of them.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
timed() {
  local start=$SECONDS
  "$@"
  echo "[$((SECONDS - start)) s] $*"
}
timed bash scripts/setup_env.sh
py=.venv/bin/python
timed $py step_1/download_data.py --synthetic
for step in step_*/; do
  step=${step%/}
  echo; echo "=================== $step ==================="
  if [ -f "$step/make_dataset_splits.py" ]; then timed $py "$step/make_dataset_splits.py"; fi
  timed $py "$step/train.py" --quick
  timed $py "$step/analyze_predictions.py"
  if [ -f "$step/register.py" ]; then  # step 5: the best fold's model registered, then shown one photo
    timed $py "$step/register.py"
    timed $py "$step/predict.py" data/oxfordiii/oxford-iiit-pet/images/Abyssinian_1.jpg
  fi
done
echo
echo "Done in $((SECONDS - started)) s. Step 1 wrote its results to results/step_1/; the later steps recorded theirs in MLflow"
echo "(mlflow.db and mlruns/ in $(pwd)). Look at them with: .venv/bin/mlflow ui   (then open the link each step printed: it ends in ?workflowType=machine_learning, the model-training view)"
