"""The fold runs of one configuration, read back from MLflow, the same in steps 3 to 5 (but for its imports): the
root run to analyse, the latest completed run of each fold over every root run sharing its run key (folds run as
separate jobs, on several machines, are analysed together), their per-fold table, and the check of each fold's
logged model.

From step 4 on a fold's predictions and model are on its refit run (tag `refit_run_id`); in step 3, on the fold
run itself.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.artifacts import load_text
from mlflow.exceptions import MlflowException
from torch.utils.data import DataLoader

from support.cv_stats import metrics_at
from support.provenance import follow_code_paths
from support.training import PetImages

Fold = tuple[int, int]  # (root split, nested split)


def find_run(client: mlflow.MlflowClient, run_id: str | None, experiment: str) -> mlflow.entities.Run:
    """The run asked for, or the latest completed root run of the experiment; one clear sentence otherwise."""
    if run_id is None:
        found = client.get_experiment_by_name(experiment)
        runs = (
            []
            if found is None
            else client.search_runs(
                [found.experiment_id],
                "tags.run_level = 'root' AND tags.run_complete = 'true' AND attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
        )
        if not runs:
            raise SystemExit(
                f"No finished {experiment} run in {mlflow.get_tracking_uri()}: run "
                f"`python {experiment}/train.py --quick` first (from the same directory)."
            )
        return runs[0]
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise SystemExit(f"No run with id {run_id} in {mlflow.get_tracking_uri()}: check --run-id.") from None
    name = client.get_experiment(run.info.experiment_id).name
    if name != experiment:  # e.g. a step-4 run given to step 5: its record lacks what this step reads
        raise SystemExit(
            f"Run {run_id} is not a {experiment} run (its experiment is {name}): give the id of a root run of "
            f"{experiment}/train.py."
        )
    level = run.data.tags.get("run_level", "root")
    if level != "root":  # a fold, trial, refit or phase run: one part of a root run, which holds the whole result
        root = run
        with contextlib.suppress(MlflowException):  # a parent deleted for good: the topmost run left is named
            while "mlflow.parentRunId" in root.data.tags:
                root = client.get_run(root.data.tags["mlflow.parentRunId"])
        raise SystemExit(
            f"Run {run_id} is a {level} run, one part of root run {root.info.run_id}: give the root run's id (the "
            "top run in the UI)."
        )
    if run.info.status != "FINISHED" or run.data.tags.get("run_complete") != "true":
        raise SystemExit(f"Run {run_id} is {run.info.status} and did not complete: it has no predictions to analyse.")
    return run


def model_run_id(run: mlflow.entities.Run) -> str:
    """The run that holds a fold's predictions and model: its refit run (from step 4 on), else the fold run."""
    return run.data.tags.get("refit_run_id", run.info.run_id)


def load_results(run: mlflow.entities.Run) -> dict[str, pd.DataFrame]:
    """The dev and test prediction tables logged for the fold run."""
    uri = f"runs:/{model_run_id(run)}/predictions"
    return {name: pd.read_csv(io.StringIO(load_text(f"{uri}/{name}_predictions.csv"))) for name in ("dev", "test")}


def search_all(client: mlflow.MlflowClient, experiment_id: str, filter_string: str) -> list[mlflow.entities.Run]:
    """Every run that matches the filter, page by page."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def gather_folds(
    client: mlflow.MlflowClient, root: mlflow.entities.Run, experiment: str
) -> tuple[dict[Fold, mlflow.entities.Run], list[mlflow.entities.Run]]:
    """The latest completed run of each fold, over all root runs sharing this root's run key; and those roots."""
    run_id, key = root.info.run_id, root.data.tags.get("run_key")
    if root.data.tags.get("run_level") != "root" or key is None:
        raise SystemExit(
            f"Run {run_id} is not a root run of {experiment}/train.py (no run_key tag): pass a root run's id."
        )
    experiment_id = root.info.experiment_id
    roots = search_all(client, experiment_id, f"tags.run_level = 'root' AND tags.run_key = '{key}'")
    if len({r.data.tags.get("split_file_digest") for r in roots}) > 1:
        raise SystemExit(f"The root runs with run key {key} were made on different split files: remove the stray ones.")
    root_ids = {r.info.run_id for r in roots}
    latest: dict[Fold, mlflow.entities.Run] = {}
    filter_string = f"tags.run_level = 'fold' AND tags.run_key = '{key}' AND tags.fold_complete = 'true'"
    for run in search_all(client, experiment_id, filter_string):
        if run.data.tags.get("mlflow.parentRunId") not in root_ids:
            continue
        fold = (int(run.data.tags["root_split_id"]), int(run.data.tags["nested_split_id"]))
        finished = (run.info.end_time or 0, run.info.start_time)
        if fold not in latest or finished > (latest[fold].info.end_time or 0, latest[fold].info.start_time):
            latest[fold] = run  # a fold run twice (e.g. a job resubmitted): the latest completed one counts
    if not latest:
        raise SystemExit(f"Run {run_id} (run key {key}) has no completed fold run: nothing to analyse.")
    return dict(sorted(latest.items())), roots


