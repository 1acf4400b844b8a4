"""Optuna studies, one per fold: stored, resumable, and shared by several processes.

One study per fold, kept in `--storage`: by default a journal file in the working directory (Optuna's
JournalFileBackend, which locks the file, so several processes on one machine can share it), or any Optuna
storage URL (`postgresql://…`, `mysql://…`; `sqlite:///…` works for one process, but locks up under several).

- Resume: the finished trials (complete or pruned) are kept, and a study stops at `n_trials` finished ones,
  however many commands it took. A killed process leaves its trial RUNNING for ever: trials carry `host` and
  `pid`, and a trial whose process is dead is marked FAIL (its MLflow runs KILLED) and redone. A process killed
  in the few ms between asking for a trial and recording them leaves a trial with no pid to check: on a journal,
  such a trial is failed once it is CHOOSING_SECONDS old (on a database, the heartbeat check below catches it).
- Workers on other machines (a database storage such as PostgreSQL): their pid cannot be checked, so each running
  trial records a heartbeat every HEARTBEAT_SECONDS (Optuna's RDB heartbeat), and a trial without one for
  GRACE_SECONDS is failed and redone. Optuna's check skips a trial that died before its first heartbeat; such a
  trial is failed once GRACE_SECONDS have passed since a worker first saw it RUNNING without any.
- The same choices: the sampler's random state is not stored, so every trial gets a sampler seeded from its
  slot, the lowest slot that no earlier finished or running trial holds (failed ones hold none). A redone trial
  takes the failed one's slot and draws the same values; two processes sharing a study draw what one would.
- Several processes: a trial that finds all `n_trials` slots taken by trials running elsewhere waits for them.
  Two processes that ask for the last slot at the same moment both get a trial number; the later one sees that
  its slot is past the end and gives its trial up as FAIL (tag `surplus`) before drawing anything. The workers
  that waited all reach the fold's refit at once: the refit is claimed the same way, as the one trial of the
  study `claim-<fold's study>-refit-<root run key>`, so exactly one of them refits the fold for that root run
  (`claim_refit`), and the others wait for it. More trials later make a new root run: its own refit, of its best.
- Stop signals: every wait here (for other processes' trials, for a slot) waits with `runs.pause`, and each new
  trial starts with `runs.check_stop`, so Ctrl-C or SIGTERM ends a waiting worker at once; a trial asked for and
  not yet begun is told FAIL, never left RUNNING.
- A torn journal: a process killed in the middle of writing leaves half a record at the end of the file, and
  Optuna then refuses to read it. Under the journal's lock, such a last record (it has no line end, so its write
  never completed) is moved to a side file and removed. A damaged record elsewhere is not something a killed
  writer leaves (another program, a disk fault), so nothing is cut by itself: the command stops and says how to
  repair it. The journal is a log, replayed from the top, so the lines before the damaged one are the studies as
  they were at that moment: cut the file there, and the next command redoes what came after, in the same slots.
  Deleting only the damaged line is not safe: Optuna numbers trials by the order of their creation records, so
  without one, every later record lands on the wrong trial.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import random
import re
import shlex
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import mlflow
import optuna
import sqlalchemy
from mlflow.exceptions import MlflowException
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

import runs
from resume import owner_alive, owner_tags, pid_alive

DEFAULT_STORAGE = "optuna_studies.journal"  # in the working directory, next to MLflow's mlflow.db
TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)  # trials that hold a slot
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WAIT_SECONDS = 2.0  # how often a process waiting for other processes' trials looks again
HEARTBEAT_SECONDS = 10  # database storage: how often a running trial records that its worker is alive
GRACE_SECONDS = 60  # and how long without a heartbeat before its worker counts as gone (the trial is redone)
# How long to wait for an earlier trial to record its owner and choose its slot (a killed process never does):
# a live one does both a few ms after asking, even on a busy machine, and a dead one costs a wait this long.
CHOOSING_SECONDS = 10.0
NO_HEARTBEAT_SEEN: dict[tuple[str, int], float] = {}  # (study, trial) RUNNING without any heartbeat: first seen

optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed by run_trials instead
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")  # ask()


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
                name = shlex.quote(str(path))
                raise SystemExit(
                    f"{path}, line {number}: not a readable Optuna journal record, so no study in this file can be "
                    "loaded; with no worker running, keep a copy of the file and cut it just before that line (e.g. "
                    f"head -n {number - 1} {name} > {name}.cut && mv {name}.cut {name}), or restore it from a backup: "
                    "the next command then redoes the trials recorded from that line on, in the same slots."
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


@functools.cache
def database(url: str) -> RDBStorage:
    """An Optuna database storage with heartbeats, one per process. Workers that start at the same moment all
    create the tables, and all but one of them fail; those try again, and find the tables made."""
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
                return RDBStorage(
                    url,
                    engine_kwargs={"pool_pre_ping": True},  # a connection dropped by the server is replaced
                    heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS,
                    heartbeat_stale_trial_callback=lambda _study, trial: end_runs(trial),
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):  # "already exists"
            if attempt == 4:
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def open_storage(storage: str) -> BaseStorage:
    """The Optuna storage that --storage names: a journal file (checked, and repaired if torn) or a database URL."""
    if is_url(storage):
        try:
            return database(storage)
        except Exception as error:  # noqa: BLE001 - an unreachable database, a bad URL: say which storage failed
            raise SystemExit(f"--storage {describe(storage)}: could not open this Optuna storage ({error}).") from None
    path = Path(storage)
    if path.is_dir() or not path.parent.is_dir():
        raise SystemExit(f"--storage {storage}: give a journal file in an existing folder, or a storage URL.")
    if path.exists():
        repair_torn_journal(path)
    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as error:  # a folder this user cannot write, or a system folder such as /proc
        raise SystemExit(f"--storage {storage}: cannot create or open this journal file ({error.strerror}).") from None


def add_storage_flag(parser: argparse.ArgumentParser) -> None:
    """--storage: where the Optuna studies are kept (open_storage checks it)."""
    parser.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help="where the Optuna studies are kept: a journal file (safe for several processes on one machine) or a "
        "storage URL such as postgresql://user@host/db",
    )


def open_study(storage: str, name: str, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """The fold's study, created on first use (at most once, even by several processes at the same moment)."""
    try:
        return optuna.create_study(
            study_name=name, storage=open_storage(storage), direction="maximize", pruner=pruner, load_if_exists=True
        )
    except Exception as error:  # noqa: BLE001 - an unreachable database, a bad URL: say which storage failed
        raise SystemExit(f"--storage {describe(storage)}: could not open Optuna study {name} ({error}).") from None


