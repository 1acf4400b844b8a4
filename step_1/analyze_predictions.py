"""Step 1 — analyse the predictions that step_1/train.py wrote to results/step_1/.

Prints ROC AUC, accuracy, balanced accuracy, F1 and the confusion matrix of the test set at the threshold
fitted on dev, and saves the ROC curve and the score distribution of each class as PNG files.

    python step_1/analyze_predictions.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write PNG files; never open a window (headless machines, SSH, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    RocCurveDisplay,
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from support import common  # noqa: E402

RESULTS_DIR = Path("results/step_1")  # where train.py wrote (and overwrote) its outputs


def load_results(results_dir: Path) -> tuple[dict[str, pd.DataFrame], float]:
    """The dev and test prediction tables and the dev-fitted threshold, or a clear message if missing."""
    needed = [results_dir / n for n in ("dev_predictions.csv", "test_predictions.csv", "threshold.json")]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise SystemExit(f"Missing {', '.join(missing)}: run `python step_1/train.py --quick` first.")
    tables = {name: pd.read_csv(results_dir / f"{name}_predictions.csv") for name in ("dev", "test")}
    return tables, json.loads((results_dir / "threshold.json").read_text())["threshold"]


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


def main(argv: list[str] | None = None) -> None:
    """Print the test metrics at the saved threshold and save the figures next to the predictions."""
    parser = common.parser(__doc__)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where train.py wrote its outputs")
    args = parser.parse_args(argv)

    tables, threshold = load_results(args.results_dir)
    test = tables["test"]
    print(f"Test set: {len(test)} images, threshold {threshold:.3f} (fitted on dev)")
    for name, value in metrics_at(test["label"].to_numpy(), test["score"].to_numpy(), threshold).items():
        print(f"  {name:18s} {value:.3f}")
    matrix = confusion_matrix(test["label"], (test["score"] >= threshold).astype(int), labels=[1, 0])
    print(pd.DataFrame(matrix, index=["true cat", "true dog"], columns=["predicted cat", "predicted dog"]))

    figures = [args.results_dir / "roc_curve.png", args.results_dir / "score_distributions.png"]
    plot_roc(tables, figures[0])
    plot_score_distributions(test, threshold, figures[1])
    print("Saved " + ", ".join(str(p) for p in figures))


if __name__ == "__main__":
    main()
