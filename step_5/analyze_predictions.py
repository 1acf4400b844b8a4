"""Step 5 — analyse a step-5 experiment: the folds' test results with a 95% interval, their searches, a report.

Gathers the completed fold runs of every root run with the chosen root run's run key (folds run as separate
jobs, on several machines, are analysed together), prints each fold's metrics at its own threshold (fitted on
its dev set), and the mean test ROC AUC across folds with a 95% interval that accounts for the folds' overlapping
training sets: the corrected resampled t interval of Nadeau & Bengio (2003). Logs the numbers (`analysis_*`
metrics), the per-fold table (`analysis/fold_metrics.json`) and two figures (`figures/`) onto the root run
without reopening it: it stays FINISHED. `--compare` tests whether two configurations differ, fold by fold.
New in step 4: each fold's Optuna study, as its optimisation history and parameter importances
(`figures/search/`), and the hyper-parameters every fold chose side by side (`figures/chosen_hyperparameters.png`,
`analysis/chosen_hyperparameters.json`): a stable method picks similar values in every fold.
New in step 5: a one-page reproducibility report of the root run, from MLflow's records alone, by the items of
the ML Reproducibility Checklist (Pineau et al. 2021), printed and logged as `analysis/reproducibility_report.md`.

    python step_5/analyze_predictions.py                          # the latest complete step-5 root run
    python step_5/analyze_predictions.py --run-id RUN_ID
    python step_5/analyze_predictions.py --storage other.journal  # the studies are no longer where train.py ran
    python step_5/analyze_predictions.py --compare RUN_A RUN_B    # two root runs made on the same split file
"""

from __future__ import annotations

import argparse
import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write PNG files; never open a window (headless machines, SSH, CI)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per fold would bury the results
os.environ.setdefault("MKL_CBWR", "AUTO")  # MKL in the reproducible mode that train.py runs it in, set before
os.environ.setdefault("MKL_DYNAMIC", "FALSE")  # torch loads it: the model check must recompute the same bits
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from mlflow.artifacts import load_dict, load_text  # noqa: E402
from mlflow.entities import Metric, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from report import build_report  # noqa: E402
from scipy import stats  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
    roc_curve,
)
from torch.utils.data import DataLoader  # noqa: E402

import studies  # noqa: E402
from train import PetImages  # noqa: E402

EXPERIMENT = "step_5"  # where step_5/train.py records its runs
CONFIDENCE = 0.95
FEW_OUTER_FOLDS = 5  # with fewer outer folds the t quantile is large (J = 2: 12.7, J = 4: 3.2): say so


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
    """The dev and test prediction tables logged on the fold run's refit run."""
    uri = f"runs:/{run.data.tags['refit_run_id']}/predictions"
    return {name: pd.read_csv(io.StringIO(load_text(f"{uri}/{name}_predictions.csv"))) for name in ("dev", "test")}


@torch.no_grad()
def recheck_model(run_id: str, params: dict[str, str], test: pd.DataFrame) -> tuple[str, float]:
    """Load the run's MLflow model, predict its test images again, compare with the logged scores bit for bit."""
    folder = Path(params.get("data.data_dir", "?")) / "oxford-iiit-pet" / "images"
    paths = [folder / name for name in test["file"]]
    if not all(path.is_file() for path in paths):
        return f"skipped: the test images are not in {folder} (run this where train.py ran)", float("nan")
    torch.set_num_threads(int(params["num_threads"]))  # another thread count adds floats in another order
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    images = PetImages(paths, test["label"].to_numpy(), int(params["data.image_size"]), augment=False, seed=0)
    batches = DataLoader(images, batch_size=int(params["training.batch_size"]))
    scores = np.concatenate([torch.sigmoid(model(x)).reshape(-1).numpy() for x, _ in batches])
    difference = float(np.max(np.abs(scores - test["score"].to_numpy(np.float32))))
    if difference == 0:
        return "identical: the logged model reproduces the logged test scores bit for bit", difference
    where = f"trained on {params['device']}, checked on the CPU" if params["device"] != "cpu" else "same device"
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


# ----------------------------------------------------------------------------------------------------------
# Statistics across folds. The folds' training sets overlap, so their results are correlated and the usual
# standard error s/sqrt(J) is too small. Nadeau & Bengio (2003, "Inference for the generalization error")
# inflate the variance of the mean from s²/J to (1/J + n_test/n_train)·s²: the corrected resampled t.
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