def claim(storage: str, name: str) -> bool:
    """Whether this process is the first to claim `name`. Creating a study is atomic in every Optuna storage, so of
    workers that start together exactly one creates the (empty) study of that name; `claim-` names mark them."""
    try:
        optuna.create_study(study_name=f"claim-{name}", storage=open_storage(storage))
    except optuna.exceptions.DuplicatedStudyError:
        return False
    return True


def claimer(storage: str, name: str) -> Callable[[], bool]:
    """A call that says whether this process is the first to claim `name` (see `claim`)."""
    return lambda: claim(storage, name)


def log_setup(space: dict, sampler: str, pruner: dict | None, n_trials: int, storage: str) -> None:
    """Log how the studies search, on the active run (search/search_setup.json; tag optuna_storage)."""
    setup = {
        "search_space": space,
        "sampler": f"{sampler}, seeded per trial from (seed, root split, nested split, trial slot)",
        "pruner": pruner,
        "n_trials": n_trials,
        "storage": describe(storage),
    }
    mlflow.log_dict(setup, "search/search_setup.json")
    mlflow.set_tag("optuna_storage", describe(storage))


def sweep_dead_trials(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials whose worker is gone (their MLflow runs KILLED); live workers' are left alone.

    On this host a worker is checked by its pid (user attributes host, pid). On a journal, a trial without a pid
    (its worker was killed right after asking for it) is failed CHOOSING_SECONDS after it was asked. On a database
    storage any worker's trial is also checked by its heartbeat (Optuna's check, which calls `end_runs`), and a
    trial that never recorded one is failed GRACE_SECONDS after this process first saw it (Optuna's check skips it)."""
    storage = getattr(study._storage, "_backend", study._storage)  # noqa: SLF001 - Optuna wraps a database in a cache
    on_database = isinstance(storage, RDBStorage)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
        if host == socket.gethostname() and pid is not None and not pid_alive(int(pid)):
            fail(study, trial, "was left RUNNING by a process that no longer exists")
        # Not on a database: there such a trial has no heartbeat either (caught below), and datetime_start is the
        # asking host's clock, which need not agree with this one. A journal's workers all share this clock.
        elif pid is None and not on_database and asked_seconds_ago(trial) > CHOOSING_SECONDS:
            fail(study, trial, "was left RUNNING without a pid by a process killed right after asking for it")
    if not on_database:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    now = time.monotonic()
    for number in without_heartbeat(storage, study.study_name):
        first_seen = NO_HEARTBEAT_SEEN.setdefault((study.study_name, number), now)
        if now - first_seen > GRACE_SECONDS:
            fail(study, study.trials[number], f"has had no heartbeat for {GRACE_SECONDS} s: its worker is gone")


def asked_seconds_ago(trial: FrozenTrial) -> float:
    """How long ago the trial was asked for, by this host's clock (Optuna records its start in local time)."""
    return (datetime.datetime.now() - trial.datetime_start).total_seconds()


def without_heartbeat(storage: RDBStorage, study_name: str) -> list[int]:
    """Numbers of the study's RUNNING trials that have no heartbeat record at all (Optuna's tables)."""
    query = sqlalchemy.text(
        "SELECT number FROM trials WHERE study_id = :study AND state = 'RUNNING' "
        "AND trial_id NOT IN (SELECT trial_id FROM trial_heartbeats)"
    )
    with storage.engine.connect() as connection:
        return [row[0] for row in connection.execute(query, {"study": storage.get_study_id_from_name(study_name)})]


def fail(study: optuna.Study, trial: FrozenTrial, why: str) -> None:
    """Mark a trial of a gone worker FAIL (unless another worker just did) and its MLflow runs KILLED."""
    try:
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it a moment ago
        return
    end_runs(trial)
    print(f"trial {trial.number} {why}: marked FAIL, redone")


def end_runs(trial: FrozenTrial) -> None:
    """Mark KILLED the MLflow runs a gone worker left RUNNING for this trial: its fold's and everything under it."""
    client = mlflow.MlflowClient()
    top = trial.user_attrs.get("mlflow_fold_run_id") or trial.user_attrs.get("mlflow_run_id")
    if top is None:
        return
    experiment_id, left = client.get_run(top).info.experiment_id, [top]
    while left:  # the fold run, then its trial and refit runs, then their phase runs
        run_id = left.pop()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
        query = f"tags.mlflow.parentRunId = '{run_id}' AND attributes.status = 'RUNNING'"
        left += [run.info.run_id for run in client.search_runs([experiment_id], query, max_results=1000)]
    if trial.user_attrs.get("mlflow_run_id"):
        tag_run(trial, "FAIL")


def claim_refit(study: optuna.Study, key: str) -> int | None:
    """This worker's claim on the fold's refit for the root run of run key `key` (a trial number), or None once
    another worker has refitted the fold for that root; while another live worker is refitting it, wait for it.

    The claim is per root run key, not per study: a later root that extends the study with more trials refits
    the fold with its own best trial. Only a claim whose fold run still runs in a live process counts; a claim of a
    worker that stopped is failed, and the refit is claimed again here."""
    storage = study._storage  # noqa: SLF001 - the fold study's storage, already open
    name = f"claim-{study.study_name}-refit-{key}"
    refits = optuna.create_study(study_name=name, storage=storage, load_if_exists=True)
    client = mlflow.MlflowClient()

    def live(trial: FrozenTrial) -> bool:
        if trial.state == TrialState.COMPLETE:
            return True
        if "mlflow_fold_run_id" not in trial.user_attrs:  # asked a moment ago, or its worker died right then
            return (datetime.datetime.now() - trial.datetime_start).total_seconds() < GRACE_SECONDS
        try:
            run = client.get_run(trial.user_attrs["mlflow_fold_run_id"])
        except MlflowException:  # not in this tracking store: no one here is refitting
            return False
        return run.info.status == "RUNNING" and owner_alive(run.data.tags)

    waiting = False
    while True:
        for trial in refits.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not live(trial):
                fail(refits, trial, "(a refit) was left by a worker that stopped")
        if refits.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return None  # refitted, tested and complete in another worker's fold run of this root
        if not any(live(t) for t in refits.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
            trial = refits.ask()
            trial.set_user_attr("mlflow_fold_run_id", mlflow.active_run().info.run_id)
            earlier = refits.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
            if not any(t.number < trial.number and live(t) for t in earlier):
                return trial.number
            refits.tell(trial, state=TrialState.FAIL)  # another worker claimed it a moment earlier
        if not waiting:
            print(f"{study.study_name}: waiting for the refit running in another process")
            waiting = True
        runs.pause(WAIT_SECONDS)  # a stop signal ends the wait at once


def check_refit(fold: tuple[int, int], best: FrozenTrial, dev_roc_auc: float, refit_run_id: str) -> None:
    """The refit trains exactly as the best trial did, so it must reach exactly the same dev ROC AUC: log the
    difference and the verdict (tag `refit_check`) on the fold run, and warn when they differ."""
    difference = dev_roc_auc - best.value
    mlflow.log_metric("refit_dev_roc_auc_difference", difference)
    mlflow.set_tags({"refit_run_id": refit_run_id, "best_trial_number": str(best.number)})
    mlflow.set_tag("refit_check", "identical" if difference == 0 else "differs")
    if difference != 0:
        print(
            f"WARNING fold {fold[0]}/{fold[1]}: the refit reached dev ROC AUC {dev_roc_auc:.6f}, the best trial "
            f"{best.value:.6f}: training is not bit-for-bit reproducible here (nondeterministic kernels, "
            "--no-deterministic?), so the test result is of a model the search never saw.",
            file=sys.stderr,
        )


def refit_done(study: optuna.Study, key: str, number: int, dev_roc_auc: float) -> None:
    """Mark this worker's claim on the fold's refit complete (after the fold run's completion tag)."""
    storage = study._storage  # noqa: SLF001
    optuna.load_study(study_name=f"claim-{study.study_name}-refit-{key}", storage=storage).tell(number, dev_roc_auc)


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    n_trials: int,
    sampler_for: Callable[[int], optuna.samplers.BaseSampler],
) -> None:
    """Run trials until the study has n_trials finished (complete or pruned) ones, with any other processes."""
    waiting = False
    while True:
        runs.check_stop()  # between two trials: a stop signal ends the search here, before asking for another
        sweep_dead_trials(study)
        trials = study.get_trials(deepcopy=False)
        if sum(t.state in FINISHED for t in trials) >= n_trials:
            return
        if sum(t.state in TAKEN for t in trials) >= n_trials:  # the rest are running in other processes
            if not waiting:
                print(f"{study.study_name}: waiting for the trials running in other processes")
                waiting = True
            runs.pause(WAIT_SECONDS)  # a stop signal ends the wait at once
            continue
        trial = study.ask()
        try:
            for key, value in owner_tags().items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("mlflow_fold_run_id", mlflow.active_run().info.run_id)
            slot = free_slot(study, trial.number)
        except BaseException:  # a stop signal while waiting for a slot: the trial never began; end it, not RUNNING
            study.tell(trial, state=TrialState.FAIL)
            raise
        if slot >= n_trials:  # another process took the last slot a moment earlier
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        trial.set_user_attr("slot", slot)
        study.sampler = sampler_for(slot)  # draws happen when the objective asks, with this sampler
        run_trial(study, trial, objective, slot, n_trials)


def free_slot(study: optuna.Study, number: int) -> int:
    """The lowest slot that no earlier finished or running trial holds, for trial `number`.

    Counting the trials before it would not do: when an earlier trial fails while later ones run, the count
    gives a slot that a running trial holds. Trials asked a moment earlier by other processes are still choosing
    theirs: wait for them (a few ms), so two processes never take one slot; one that never chooses is ignored."""
    deadline = time.monotonic() + CHOOSING_SECONDS
    while True:
        earlier = [t for t in study.get_trials(deepcopy=False, states=TAKEN) if t.number < number]
        if time.monotonic() > deadline or all("slot" in t.user_attrs for t in earlier):
            held = {t.user_attrs["slot"] for t in earlier if "slot" in t.user_attrs}
            return next(slot for slot in itertools.count() if slot not in held)
        runs.pause(0.05)


def run_trial(
    study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], float], slot: int, n_trials: int
) -> None:
    """Run one trial and tell the study how it ended; its MLflow run gets the same state as tag `trial_state`.

    On a database storage a thread records the trial's heartbeat while it runs (Optuna's own, as in optimize)."""
    try:
        with optuna.storages._heartbeat.get_heartbeat_thread(trial._trial_id, study._storage):  # noqa: SLF001
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
    """Hyper-parameters in one short line: a float to three significant digits, any other value (a whole number, a
    name, a bool, None) as it is."""
    return ", ".join(
        f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}" for name, value in params.items()
    )
