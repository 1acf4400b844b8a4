"""Optuna studies for step 4: stored, resumable, and shared by several processes.

One study per fold, kept in `--storage`: by default a journal file in the working directory (Optuna's
JournalFileBackend, which locks the file, so several processes on one machine can share it), or any Optuna
storage URL (`postgresql://…`, `mysql://…`; `sqlite:///…` works for one process, but locks up under several).

- Resume: the finished trials (complete or pruned) are kept, and a study stops at `n_trials` finished ones,
  however many commands it took. A killed process leaves its trial RUNNING for ever (the journal has no
  heartbeat): trials carry `host` and `pid`, and a trial whose process is dead is marked FAIL and redone.
- The same choices: the sampler's random state is not stored, so every trial gets a sampler seeded from its
  slot, the number of finished or running trials before it (failed ones do not count). A redone trial takes
  the failed one's slot and draws the same values; two processes sharing a study draw what one would.
- Several processes: a trial that finds all `n_trials` slots taken by trials running elsewhere waits for them.
  Two processes that ask for the last slot at the same moment both get a trial number; the later one sees that
  its slot is past the end and gives its trial up as FAIL (tag `surplus`) before drawing anything.
- A torn journal: a process killed in the middle of writing leaves half a record at the end of the file, and
  Optuna then refuses to read it. Under the journal's lock, such a last record (it has no line end, so its write
  never completed) is moved to a side file and removed; a damaged record elsewhere stops with how to repair it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import TrialState

from resume import owner_tags, pid_alive

DEFAULT_STORAGE = "optuna_studies.journal"  # in the working directory, next to MLflow's mlflow.db
TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)  # trials that hold a slot
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WAIT_SECONDS = 2.0  # how often a process waiting for other processes' trials looks again

optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed by run_trials instead


def is_url(storage: str) -> bool:
    """Whether --storage is a storage URL (scheme://…) rather than a journal file."""
    return re.match(r"^[a-z][a-z0-9+.-]*://", storage) is not None


def describe(storage: str) -> str:
    """The storage as it may be logged: a journal file as an absolute path, a URL without its password."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", storage) if is_url(storage) else str(Path(storage).resolve())


def repair_torn_journal(path: Path) -> None:
    """Remove a torn last record (a writer killed mid-write) from a journal file; refuse a damaged record elsewhere.

    Holds the journal's own lock, so no live writer is cut off: every writer appends whole lines under it."""
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        complete, _, torn = data.rpartition(b"\n")
        for number, line in enumerate(complete.split(b"\n") if complete else [], start=1):
            try:
                json.loads(line)
            except ValueError:
                raise SystemExit(
                    f"{path}, line {number}: not a readable Optuna journal record, so no study in this file can be "
                    f"loaded. Keep a copy of the file, then delete that line (e.g. sed -i '{number}d' {path}); the "
                    "trial it recorded is redone."
                ) from None
        if torn:
            side_file = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
            side_file.write_bytes(torn)
            os.truncate(path, len(data) - len(torn))
            print(
                f"Repaired {path}: removed its last record ({len(torn)} bytes, kept in {side_file}), which a process "
                "killed while writing left half-written; every complete record is kept."
            )
    finally:
        lock.release()


def open_storage(storage: str) -> BaseStorage | str:
    """The Optuna storage that --storage names: a journal file (checked, and repaired if torn) or a URL."""
    if is_url(storage):
        return storage
    path = Path(storage)
    if path.is_dir() or not path.parent.is_dir():
        raise SystemExit(f"--storage {storage}: give a journal file in an existing folder, or a storage URL.")
    if path.exists():
        repair_torn_journal(path)
    return JournalStorage(JournalFileBackend(str(path)))


def open_study(storage: str, name: str, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """The fold's study, created on first use (at most once, even by several processes at the same moment)."""
    try:
        return optuna.create_study(
            study_name=name, storage=open_storage(storage), direction="maximize", pruner=pruner, load_if_exists=True
        )
    except Exception as error:  # noqa: BLE001 - an unreachable database, a bad URL: say which storage failed
        raise SystemExit(f"--storage {describe(storage)}: could not open Optuna study {name} ({error}).") from None


def sweep_dead_trials(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials whose process (user attributes host, pid) is dead; others are left alone."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
        if host == socket.gethostname() and pid is not None and not pid_alive(int(pid)):
            study.tell(trial.number, state=TrialState.FAIL)
            print(f"trial {trial.number} was left RUNNING by a process that no longer exists: marked FAIL, redone")


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    n_trials: int,
    sampler_for: Callable[[int], optuna.samplers.BaseSampler],
) -> None:
    """Run trials until the study has n_trials finished (complete or pruned) ones, with any other processes."""
    waiting = False
    while True:
        sweep_dead_trials(study)
        trials = study.get_trials(deepcopy=False)
        if sum(t.state in FINISHED for t in trials) >= n_trials:
            return
        if sum(t.state in TAKEN for t in trials) >= n_trials:  # the rest are running in other processes
            if not waiting:
                print(f"{study.study_name}: waiting for the trials running in other processes")
                waiting = True
            time.sleep(WAIT_SECONDS)
            continue
        trial = study.ask()
        for key, value in owner_tags().items():
            trial.set_user_attr(key, value)
        slot = sum(t.state in TAKEN for t in study.get_trials(deepcopy=False) if t.number < trial.number)
        if slot >= n_trials:  # another process took the last slot a moment earlier
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        trial.set_user_attr("slot", slot)
        study.sampler = sampler_for(slot)  # draws happen when the objective asks, with this sampler
        run_trial(study, trial, objective, slot, n_trials)


def run_trial(
    study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], float], slot: int, n_trials: int
) -> None:
    """Run one trial and tell the study how it ended; its MLflow run gets the same state as tag `trial_state`."""
    try:
        value = objective(trial)
    except optuna.TrialPruned as pruned:
        state, outcome = TrialState.PRUNED, f"pruned: {pruned}"
        study.tell(trial, state=state)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)  # a signal or an error: the next command redoes this trial
        tag_run(trial, "FAIL")
        raise
    else:
        state, outcome = TrialState.COMPLETE, f"dev ROC AUC {value:.4f}"
        study.tell(trial, value)
    tag_run(trial, state.name)
    print(f"trial {trial.number} ({slot + 1} of {n_trials}) {outcome} | {brief(trial.params)}")


def tag_run(trial: optuna.Trial, state: str) -> None:
    """Tag the trial's MLflow run with how the trial ended."""
    if run_id := trial.user_attrs.get("mlflow_run_id"):
        mlflow.MlflowClient().set_tag(run_id, "trial_state", state)


def brief(params: dict) -> str:
    """Hyper-parameters in one short line, three significant digits each."""
    return ", ".join(f"{name} {value:.3g}" for name, value in params.items())
