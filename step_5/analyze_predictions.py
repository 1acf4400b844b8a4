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
the ML Reproducibility Checklist (Pineau et al. 2021), printed and logged as `analysis/reproducibility_report.md`
(support/report.py). In support/ too: the statistics (cv_stats.py), reading the folds and checking their models
(fold_runs.py), the figures (figures.py), the comparison (compare.py) and the searches (searches.py).

    python step_5/analyze_predictions.py                          # the latest complete step-5 root run
    python step_5/analyze_predictions.py --run-id RUN_ID
    python step_5/analyze_predictions.py --storage other.journal  # the studies are no longer where train.py ran
    python step_5/analyze_predictions.py --compare RUN_A RUN_B    # two root runs made on the same split file
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per fold would bury the results
import mlflow  # noqa: E402
from mlflow.entities import Metric, RunTag  # noqa: E402

from support import common  # noqa: E402
from support.compare import compare  # noqa: E402
from support.cv_stats import interval_warning, summarise, summary_metrics  # noqa: E402
from support.figures import log_figures, plot_fold_rocs, plot_forest  # noqa: E402
from support.fold_runs import find_run, fold_table, gather_folds, print_folds, recheck_folds  # noqa: E402
from support.report import build_report  # noqa: E402
from support.searches import chosen_table, log_search_figures, plot_chosen, print_chosen  # noqa: E402

EXPERIMENT = "step_5"  # where step_5/train.py records its runs
MORE_FOLDS = "python step_5/train.py --set cv.n_root_splits=None (jobs with one config pool)"  # for a narrower interval
PARAM_NAMES = {"data_dir": "data.data_dir", "image_size": "data.image_size", "batch_size": "training.batch_size"}


def analyse(client: mlflow.MlflowClient, run: mlflow.entities.Run, storage: str | None = None) -> None:
    """Per-fold metrics, the mean test ROC AUC with its corrected interval, the searches, logged onto the root run."""
    run_id = run.info.run_id
    folds, roots = gather_folds(client, run, EXPERIMENT)
    table, tests = fold_table(folds)
    print(
        f"Run {run_id}: {len(table)} completed fold(s) from {len(roots)} root run(s) with run key "
        f"{run.data.tags['run_key']}; test metrics at each fold's threshold (fitted on its dev set)"
    )
    print_folds(table)
    summary, verdict = summarise(table)
    print(f"\n{verdict}")
    if warning := interval_warning(summary["n_outer"], MORE_FOLDS):
        print(warning)

    # MlflowClient logs onto the finished run without reopening it (mlflow.start_run would make it RUNNING)
    now = mlflow.utils.time.get_current_time_millis()
    values = summary_metrics(table, summary)
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
    log_figures(client, run_id, figures)
    log_search_figures(client, run, folds, storage)
    recheck_folds(client, run, folds, tests, PARAM_NAMES)
    report = build_report(client, run, folds, table, summary)
    print(f"\n{report}")
    client.log_text(run_id, report, "analysis/reproducibility_report.md")
    print(
        f"Logged analysis_* metrics, analysis/{{fold_metrics,chosen_hyperparameters}}.json, "
        f"analysis/reproducibility_report.md and figures/{{{','.join(figures)}}}.png onto run {run_id}"
    )


def main(argv: list[str] | None = None) -> None:
    """Analyse one configuration's folds and log the results onto its root run, or compare two configurations."""
    parser = common.parser(__doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run-id", help="the root run to analyse (default: the latest complete step-5 root run)")
    which.add_argument(
        "--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two root runs made on the same split file"
    )
    parser.add_argument("--storage", help="where the Optuna studies are (default: where train.py logged them)")
    args = parser.parse_args(argv)

    client = mlflow.MlflowClient()  # MLflow's default store (./mlflow.db), or MLFLOW_TRACKING_URI
    if args.compare:
        compare(client, *args.compare, EXPERIMENT, MORE_FOLDS)
    else:
        analyse(client, find_run(client, args.run_id, EXPERIMENT), args.storage)


if __name__ == "__main__":
    main()