def interval_warning(n_outer: int, confidence: float = CONFIDENCE) -> str | None:
    """A plain warning when too few outer folds were run for a useful interval, else None."""
    more = "run more outer folds: python step_5/train.py --set cv.n_root_splits=None (jobs with one config pool)"
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


# ----------------------------------------------------------------------------------------------------------
# Folds: the completed fold runs of one configuration, from every root run that shares its run key
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
    client: mlflow.MlflowClient, root: mlflow.entities.Run
) -> tuple[dict[tuple[int, int], mlflow.entities.Run], list[mlflow.entities.Run]]:
    """The latest completed run of each fold, over all root runs sharing this root's run key; and those roots."""
    run_id, key = root.info.run_id, root.data.tags.get("run_key")
    if root.data.tags.get("run_level") != "root" or key is None:
        raise SystemExit(f"Run {run_id} is not a root run of step_5/train.py (no run_key tag): pass a root run's id.")
    experiment_id = root.info.experiment_id
    roots = search_all(client, experiment_id, f"tags.run_level = 'root' AND tags.run_key = '{key}'")
    if len({r.data.tags.get("split_file_digest") for r in roots}) > 1:
        raise SystemExit(f"The root runs with run key {key} were made on different split files: remove the stray ones.")
    root_ids = {r.info.run_id for r in roots}
    latest: dict[tuple[int, int], mlflow.entities.Run] = {}
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


def fold_table(
    client: mlflow.MlflowClient, folds: dict[tuple[int, int], mlflow.entities.Run]
) -> tuple[pd.DataFrame, dict[tuple[int, int], pd.DataFrame]]:
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


def print_folds(table: pd.DataFrame) -> None:
    """The per-fold table, without run ids."""
    print(table.drop(columns="run_id").to_string(index=False, float_format="{:.3f}".format))


def recheck_folds(
    client: mlflow.MlflowClient,
    root: mlflow.entities.Run,
    folds: dict[tuple[int, int], mlflow.entities.Run],
    tests: dict[tuple[int, int], pd.DataFrame],
) -> None:
    """Recheck every fold's logged model against its logged test scores; tag each fold run with the outcome."""
    outcomes = {}
    for fold, run in folds.items():
        check, _ = recheck_model(run.data.tags["refit_run_id"], {**root.data.params, **run.data.params}, tests[fold])
        client.set_tag(run.info.run_id, "model_check", check.split(":")[0])
        outcomes[fold] = check
    identical = sum(check.startswith("identical") for check in outcomes.values())
    print(f"Model check: {identical} of {len(outcomes)} fold models reproduce their logged test scores bit for bit")
    for fold, check in outcomes.items():
        if not check.startswith("identical"):
            print(f"  fold {fold[0]}/{fold[1]}: {check}")


# ----------------------------------------------------------------------------------------------------------
# Searches: the hyper-parameters each fold chose, and each fold's Optuna study
def chosen_table(
    root: mlflow.entities.Run, folds: dict[tuple[int, int], mlflow.entities.Run]
) -> tuple[pd.DataFrame, dict]:
    """One row per fold with the numeric hyper-parameters its search chose (the fold run's params); their space."""
    declared = load_dict(f"runs:/{root.info.run_id}/search/search_setup.json")["search_space"]
    space = {name: spec for name, spec in declared.items() if all(is_number(v) for v in bounds(spec))}
    rows = [
        {
            "root_split": root_split,
            "nested_split": nested_split,
            "best_trial": int(run.data.tags["best_trial_number"]),
            **{name: float(run.data.params[name]) for name in space},
        }
        for (root_split, nested_split), run in folds.items()
    ]
    return pd.DataFrame(rows), space


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def bounds(declared: dict) -> list:
    """A declared hyper-parameter's choices, or its [low, high] (config/search_space.json)."""
    kind, spec = next((kind, spec) for kind, spec in declared.items() if kind.startswith("suggest_"))
    return list(spec["choices"]) if kind == "suggest_categorical" else [spec["low"], spec["high"]]


def on_log_scale(declared: dict) -> bool:
    """Whether a hyper-parameter was searched on a log scale, as its declaration in the config says."""
    return any(spec.get("log") for kind, spec in declared.items() if kind.startswith("suggest_"))


