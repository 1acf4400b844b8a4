"""Step 2 — analyse a step-2 run: read its predictions from MLflow, log metrics and figures back onto it.

Prints ROC AUC, accuracy, balanced accuracy, F1 and the confusion matrix of the test set at the threshold
fitted on dev, and logs them (as `analysis_test_*` metrics) and the ROC curve, the score distribution of each
class and the confusion matrix (PNG files under `figures/`) onto the run. The run is not reopened: it stays
FINISHED.

    python step_2/analyze_predictions.py                 # the latest finished step-2 run
    python step_2/analyze_predictions.py --run-id RUN_ID
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write PNG files; never open a window (headless machines, SSH, CI)
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
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


def load_results(client: mlflow.MlflowClient, run: mlflow.entities.Run, tmp: Path) -> dict[str, pd.DataFrame]:
    """The dev and test prediction tables logged on the run."""
    folder = Path(client.download_artifacts(run.info.run_id, "predictions", str(tmp)))
    return {name: pd.read_csv(folder / f"{name}_predictions.csv") for name in ("dev", "test")}


def metrics_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Threshold-free ROC AUC and the metrics of the decisions `score >= threshold` (1 = cat)."""
    decisions = (scores >= threshold).astype(int)
    return {
        "roc_auc": roc_auc_score(labels, scores),
        "accuracy": accuracy_score(labels, decisions),
        "balanced_accuracy": balanced_accuracy_score(labels, decisions),
        "f1": f1_score(labels, decisions),
    }


def plot_roc(tables: dict[str, pd.DataFrame], path: Path) -> None:
    """ROC curves of dev and test in one figure."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, table in tables.items():
        RocCurveDisplay.from_predictions(table["label"], table["score"], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="chance")
    ax.set_title("ROC curve (positive class: cat)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_score_distributions(table: pd.DataFrame, threshold: float, path: Path) -> None:
    """Histograms of the predicted cat probability for cats and for dogs, with the threshold."""
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 26)
    for label, name in ((1, "cats"), (0, "dogs")):
        ax.hist(table.loc[table["label"] == label, "score"], bins=bins, alpha=0.6, label=name)
    ax.axvline(threshold, c="k", ls="--", label=f"threshold {threshold:.2f}")
    ax.set(xlabel="predicted probability of cat", ylabel="test images", title="Test score distribution per class")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_confusion_matrix(matrix: np.ndarray, path: Path) -> None:
    """The test confusion matrix at the threshold, as a picture."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ConfusionMatrixDisplay(matrix, display_labels=["cat", "dog"]).plot(ax=ax, colorbar=False)
    ax.set_title("Test confusion matrix")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Print the test metrics at the run's threshold and log them and the figures onto the run."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--run-id", help="the run to analyse (default: the latest finished step-2 root run)")
    args = parser.parse_args(argv)

    client = mlflow.MlflowClient()  # MLflow's default store (./mlflow.db), or MLFLOW_TRACKING_URI
    run = find_run(client, args.run_id)
    run_id, threshold = run.info.run_id, run.data.metrics["threshold"]
    with tempfile.TemporaryDirectory() as tmp:
        tables = load_results(client, run, Path(tmp))
        test = tables["test"]
        print(f"Run {run_id}: test set of {len(test)} images, threshold {threshold:.3f} (fitted on dev)")
        metrics = metrics_at(test["label"].to_numpy(), test["score"].to_numpy(), threshold)
        for name, value in metrics.items():
            print(f"  {name:18s} {value:.3f}")
        matrix = confusion_matrix(test["label"], (test["score"] >= threshold).astype(int), labels=[1, 0])
        print(pd.DataFrame(matrix, index=["true cat", "true dog"], columns=["predicted cat", "predicted dog"]))
        counts = dict(zip(("true_cats", "missed_cats", "false_cats", "true_dogs"), matrix.ravel(), strict=True))

        # MlflowClient logs onto the finished run without reopening it (mlflow.start_run would make it RUNNING)
        now = mlflow.utils.time.get_current_time_millis()
        values = {**metrics, **counts}
        client.log_batch(run_id, [Metric(f"analysis_test_{k}", float(v), now, 0) for k, v in values.items()])
        figures = [Path(tmp) / n for n in ("roc_curve.png", "score_distributions.png", "confusion_matrix.png")]
        plot_roc(tables, figures[0])
        plot_score_distributions(test, threshold, figures[1])
        plot_confusion_matrix(matrix, figures[2])
        for figure in figures:
            client.log_artifact(run_id, str(figure), "figures")
    print(f"Logged analysis_test_* metrics and figures/{{{','.join(f.name for f in figures)}}} onto run {run_id}")


if __name__ == "__main__":
    main()
