"""The figures of the folds, byte-identical in steps 3 to 5: every fold's test ROC curve, the forest plot of the
test ROC AUCs with their mean and interval, and logging figures onto a finished run as PNG files."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # write PNG files; never open a window (headless machines, SSH, CI)
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def plot_fold_rocs(tests: dict[tuple[int, int], pd.DataFrame]) -> plt.Figure:
    """Every fold's test ROC curve in one figure, one colour per outer fold."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for (root_split, nested_split), table in tests.items():
        fpr, tpr, _ = roc_curve(table["label"], table["score"])
        label = f"outer fold {root_split}" if nested_split == min(n for r, n in tests if r == root_split) else None
        ax.plot(fpr, tpr, c=plt.cm.tab10(root_split % 10), lw=1, alpha=0.7, label=label)
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Test ROC curve of every fold (cat)")
    ax.legend(fontsize="small")
    return fig


def plot_forest(table: pd.DataFrame, summary: dict[str, float]) -> plt.Figure:
    """Test ROC AUC per fold: nested repeats as dots, outer-fold means as squares, the mean and interval as a band."""
    outer = table.groupby("root_split")["test_roc_auc"]
    fig, ax = plt.subplots(figsize=(6, 1.5 + 0.4 * outer.ngroups))
    for y, (_, values) in enumerate(outer):
        ax.plot(values, [y] * len(values), "o", c="grey", alpha=0.6, ms=4, label="nested repeat" if y == 0 else None)
        ax.plot(values.mean(), y, "s", c="k", ms=7, label="outer-fold mean" if y == 0 else None)
    ax.axvline(summary["mean"], c="C0", label=f"mean {summary['mean']:.3f}")
    if summary["n_outer"] > 1:
        label = f"95% interval {summary['low']:.3f} to {summary['high']:.3f}"
        ax.axvspan(summary["low"], summary["high"], color="C0", alpha=0.15, label=label)
        left, right = ax.get_xlim()
        ax.set_xlim(max(left, 0.0), min(right, 1.0))  # a ROC AUC lives in [0, 1], even when the interval does not
    ax.set_yticks(range(outer.ngroups), [f"outer fold {r}" for r in outer.groups])
    ax.invert_yaxis()
    ax.set(xlabel="test ROC AUC", title="Test ROC AUC per fold")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def log_figures(client: mlflow.MlflowClient, run_id: str, figures: dict[str, plt.Figure]) -> None:
    """Log each figure onto the run as figures/<name>.png (the run is not reopened), then close it."""
    for name, figure in figures.items():
        client.log_figure(run_id, figure, f"figures/{name}.png", save_kwargs={"dpi": 120, "bbox_inches": "tight"})
        plt.close(figure)