def print_chosen(chosen: pd.DataFrame, space: dict) -> None:
    """The chosen values per fold, and how far apart they are across folds."""
    print("\nHyper-parameters chosen by each fold's search (a stable method picks similar values):")
    print(chosen.to_string(index=False, float_format="{:.3g}".format))
    for name in space:
        low, high = chosen[name].min(), chosen[name].max()
        spread = (
            f"largest / smallest = {high / low:.1f}x"
            if on_log_scale(space[name]) and low > 0
            else f"range {high - low:.3g}"
        )
        searched = bounds(space[name])
        print(f"  {name}: {low:.3g} to {high:.3g} ({spread}; searched {searched[0]:g} to {searched[-1]:g})")


def plot_chosen(chosen: pd.DataFrame, space: dict) -> plt.Figure:
    """One strip per hyper-parameter over its searched range, one dot per fold, coloured by outer fold."""
    fig, axes = plt.subplots(len(space), 1, figsize=(6.5, 0.85 * len(space) + 0.9))
    for ax, (name, declared) in zip(axes, space.items(), strict=True):
        for root_split, group in chosen.groupby("root_split"):
            y = group["nested_split"] * 0.15  # the nested repeats of one outer fold one above the other
            ax.scatter(group[name], y, color=plt.cm.tab10(root_split % 10), s=30, label=f"outer fold {root_split}")
        searched = bounds(declared)
        choices = "suggest_categorical" in declared  # a list of choices, e.g. the head's width
        if choices or on_log_scale(declared):
            ax.set_xscale("log", base=2 if choices else 10)
            low, high = searched[0], searched[-1]
            decades = [10.0**k for k in range(math.ceil(math.log10(low)), math.floor(math.log10(high)) + 1)]
            ticks = searched if choices else sorted({low, high, *decades})
            ax.set_xticks(ticks, [f"{tick:g}" for tick in ticks])
            ax.minorticks_off()
            ax.set_xlim(low / 1.2, high * 1.2)
        else:
            ax.set_xlim(searched[0], searched[-1])
        ax.set_yticks([])
        ax.set_ylim(-0.3, 0.15 * chosen["nested_split"].max() + 0.3)
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
    axes[0].set_title("Hyper-parameters chosen in each fold (x axis: the searched range)")
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def log_search_figures(
    client: mlflow.MlflowClient,
    root: mlflow.entities.Run,
    folds: dict[tuple[int, int], mlflow.entities.Run],
    storage: str | None,
) -> None:
    """Each fold's optimisation history and parameter importances (Optuna's plots), logged onto the root run."""
    storage = storage or root.data.tags.get("optuna_storage", studies.DEFAULT_STORAGE)
    if not (studies.is_url(storage) or Path(storage).is_file()):
        print(f"No search figures: no Optuna journal at {storage} (pass --storage where the studies are kept)")
        return
    if ":***@" in storage:  # train.py logged a database URL without its password
        print(f"No search figures: the logged storage {storage} hides its password; pass --storage with the full URL")
        return
    opened = studies.open_storage(storage)
    for (root_split, nested_split), run in folds.items():
        name = run.data.tags["optuna_study"]
        try:
            study = optuna.load_study(study_name=name, storage=opened)
        except KeyError:
            print(f"No search figures for fold {root_split}/{nested_split}: study {name} is not in {storage}")
            continue
        n_complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        with warnings.catch_warnings(record=True) as caught:  # Optuna's warnings go into the titles instead
            warnings.simplefilter("always")
            plots = {
                "history": optuna.visualization.matplotlib.plot_optimization_history(study),
                "epochs": optuna.visualization.matplotlib.plot_intermediate_values(study),
                "importances": optuna.visualization.matplotlib.plot_param_importances(study),
            }
        too_few = any("too small to compute importances" in str(w.message) for w in caught)
        titles = {
            "history": "dev ROC AUC of each completed trial",
            "epochs": "dev ROC AUC after each epoch, pruned trials included",
            "importances": f"parameter importances, {n_complete} completed trial(s)"
            + ("\n(too few to compute them: Optuna shows them as equal)" if too_few else "")
            + ("\n(from so few trials they say little)" if 1 < n_complete < 10 and not too_few else ""),
        }
        plots["epochs"].set_xlabel("epoch (warm-up epochs first, then fine-tuning)")
        for kind, ax in plots.items():
            ax.set_title("")  # Optuna's own titles (centre or left)
            ax.set_title("", loc="left")
            ax.set_title(f"Fold {root_split}/{nested_split}: {titles[kind]}", loc="left")
        for kind, ax in plots.items():
            path = f"figures/search/fold-{root_split}-{nested_split}_{kind}.png"
            client.log_figure(root.info.run_id, ax.figure, path, save_kwargs={"dpi": 110, "bbox_inches": "tight"})
            plt.close(ax.figure)
    print("Logged each fold's optimisation history and parameter importances under figures/search/")


