"""Step 2 — analyse a step-2 run: read its predictions from MLflow, log metrics and figures back onto it.

Prints ROC AUC, accuracy, balanced accuracy, F1 and the confusion matrix of the test set at the threshold
fitted on dev, and logs them (as `analysis_test_*` metrics) and the ROC curve, the score distribution of each
class and the confusion matrix (PNG files under `figures/`) onto the run. The run is not reopened: it stays
FINISHED. It also loads the run's logged MLflow model, predicts the test images again and says whether the
scores equal the logged ones bit for bit (tag `model_check`): the model on record is the model that was tested.

    python step_2/analyze_predictions.py                 # the latest finished step-2 run
    python step_2/analyze_predictions.py --run-id RUN_ID
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write PNG files; never open a window (headless machines, SSH, CI)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small download is noise
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from mlflow.artifacts import load_text  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    RocCurveDisplay,
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from provenance import follow_code_paths  # noqa: E402
from support import (
    common,  # noqa: E402
    pets,  # noqa: E402
)

EXPERIMENT = "step_2"  # where step_2/train.py records its runs


def find_run(client: mlflow.MlflowClient, run_id: str | None) -> mlflow.entities.Run:
    """The run asked for, or the latest completed root run of the experiment; one clear sentence otherwise."""
    if run_id is None:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = (
            []
            if experiment is None
            else client.search_runs(
                [experiment.experiment_id],
                "tags.run_level = 'root' AND tags.run_complete = 'true' AND attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
        )
        if not runs:
            raise SystemExit(
                f"No finished {EXPERIMENT} run in {mlflow.get_tracking_uri()}: run "
                f"`python {EXPERIMENT}/train.py --quick` first (from the same directory)."
            )
        return runs[0]
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise SystemExit(f"No run with id {run_id} in {mlflow.get_tracking_uri()}: check --run-id.") from None
    if run.info.status != "FINISHED" or run.data.tags.get("run_complete") != "true":
        raise SystemExit(f"Run {run_id} is {run.info.status} and did not complete: it has no predictions to analyse.")
    return run


def load_results(run: mlflow.entities.Run) -> dict[str, pd.DataFrame]:
    """The dev and test prediction tables logged on the run."""
    uri = f"runs:/{run.info.run_id}/predictions"
    return {name: pd.read_csv(io.StringIO(load_text(f"{uri}/{name}_predictions.csv"))) for name in ("dev", "test")}


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
    images, size = [pets.model_input(path, int(params["image_size"])) for path in paths], int(params["batch_size"])
    batches = [torch.stack(images[i : i + size]) for i in range(0, len(images), size)]  # as train.py's loader
    scores = np.concatenate([torch.sigmoid(model(x)).reshape(-1).numpy() for x in batches])
    difference = float(np.max(np.abs(scores - test["score"].to_numpy(np.float32))))
    if difference == 0:
        return "identical: the logged model reproduces the logged test scores bit for bit", difference
    where = f"trained on {params['device']}, checked on the CPU" if params["device"] != "cpu" else "same device"
    where += f"; the CPU's code path differs: {unlike}" if unlike else ""
    return f"differs by up to {difference:.2e} ({where})", difference


def metrics_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Threshold-free ROC AUC and the metrics of the decisions `score >= threshold` (1 = cat)."""
    decisions = (scores >= threshold).astype(int)
    return {
        "roc_auc": roc_auc_score(labels, scores),
        "accuracy": accuracy_score(labels, decisions),
        "balanced_accuracy": balanced_accuracy_score(labels, decisions),
        "f1": f1_score(labels, decisions),
    }


def plot_roc(tables: dict[str, pd.DataFrame]) -> plt.Figure:
    """ROC curves of dev and test in one figure."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, table in tables.items():
        RocCurveDisplay.from_predictions(table["label"], table["score"], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="chance")
    ax.set_title("ROC curve (positive class: cat)")
    return fig


def plot_score_distributions(table: pd.DataFrame, threshold: float) -> plt.Figure:
    """Histograms of the predicted cat probability for cats and for dogs, with the threshold."""
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 26)
    for label, name in ((1, "cats"), (0, "dogs")):
        ax.hist(table.loc[table["label"] == label, "score"], bins=bins, alpha=0.6, label=name)
    ax.axvline(threshold, c="k", ls="--", label=f"threshold {threshold:.2f}")
    ax.set(xlabel="predicted probability of cat", ylabel="test images", title="Test score distribution per class")
    ax.legend()
    return fig


def plot_confusion_matrix(matrix: np.ndarray) -> plt.Figure:
    """The test confusion matrix at the threshold, as a picture."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ConfusionMatrixDisplay(matrix, display_labels=["cat", "dog"]).plot(ax=ax, colorbar=False)
    ax.set_title("Test confusion matrix")
    return fig


def main(argv: list[str] | None = None) -> None:
    """Print the test metrics at the run's threshold and log them and the figures onto the run."""
    parser = common.parser(__doc__)
    parser.add_argument("--run-id", help="the run to analyse (default: the latest finished step-2 root run)")
    args = parser.parse_args(argv)

    client = mlflow.MlflowClient()  # MLflow's default store (./mlflow.db), or MLFLOW_TRACKING_URI
    run = find_run(client, args.run_id)
    run_id, threshold = run.info.run_id, run.data.metrics["threshold"]
    tables = load_results(run)
    test = tables["test"]
    print(f"Run {run_id}: test set of {len(test)} images, threshold {threshold:.3f} (fitted on dev)")
    metrics = metrics_at(test["label"].to_numpy(), test["score"].to_numpy(), threshold)
    for name, value in metrics.items():
        print(f"  {name:18s} {value:.3f}")
    matrix = confusion_matrix(test["label"], (test["score"] >= threshold).astype(int), labels=[1, 0])
    print(pd.DataFrame(matrix, index=["true cat", "true dog"], columns=["predicted cat", "predicted dog"]))
    counts = dict(zip(("true_cats", "missed_cats", "false_cats", "true_dogs"), matrix.ravel(), strict=True))
    check, difference = recheck_model(run_id, run.data.params, run.data.tags, test)
    print(f"Model check: {check}")

    # MlflowClient logs onto the finished run without reopening it (mlflow.start_run would make it RUNNING)
    now = mlflow.utils.time.get_current_time_millis()
    values = {**metrics, **counts, "model_max_abs_difference": difference}
    client.log_batch(run_id, [Metric(f"analysis_test_{k}", float(v), now, 0) for k, v in values.items()])
    client.set_tag(run_id, "model_check", check.split(":")[0])
    figures = {
        "roc_curve": plot_roc(tables),
        "score_distributions": plot_score_distributions(test, threshold),
        "confusion_matrix": plot_confusion_matrix(matrix),
    }
    for name, figure in figures.items():
        client.log_figure(run_id, figure, f"figures/{name}.png", save_kwargs={"dpi": 120, "bbox_inches": "tight"})
        plt.close(figure)
    print(f"Logged analysis_test_* metrics and figures/{{{','.join(figures)}}}.png onto run {run_id}")


if __name__ == "__main__":
    main()
