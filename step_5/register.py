"""Step 5 — register the model of one fold in MLflow's Model Registry, with the lineage that makes it trustworthy.

A model version is only as reproducible as the run record it points to. This script takes a complete step-5 root
run, lists its folds with their test ROC AUC, and registers the refit model of the fold you pick (by default the
best by test ROC AUC) as a version of the registered model `pets-cat-vs-dog`, with the alias `candidate`. The version
carries the provenance as tags (root run, dataset digest, split-file digest, git commit, code and config digests,
whether the data was the synthetic stand-in) and points to the refit run that logged it. Registering the same
fold's model again finds the version made before; it does not make a second one. support/registry.py does the work.

    python step_5/register.py                            # the latest complete step-5 root run, its best fold
    python step_5/register.py --run-id RUN_ID --fold 0/1
    python step_5/predict.py my_pet.jpg                  # then: the candidate version on your own photo
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
import mlflow  # noqa: E402

from support import (
    common,  # noqa: E402
    registry,  # noqa: E402
)
from support.fold_runs import find_run, fold_table, gather_folds, model_run_id  # noqa: E402
from support.resume import asked_folds  # noqa: E402

EXPERIMENT = "step_5"


def fold_id(text: str) -> tuple[int, int]:
    """--fold R/N: a root split and a nested split."""
    try:
        root, nested = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROOT/NESTED, e.g. 0/1") from None
    return root, nested


def main(argv: list[str] | None = None) -> None:
    """Register the chosen fold's refit model as a version of pets-cat-vs-dog, alias candidate."""
    parser = common.parser(__doc__)
    parser.add_argument("--run-id", help="the step-5 root run (default: the latest complete one)")
    parser.add_argument("--fold", type=fold_id, help="ROOT/NESTED, e.g. 0/1 (default: the best test ROC AUC)")
    args = parser.parse_args(argv)

    registry.require_store()  # a folder without runs: one sentence, and no empty mlflow.db left behind
    client = mlflow.MlflowClient()  # MLflow's default store (./mlflow.db), or MLFLOW_TRACKING_URI
    root = find_run(client, args.run_id, EXPERIMENT)
    folds, _ = gather_folds(client, root, EXPERIMENT)
    table, tests = fold_table(folds)
    best = table.loc[table["test_roc_auc"].idxmax()]
    fold = args.fold or (int(best["root_split"]), int(best["nested_split"]))
    if fold not in folds:
        raise SystemExit(
            f"--fold {fold[0]}/{fold[1]}: root run {root.info.run_id} has no completed fold {fold[0]}/{fold[1]}."
        )
    if fold not in asked_folds(root.data.tags):  # a fold run the root's record does not name: lineage unknown
        raise SystemExit(
            f"Root run {root.info.run_id}'s record does not name fold {fold[0]}/{fold[1]} among the folds asked of it "
            "(tags fold_asked.R.N; a run made before they were recorded names none): its lineage is not on record, "
            "so it is not registered; train it again to register it."
        )
    chosen = (table["root_split"] == fold[0]) & (table["nested_split"] == fold[1])
    table["chosen"] = chosen.map({True: "  <-", False: ""})
    columns = ["root_split", "nested_split", "dev_roc_auc", "test_roc_auc", "chosen"]
    print(f"The completed folds of root run {root.info.run_id}:")
    print(table[columns].to_string(index=False, float_format="{:.3f}".format))
    if args.fold is None:
        print(
            "Chosen: the best test ROC AUC. That choice makes its test score optimistic: what the method achieves "
            "is the interval across folds (analyze_predictions.py); --fold picks another."
        )
    version, new = registry.register(client, model_run_id(folds[fold]), tests[fold]["file"].iloc[0])
    said = "Registered" if new else "Already registered, from the same refit run:"
    print(f"{said} {registry.NAME} version {version.version} (alias {registry.ALIAS}) from fold {fold[0]}/{fold[1]}")
    print(f"View it: {registry.version_page(version.version)}")
    print(f"Next: {Path(sys.executable).name} step_5/predict.py IMAGE [IMAGE ...]")


if __name__ == "__main__":
    main()