def fold_table(folds: dict[Fold, mlflow.entities.Run]) -> tuple[pd.DataFrame, dict[Fold, pd.DataFrame]]:
    """One row per fold (sizes, threshold, dev and test ROC AUC, test metrics at its threshold); test tables."""
    rows, tests = [], {}
    for (root_split, nested_split), run in folds.items():
        test = load_results(run)["test"]
        threshold = run.data.metrics["threshold"]
        metrics = metrics_at(test["label"].to_numpy(), test["score"].to_numpy(), threshold)
        rows.append(
            {
                "root_split": root_split,
                "nested_split": nested_split,
                **{name: int(run.data.params[name]) for name in ("n_train", "n_dev", "n_test")},
                "threshold": threshold,
                "dev_roc_auc": run.data.metrics["dev_roc_auc"],
                **{f"test_{name}": value for name, value in metrics.items()},
                "run_id": run.info.run_id,
            }
        )
        tests[(root_split, nested_split)] = test
    return pd.DataFrame(rows), tests


def print_folds(table: pd.DataFrame) -> None:
    """The per-fold table, without run ids."""
    print(table.drop(columns="run_id").to_string(index=False, float_format="{:.3f}".format))


@torch.no_grad()
def recheck_model(run_id: str, params: dict[str, str], tags: dict[str, str], test: pd.DataFrame) -> tuple[str, float]:
    """Load the run's MLflow model, predict its test images again on the code paths the run recorded (`tags`: the
    run's, or its root's), compare with the logged scores bit for bit."""
    folder = Path(params.get("data_dir", "?")) / "oxford-iiit-pet" / "images"
    paths = [folder / name for name in test["file"]]
    if not all(path.is_file() for path in paths):
        return f"skipped: the test images are not in {folder} (run this where train.py ran)", float("nan")
    torch.set_num_threads(int(params["num_threads"]))  # another thread count adds floats in another order
    unlike = follow_code_paths(tags)  # before this process's first computation: the run's MKL, oneDNN, ATen paths
    with tempfile.TemporaryDirectory() as downloaded:  # else MLflow downloads into a temporary folder it leaves behind
        model = mlflow.pytorch.load_model(f"runs:/{run_id}/model", dst_path=downloaded)
    images = PetImages(paths, test["label"].to_numpy(), int(params["image_size"]), augment=False, seed=0)
    batches = DataLoader(images, batch_size=int(params["batch_size"]))  # the batches training.predict used
    # not training.predict itself: a model loaded from its torch.export form refuses eval() (it is always in eval mode)
    scores = np.concatenate([torch.sigmoid(model(x)).reshape(-1).numpy() for x, _ in batches])
    difference = float(np.max(np.abs(scores - test["score"].to_numpy(np.float32))))
    if difference == 0:
        return "identical: the logged model reproduces the logged test scores bit for bit", difference
    where = f"trained on {params['device']}, checked on the CPU" if params["device"] != "cpu" else "same device"
    where += f"; the CPU's code path differs: {unlike}" if unlike else ""
    return f"differs by up to {difference:.2e} ({where})", difference


def recheck_folds(
    client: mlflow.MlflowClient,
    root: mlflow.entities.Run,
    folds: dict[Fold, mlflow.entities.Run],
    tests: dict[Fold, pd.DataFrame],
    param_names: dict[str, str] | None = None,
) -> None:
    """Recheck every fold's logged model against its logged test scores; tag each fold run with the outcome.

    `param_names` maps the names the check reads (data_dir, image_size, batch_size) to the step's own param names,
    where they differ (step 5 logs its config's sections: `data.image_size`, ...)."""
    outcomes = {}
    for fold, run in folds.items():
        params = {**root.data.params, **run.data.params}
        params.update({name: params[logged] for name, logged in (param_names or {}).items() if logged in params})
        check, _ = recheck_model(model_run_id(run), params, root.data.tags, tests[fold])
        client.set_tag(run.info.run_id, "model_check", check.split(":")[0])
        outcomes[fold] = check
    identical = sum(check.startswith("identical") for check in outcomes.values())
    print(f"Model check: {identical} of {len(outcomes)} fold models reproduce their logged test scores bit for bit")
    for fold, check in outcomes.items():
        if not check.startswith("identical"):
            print(f"  fold {fold[0]}/{fold[1]}: {check}")
