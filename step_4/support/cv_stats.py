"""Statistics across folds: the test metrics at a fold's threshold, and the corrected resampled t interval and
paired t-test of Nadeau & Bengio (2003), byte-identical in steps 3 to 5.

The folds' training sets overlap, so their results are correlated and the usual standard error s/sqrt(J) is too
small. Nadeau & Bengio ("Inference for the generalization error", Machine Learning 52, 2003) inflate the variance
of the mean from s²/J to (1/J + n_test/n_train)·s²: the corrected resampled t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

CONFIDENCE = 0.95
FEW_OUTER_FOLDS = 5  # with fewer outer folds the t quantile is large (J = 2: 12.7, J = 4: 3.2): say so


def metrics_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Threshold-free ROC AUC and the metrics of the decisions `score >= threshold` (1 = cat)."""
    decisions = (scores >= threshold).astype(int)
    return {
        "roc_auc": roc_auc_score(labels, scores),
        "accuracy": accuracy_score(labels, decisions),
        "balanced_accuracy": balanced_accuracy_score(labels, decisions),
        "f1": f1_score(labels, decisions),
    }


def corrected_t_interval(
    values_by_outer_fold: Sequence[Sequence[float]], ratio: float, confidence: float = CONFIDENCE
) -> dict[str, float]:
    """Mean, SD and corrected resampled t interval of per-fold values, nested repeats averaged per outer fold.

    The nested repeats of one outer fold share its test set, so they are averaged first; with J outer-fold means
    (mean m, sample variance s²) the interval is m ± t_{(1+confidence)/2, J-1} · sqrt((1/J + ratio) · s²), where
    ratio = n_test / n_train. With one outer fold there is no interval (NaN): no spread can be estimated.
    """
    means = np.array([np.mean(values) for values in values_by_outer_fold], dtype=float)
    n_outer = len(means)
    result = {"mean": float(np.mean(means)), "n_outer": n_outer, "df": n_outer - 1}
    if n_outer < 2:
        return {**result, "sd": math.nan, "se": math.nan, "t_quantile": math.nan, "low": math.nan, "high": math.nan}
    variance = float(np.var(means, ddof=1))
    se = math.sqrt((1 / n_outer + ratio) * variance)
    t_quantile = float(stats.t.ppf((1 + confidence) / 2, n_outer - 1))
    return {
        **result,
        "sd": math.sqrt(variance),
        "se": se,
        "t_quantile": t_quantile,
        "low": result["mean"] - t_quantile * se,
        "high": result["mean"] + t_quantile * se,
    }


def corrected_paired_t_test(
    differences_by_outer_fold: Sequence[Sequence[float]], ratio: float, confidence: float = CONFIDENCE
) -> dict[str, float]:
    """Corrected resampled paired t-test of per-fold differences: the interval above plus t and two-sided p.

    t = d̄ / sqrt((1/J + ratio) · s_d²) with J − 1 degrees of freedom, d̄ and s_d² over the outer-fold means of
    the differences. With one outer fold, t and p are NaN.
    """
    result = corrected_t_interval(differences_by_outer_fold, ratio, confidence)
    if result["n_outer"] < 2:
        return {**result, "t": math.nan, "p": math.nan}
    if result["se"] == 0:  # identical differences in every fold: no spread to test against
        t = 0.0 if result["mean"] == 0 else math.copysign(math.inf, result["mean"])
    else:
        t = result["mean"] / result["se"]
    return {**result, "t": t, "p": float(2 * stats.t.sf(abs(t), result["df"]))}


def by_outer_fold(table: pd.DataFrame, column: str) -> list[list[float]]:
    """A column's values grouped by outer fold (root split), in root-split order."""
    return table.groupby("root_split")[column].apply(list).tolist()


def outer_mean(table: pd.DataFrame, column: str) -> float:
    """The mean over outer folds of a column's outer-fold means (nested repeats averaged first)."""
    return float(np.mean([np.mean(values) for values in by_outer_fold(table, column)]))


def interval_warning(n_outer: int, more: str, confidence: float = CONFIDENCE) -> str | None:
    """A plain warning when too few outer folds were run for a useful interval, else None; `more` says how to run
    more of them (the step's own command)."""
    more = f"run more outer folds: {more}"
    if n_outer < 2:
        return (
            f"Only 1 outer fold is complete: no interval, since one test set shows no spread between test sets; {more}."
        )
    if n_outer < FEW_OUTER_FOLDS:
        t = stats.t.ppf((1 + confidence) / 2, n_outer - 1)
        return (
            f"Warning: only {n_outer} outer folds, so {n_outer - 1} degree(s) of freedom and t = {t:.1f} "
            f"(with 10 outer folds: {stats.t.ppf((1 + confidence) / 2, 9):.2f}): the interval is very wide; {more}."
        )
    return None


def summarise(table: pd.DataFrame) -> tuple[dict[str, float], str]:
    """The mean test ROC AUC with its corrected interval, and what it means in words, from the per-fold table."""
    ratio = table["n_test"].mean() / table["n_train"].mean()
    summary = {**corrected_t_interval(by_outer_fold(table, "test_roc_auc"), ratio), "ratio": ratio}
    naive = corrected_t_interval(by_outer_fold(table, "test_roc_auc"), 0.0)
    n_outer = summary["n_outer"]
    lines = [
        f"Test ROC AUC over {n_outer} outer fold(s) (each the mean of its nested repeats, which share one test "
        f"set): mean {summary['mean']:.4f}" + (f", SD between outer folds {summary['sd']:.4f}" if n_outer > 1 else "")
    ]
    if n_outer > 1:
        lines.append(
            f"95% interval {summary['low']:.4f} to {summary['high']:.4f}: the corrected resampled t interval "
            f"(Nadeau & Bengio 2003). The folds train on overlapping images, so their results are not "
            f"independent; it widens the variance of the mean from s²/J to (1/J + n_test/n_train)·s² = "
            f"(1/{n_outer} + {ratio:.3f})·s², with t from {n_outer - 1} degree(s) of freedom "
            f"(t = {summary['t_quantile']:.2f}). Treating the folds as independent would give "
            f"{naive['low']:.4f} to {naive['high']:.4f}: too narrow."
        )
        if summary["low"] < 0 or summary["high"] > 1:
            lines.append("(A ROC AUC cannot leave [0, 1]: a bound beyond it only shows how wide the interval is.)")
    return summary, "\n".join(lines)


def summary_metrics(table: pd.DataFrame, summary: dict[str, float]) -> dict[str, float]:
    """The numbers of the analysis, by name (logged as `analysis_<name>` metrics)."""
    return {
        "test_roc_auc_mean": summary["mean"],
        "test_roc_auc_sd": summary["sd"],
        "test_roc_auc_ci_low": summary["low"],
        "test_roc_auc_ci_high": summary["high"],
        "n_outer_folds": summary["n_outer"],
        "n_folds": len(table),
        "test_train_ratio": summary["ratio"],
        "dev_roc_auc_mean": outer_mean(table, "dev_roc_auc"),
        **{f"test_{name}_mean": outer_mean(table, f"test_{name}") for name in ("accuracy", "balanced_accuracy", "f1")},
    }
