"""Optuna studies, one per fold: stored, resumed, and the same trials however many commands or processes run them.

- Stored in `--storage` (a journal file, or a database URL such as `postgresql://…`): the same command again
  resumes a study, keeping its finished trials (complete or pruned), until it has `n_trials` of them.
- The same draws: every trial's sampler is seeded from its slot (0, 1, 2, …), so a redone trial draws the same.
- The refit: the best trial's values, trained again from the state every trial started from, must reach exactly
  the best trial's dev ROC AUC (`check_refit`); only then is the test result that of the model the search chose.
Several processes can share one search: support/sharing.py holds how, and docs/scaling_out.md tells it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlflow
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from support import runs, sharing

optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed by run_trial instead


def open_study(storage: str, name: str, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """The fold's study, created on first use (once, even by processes that start together), resumed after."""
    where = sharing.open_storage(storage)  # a journal file or a database, checked; one sentence when it is not
    try:
        return optuna.create_study(
            study_name=name, storage=where, direction="maximize", pruner=pruner, load_if_exists=True
        )
    except Exception as error:  # noqa: BLE001 - an unreachable database, a bad URL: say which storage failed
        raise SystemExit(f"--storage {sharing.loggable(storage)}: could not open study {name} ({error}).") from None


def log_setup(space: dict, sampler: str, pruner: dict | None, n_trials: int, storage: str) -> None:
    """Log how the studies search, on the active run (search/search_setup.json; tag optuna_storage)."""
    setup = {
        "search_space": space,
        "sampler": f"{sampler}, seeded per trial from (seed, root split, nested split, trial slot)",
        "pruner": pruner,
        "n_trials": n_trials,
        "storage": sharing.loggable(storage),
    }
    mlflow.log_dict(setup, "search/search_setup.json")
    mlflow.set_tag("optuna_storage", sharing.loggable(storage))


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    n_trials: int,
    new_sampler: Callable[..., optuna.samplers.BaseSampler],
    seed: tuple[int, ...],
) -> None:
    """Run trials until the study has n_trials finished (complete or pruned) ones, with any other processes. Each
    trial's sampler is seeded from `seed` (the run's seed, the fold) and its slot: seeded once per process, it would
    draw other values after a resume; seeded per trial, a resumed or shared search draws what one process draws."""
    for trial, slot in sharing.trials(study, n_trials):  # each new trial with its slot, the lowest one free
        study.sampler = new_sampler(seed=int(np.random.SeedSequence([*seed, slot]).generate_state(1)[0]))
        run_trial(study, trial, objective, slot, n_trials)  # draws happen when the objective asks


def run_trial(
    study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], float], slot: int, n_trials: int
) -> None:
    """Run one trial and tell the study how it ended; its MLflow run gets the same state as tag `trial_state`."""
    try:
        with sharing.heartbeat(study, trial):  # on a database: tells other machines' workers this one is alive
            value = objective(trial)
    except optuna.TrialPruned as pruned:
        state, outcome = TrialState.PRUNED, f"pruned: {pruned}"
        study.tell(trial, state=state)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)  # a signal or an error: the next command redoes this trial
        sharing.tag_run(trial, "FAIL")
        raise
    else:
        state, outcome = TrialState.COMPLETE, f"dev ROC AUC {value:.4f}"
        study.tell(trial, value)
    sharing.tag_run(trial, state.name)
    print(f"trial {trial.number} ({slot + 1} of {n_trials}) {outcome} | {brief(trial.params)}")


@contextmanager
def refit_run(best: FrozenTrial) -> Iterator[mlflow.ActiveRun]:
    """The refit's own MLflow run, nested in the fold run; the chosen hyper-parameters are logged on both."""
    mlflow.log_params(best.params)
    tags = {"run_level": "refit", "best_trial_number": str(best.number)}
    with runs.tracked_run(run_name="refit", nested=True, tags=tags) as run:
        mlflow.log_params(best.params)
        yield run


def check_refit(fold: tuple[int, int], best: FrozenTrial, results: dict, refit_run_id: str) -> None:
    """The refit trains exactly as the best trial did, so it must reach exactly the same dev ROC AUC: log the
    refit's results, the difference and the verdict (tag `refit_check`) on the fold run; warn when they differ."""
    mlflow.log_metrics({name: results[name] for name in ("dev_roc_auc", "test_roc_auc", "threshold")})
    difference = results["dev_roc_auc"] - best.value
    mlflow.log_metric("refit_dev_roc_auc_difference", difference)
    verdict = "identical" if difference == 0 else "differs"
    mlflow.set_tags({"refit_run_id": refit_run_id, "best_trial_number": str(best.number), "refit_check": verdict})
    if difference != 0:
        print(
            f"WARNING fold {fold[0]}/{fold[1]}: the refit reached dev ROC AUC {results['dev_roc_auc']:.6f}, the best "
            f"trial {best.value:.6f}: training is not bit-for-bit reproducible here (nondeterministic kernels, "
            "--no-deterministic?), so the test result is of a model the search never saw.",
            file=sys.stderr,
        )


def brief(params: dict) -> str:
    """Hyper-parameters in one short line: a float to three significant digits, any other value (a name, None) as is."""
    return ", ".join(
        f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}" for name, value in params.items()
    )