def analyse(client: mlflow.MlflowClient, run: mlflow.entities.Run, storage: str | None = None) -> None:
    """Per-fold metrics, the mean test ROC AUC with its corrected interval, the searches, logged onto the root run."""
    run_id = run.info.run_id
    folds, roots = gather_folds(client, run)
    table, tests = fold_table(client, folds)
    print(
        f"Run {run_id}: {len(table)} completed fold(s) from {len(roots)} root run(s) with run key "
        f"{run.data.tags['run_key']}; test metrics at each fold's threshold (fitted on its dev set)"
    )
    print_folds(table)
    ratio = table["n_test"].mean() / table["n_train"].mean()
    summary = corrected_t_interval(by_outer_fold(table, "test_roc_auc"), ratio)
    naive = corrected_t_interval(by_outer_fold(table, "test_roc_auc"), 0.0)
    n_outer = summary["n_outer"]
    print(
        f"\nTest ROC AUC over {n_outer} outer fold(s) (each the mean of its nested repeats, which share one test "
        f"set): mean {summary['mean']:.4f}" + (f", SD between outer folds {summary['sd']:.4f}" if n_outer > 1 else "")
    )
    if n_outer > 1:
        print(
            f"95% interval {summary['low']:.4f} to {summary['high']:.4f}: the corrected resampled t interval "
            f"(Nadeau & Bengio 2003). The folds train on overlapping images, so their results are not "
            f"independent; it widens the variance of the mean from s²/J to (1/J + n_test/n_train)·s² = "
            f"(1/{n_outer} + {ratio:.3f})·s², with t from {n_outer - 1} degree(s) of freedom "
            f"(t = {summary['t_quantile']:.2f}). Treating the folds as independent would give "
            f"{naive['low']:.4f} to {naive['high']:.4f}: too narrow."
        )
        if summary["low"] < 0 or summary["high"] > 1:
            print("(A ROC AUC cannot leave [0, 1]: a bound beyond it only shows how wide the interval is.)")
    if warning := interval_warning(n_outer):
        print(warning)

    values = {
        "test_roc_auc_mean": summary["mean"],
        "test_roc_auc_sd": summary["sd"],
        "test_roc_auc_ci_low": summary["low"],
        "test_roc_auc_ci_high": summary["high"],
        "n_outer_folds": n_outer,
        "n_folds": len(table),
        "test_train_ratio": ratio,
        "dev_roc_auc_mean": np.mean([np.mean(v) for v in by_outer_fold(table, "dev_roc_auc")]),
        **{
            f"test_{name}_mean": np.mean([np.mean(v) for v in by_outer_fold(table, f"test_{name}")])
            for name in ("accuracy", "balanced_accuracy", "f1")
        },
    }
    # MlflowClient logs onto the finished run without reopening it (mlflow.start_run would make it RUNNING)
    now = mlflow.utils.time.get_current_time_millis()
    client.log_batch(
        run_id,
        metrics=[Metric(f"analysis_{k}", float(v), now, 0) for k, v in values.items() if math.isfinite(v)],
        tags=[RunTag("analysis_root_runs", ",".join(sorted(r.info.run_id for r in roots)))],
    )
    client.log_table(run_id, table, "analysis/fold_metrics.json")
    chosen, space = chosen_table(run, folds)
    print_chosen(chosen, space)
    client.log_table(run_id, chosen, "analysis/chosen_hyperparameters.json")
    figures = {
        "fold_roc_curves": plot_fold_rocs(tests),
        "forest_plot": plot_forest(table, summary),
        "chosen_hyperparameters": plot_chosen(chosen, space),
    }
    for name, figure in figures.items():
        client.log_figure(run_id, figure, f"figures/{name}.png", save_kwargs={"dpi": 120, "bbox_inches": "tight"})
        plt.close(figure)
    log_search_figures(client, run, folds, storage)
    recheck_folds(client, run, folds, tests)
    report = build_report(client, run, folds, table, summary)
    print(f"\n{report}")
    client.log_text(run_id, report, "analysis/reproducibility_report.md")
    print(
        f"Logged analysis_* metrics, analysis/{{fold_metrics,chosen_hyperparameters}}.json, "
        f"analysis/reproducibility_report.md and figures/{{{','.join(figures)}}}.png onto run {run_id}"
    )


