"""Two configurations compared fold by fold (`analyze_predictions.py --compare`), the same in steps 3 to 5 (but for
its imports): the corrected resampled paired t-test of Nadeau & Bengio (2003) on the differences of their test ROC
AUCs."""

from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException

from support.cv_stats import by_outer_fold, corrected_paired_t_test, interval_warning
from support.fold_runs import find_run, fold_table, gather_folds


def compare(client: mlflow.MlflowClient, run_a: str, run_b: str, experiment: str, more: str) -> None:
    """Compare two root runs made on the same split file, fold by fold: corrected resampled paired t-test.

    `more` says how to run more outer folds (the step's own command), for the warning when there are few."""
    for run_id in (run_a, run_b):
        try:
            client.get_run(run_id)
        except MlflowException:
            raise SystemExit(f"No run with id {run_id} in {mlflow.get_tracking_uri()}: check --compare.") from None
    roots = [find_run(client, run_id, experiment) for run_id in (run_a, run_b)]
    gathered = [gather_folds(client, root, experiment)[0] for root in roots]
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
    table_a, _ = fold_table(gathered[0])
    table_b, _ = fold_table(gathered[1])
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
    if warning := interval_warning(result["n_outer"], more):
        print(warning)
