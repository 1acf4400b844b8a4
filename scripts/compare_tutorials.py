"""Do two runs of the quick tutorial give the same results? Compared from their MLflow stores, bit for bit.

`bash scripts/tutorial.sh` in two checkouts (say, before and after a change that should not change any result), then

    python scripts/compare_tutorials.py /path/to/checkout_a /path/to/checkout_b

Every run of every step's experiment is matched by its place in the run tree (experiment, then run names from the
root down, e.g. step_4 / resnet18-seed0 / fold-0-1 / trial-2 / warmup), and compared on every metric (its last
value and its whole history) and on the bytes of every prediction table it logged. Run ids, times and the tags that
name the code (commit, code digest, run keys) differ between checkouts and are not compared. Step 1 is left out: it
has no seed (its flaw 1), so two of its runs differ by design. Prints one line per step, then every difference;
exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections import Counter
from pathlib import Path

import mlflow
from mlflow.entities import Run

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # hundreds of one-file downloads

STEPS = ("step_2", "step_3", "step_4", "step_5")
TIME_METRICS = {"analysis_seconds"}  # none today; a wall-clock metric would be named here and skipped


def run_tree(client: mlflow.MlflowClient, experiment_id: str) -> dict[str, Run]:
    """The experiment's runs by their path of run names from the root; repeated paths get #2, #3 in start order."""
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"], max_results=50_000)
    by_id = {run.info.run_id: run for run in runs}

    def path(run: Run) -> str:
        parent = run.data.tags.get("mlflow.parentRunId")
        name = run.info.run_name or "?"
        return f"{path(by_id[parent])}/{name}" if parent in by_id else name

    seen: Counter[str] = Counter()
    tree = {}
    for run in runs:
        place = path(run)
        seen[place] += 1
        tree[place if seen[place] == 1 else f"{place}#{seen[place]}"] = run
    return tree


def fingerprint(client: mlflow.MlflowClient, run: Run) -> dict[str, object]:
    """What must be equal: every metric's history, and the SHA-256 of every logged prediction table."""
    found: dict[str, object] = {}
    for name in sorted(run.data.metrics):
        if name not in TIME_METRICS and not name.startswith("system/"):  # what the machine did, not the result
            history = client.get_metric_history(run.info.run_id, name)
            found[f"metric {name}"] = [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]
    for artifact in client.list_artifacts(run.info.run_id, "predictions"):
        local = client.download_artifacts(run.info.run_id, artifact.path)
        found[f"artifact {artifact.path}"] = hashlib.sha256(Path(local).read_bytes()).hexdigest()
    return found


def step_fingerprints(checkout: Path, step: str) -> dict[str, dict[str, object]]:
    """Every run of the step's experiment in the checkout's store, by its place in the run tree."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{checkout / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(step)
    if experiment is None:
        raise SystemExit(
            f"{checkout / 'mlflow.db'} has no experiment {step}: run bash scripts/tutorial.sh there first."
        )
    return {place: fingerprint(client, run) for place, run in run_tree(client, experiment.experiment_id).items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path, help="a checkout where bash scripts/tutorial.sh ran")
    parser.add_argument("b", type=Path, help="another one")
    args = parser.parse_args(argv)
    differences = []
    for step in STEPS:
        a, b = step_fingerprints(args.a.resolve(), step), step_fingerprints(args.b.resolve(), step)
        values = sum(len(found) for found in a.values())
        same = [place for place in a if place in b and a[place] == b[place]]
        print(f"{step}: {len(a)} and {len(b)} runs, {len(same)} identical ({values} metrics and tables compared)")
        for place in sorted(set(a) ^ set(b)):
            differences.append(f"{step}: run {place} only in {args.a if place in a else args.b}")
        for place in sorted(set(a) & set(b)):
            for key in sorted(set(a[place]) | set(b[place])):
                if a[place].get(key) != b[place].get(key):
                    differences.append(f"{step}: {place}: {key}: {a[place].get(key)} != {b[place].get(key)}")
    for line in differences:
        print(line)
    print("identical" if not differences else f"{len(differences)} difference(s)")
    sys.exit(1 if differences else 0)


if __name__ == "__main__":
    main()