def compare(client: mlflow.MlflowClient, run_a: str, run_b: str) -> None:
    """Compare two root runs made on the same split file, fold by fold: corrected resampled paired t-test."""
    for run_id in (run_a, run_b):
        try:
            client.get_run(run_id)
        except MlflowException:
            raise SystemExit(f"No run with id {run_id} in {mlflow.get_tracking_uri()}: check --compare.") from None
    roots = [find_run(client, run_id) for run_id in (run_a, run_b)]
    gathered = [gather_folds(client, root)[0] for root in roots]
    digests = [root.data.tags.get("split_file_digest") for root in roots]
    if digests[0] != digests[1]:
        raise SystemExit(
            f"Runs {run_a} and {run_b} were made on different split files (split_file_digest {digests[0]} vs "
            f"{digests[1]}): their folds test different images; rerun one on the other's split file to compare."
        )
    if roots[0].data.tags["run_key"] == roots[1].data.tags["run_key"]:
        raise SystemExit(f"Runs {run_a} and {run_b} share their run key: they are one configuration, not two.")
    only_a, only_b = sorted(set(gathered[0]) - set(gathered[1])), sorted(set(gathered[1]) - set(gathered[0]))
    if only_a or only_b:
        raise SystemExit(
            f"Runs {run_a} and {run_b} completed different folds (only in the first: {only_a or 'none'}; only in "
            f"the second: {only_b or 'none'}): complete the same folds in both, then compare."
        )
    table_a, _ = fold_table(client, gathered[0])
    table_b, _ = fold_table(client, gathered[1])
    table = table_a.merge(table_b, on=["root_split", "nested_split"], suffixes=("_a", "_b"))
    table["difference"] = table["test_roc_auc_a"] - table["test_roc_auc_b"]
    ratio = (table["n_test_a"].mean() + table["n_test_b"].mean()) / (
        table["n_train_a"].mean() + table["n_train_b"].mean()
    )
    result = corrected_paired_t_test(by_outer_fold(table, "difference"), ratio)
    print(f"A = {run_a}, B = {run_b}: test ROC AUC per fold")
    print(
        table[["root_split", "nested_split", "test_roc_auc_a", "test_roc_auc_b", "difference"]].to_string(
            index=False, float_format="{:.4f}".format
        )
    )
    print(f"\nMean difference A − B over {result['n_outer']} outer fold(s): {result['mean']:+.4f}")
    if result["n_outer"] > 1:
        print(
            f"95% interval {result['low']:+.4f} to {result['high']:+.4f}, t = {result['t']:.2f} with {result['df']} "
            f"degree(s) of freedom, two-sided p = {result['p']:.3g}: the corrected resampled paired t-test "
            f"(Nadeau & Bengio 2003), per outer fold the mean difference over its nested repeats, its variance "
            f"widened by n_test/n_train = {ratio:.3f} for the overlapping training sets."
        )
    if warning := interval_warning(result["n_outer"]):
        print(warning)


def main(argv: list[str] | None = None) -> None:
    """Analyse one configuration's folds and log the results onto its root run, or compare two configurations."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run-id", help="the root run to analyse (default: the latest complete step-5 root run)")
    which.add_argument(
        "--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two root runs made on the same split file"
    )
    parser.add_argument("--storage", help="where the Optuna studies are (default: where train.py logged them)")
    args = parser.parse_args(argv)

    client = mlflow.MlflowClient()  # MLflow's default store (./mlflow.db), or MLFLOW_TRACKING_URI
    if args.compare:
        compare(client, *args.compare)
    else:
        analyse(client, find_run(client, args.run_id), args.storage)


if __name__ == "__main__":
    main()
