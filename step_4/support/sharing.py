"""Sharing one fold's search between processes: slots, claims, heartbeats, dead-trial sweeps, torn-journal repair.

You need not read this for step 4's lesson (studies.py: one process's search). What follows lets several processes,
on one machine or many, run the same command at once and share the trials; docs/scaling_out.md tells the story.

- The storage: a journal file (Optuna's JournalFileBackend locks it, so processes on one machine share it) or a
  database URL (PostgreSQL, MySQL) with Optuna's heartbeats, for workers on several machines. `open_storage`.
- Slots: a trial takes the lowest slot that no earlier finished or running trial holds; a trial that finds every
  slot taken waits, and one past the end is given up (tag `surplus`). `trials`.
- Dead workers: a trial left RUNNING by a dead process (its pid on this host, its heartbeat on a database) is failed,
  its MLflow runs KILLED, and redone in its slot. `sweep_dead_trials`.
- The refit: creating a study of a given name is atomic in every Optuna storage, so of workers that reach a fold's
  refit together exactly one claims it (`refit_once`), while the others wait for it.
- A torn journal: a half-written last record (a writer killed mid-write) is moved to a side file; a damaged record
  elsewhere stops the command with how to repair it. `repair_torn_journal`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import itertools
import json
import os
import random
import re
import shlex
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import sqlalchemy
from mlflow.exceptions import MlflowException
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

from support import resume, runs  # resume: whose process a trial or run is

TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)  # trials that hold a slot
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WAIT_SECONDS = 2.0  # how often a process waiting for other processes' trials looks again
TRIAL_HEARTBEAT_SECONDS = 10  # database storage: how often a running trial records that its worker is alive
TRIAL_GRACE_SECONDS = 60  # and how long without a heartbeat before its worker counts as gone (the trial is redone)
# How long to wait for an earlier trial to record its owner and choose its slot (a killed process never does):
# a live one does both a few ms after asking, even on a busy machine, and a dead one costs a wait this long.
CHOOSING_SECONDS = 10.0
NO_HEARTBEAT_SEEN: dict[tuple[str, int], float] = {}  # (study, trial) RUNNING without any heartbeat: first seen

DEFAULT_STORAGE = "optuna_studies.journal"  # in the working directory, next to MLflow's mlflow.db

warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")  # ask()


def is_url(storage: str) -> bool:
    """Whether --storage is a storage URL (scheme://…) rather than a journal file."""
    return re.match(r"^[a-z][a-z0-9+.-]*://", storage) is not None


def loggable(storage: str) -> str:
    """The storage as it may be logged: a journal file as an absolute path, a URL without its password."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", storage) if is_url(storage) else str(Path(storage).resolve())


def repair_torn_journal(path: Path) -> None:
    """Remove a torn last record (a writer killed mid-write) from a journal file; refuse a damaged record elsewhere.

    Holds the journal's own lock, so no live writer is cut off: every writer appends whole lines under it. The
    journal is a log replayed from the top, so the lines before a damaged one are the studies as they were then;
    deleting only the damaged line is not safe (Optuna numbers trials by the order of their creation records)."""
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
                    heartbeat_interval=TRIAL_HEARTBEAT_SECONDS,
                    grace_period=TRIAL_GRACE_SECONDS,
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
            raise SystemExit(f"--storage {loggable(storage)}: could not open this Optuna storage ({error}).") from None
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


def trials(study: optuna.Study, n_trials: int) -> Iterator[tuple[optuna.Trial, int]]:
    """New trials of the study, each with its slot, until the study has n_trials finished (complete or pruned) ones,
    counting those of other processes; while the other slots are all taken by trials running elsewhere, wait.

    Each trial carries its worker (`host`, `pid`) and fold run. Two processes that ask for the last slot at the same
    moment both get a trial: the later one is past the end, and is given up as FAIL (tag `surplus`)."""
    waiting = False
    while True:
        runs.check_stop()  # between two trials: a stop signal ends the search here, before asking for another
        sweep_dead_trials(study)
        held = study.get_trials(deepcopy=False)
        if sum(t.state in FINISHED for t in held) >= n_trials:
            return
        if sum(t.state in TAKEN for t in held) >= n_trials:  # the rest are running in other processes
            if not waiting:
                print(f"{study.study_name}: waiting for the trials running in other processes")
                waiting = True
            runs.pause(WAIT_SECONDS)  # a stop signal ends the wait at once
            continue
        trial = study.ask()
        try:
            for key, value in resume.owner_tags().items():
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
        yield trial, slot


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


def heartbeat(study: optuna.Study, trial: optuna.Trial) -> contextlib.AbstractContextManager:
    """On a database storage, a thread that records the trial's heartbeat while it runs (Optuna's own, as in
    optimize); on a journal, nothing."""
    return optuna.storages._heartbeat.get_heartbeat_thread(trial._trial_id, study._storage)  # noqa: SLF001


def sweep_dead_trials(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials whose worker is gone (their MLflow runs KILLED); live workers' are left alone.

    On this host a worker is checked by its pid (user attributes host, pid). On a journal, a trial without a pid
    (its worker was killed right after asking for it) is failed CHOOSING_SECONDS after it was asked. On a database
    storage any worker's trial is also checked by its heartbeat (Optuna's check, which calls `end_runs`), and a
    trial that never recorded one is failed TRIAL_GRACE_SECONDS after this process first saw it (Optuna's check
    skips it)."""
    storage = getattr(study._storage, "_backend", study._storage)  # noqa: SLF001 - Optuna wraps a database in a cache
    on_database = isinstance(storage, RDBStorage)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = trial.user_attrs.get("host"), trial.user_attrs.get("pid")
        if host == socket.gethostname() and pid is not None and not resume.pid_alive(int(pid)):
            fail_trial(study, trial, "was left RUNNING by a process that no longer exists")
        # Not on a database: there such a trial has no heartbeat either (caught below), and datetime_start is the
        # asking host's clock, which need not agree with this one. A journal's workers all share this clock.
        elif pid is None and not on_database and asked_seconds_ago(trial) > CHOOSING_SECONDS:
            fail_trial(study, trial, "was left RUNNING without a pid by a process killed right after asking for it")
    if not on_database:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    now = time.monotonic()
    for number in without_heartbeat(storage, study.study_name):
        first_seen = NO_HEARTBEAT_SEEN.setdefault((study.study_name, number), now)
        if now - first_seen > TRIAL_GRACE_SECONDS:
            why = f"has had no heartbeat for {TRIAL_GRACE_SECONDS} s: its worker is gone"
            fail_trial(study, study.trials[number], why)


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


def fail_trial(study: optuna.Study, trial: FrozenTrial, why: str) -> None:
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


def tag_run(trial: optuna.Trial | FrozenTrial, state: str) -> None:
    """Tag the trial's MLflow run with how the trial ended (`trial_state`)."""
    if run_id := trial.user_attrs.get("mlflow_run_id"):
        mlflow.MlflowClient().set_tag(run_id, "trial_state", state)


@contextlib.contextmanager
def refit_once(study: optuna.Study, key: str) -> Iterator[bool]:
    """Whether this worker refits the fold for the root run of run key `key`: False once another worker has; while
    another live worker is refitting it, wait for it. The claim is marked done when the block ends without an
    error, and given up at once when it raises (a waiting worker then takes it over).

    The claim is the study `claim-<fold study>-refit-<key>`, per root run key, not per study: a later root that
    extends the study with more trials refits the fold with its own best trial. Only a claim whose fold run still
    runs in a live process counts; a claim of a worker that stopped is failed, and claimed again here."""
    refits = optuna.create_study(
        study_name=f"claim-{study.study_name}-refit-{key}",
        storage=study._storage,
        load_if_exists=True,  # noqa: SLF001
    )
    number = claim_refit(refits, study.study_name)
    try:
        yield number is not None
    except BaseException:
        if number is not None:
            refits.tell(number, state=TrialState.FAIL)
        raise
    if number is not None:
        refits.tell(number, 1.0)  # done: the fold run under this root is complete


def claim_refit(refits: optuna.Study, what: str) -> int | None:
    """This worker's claim (a trial number of `refits`), or None once another worker has completed one; waits
    while a live worker holds it."""
    client = mlflow.MlflowClient()

    def live(trial: FrozenTrial) -> bool:
        if trial.state == TrialState.COMPLETE:
            return True
        if "mlflow_fold_run_id" not in trial.user_attrs:  # asked a moment ago, or its worker died right then
            return asked_seconds_ago(trial) < TRIAL_GRACE_SECONDS
        try:
            run = client.get_run(trial.user_attrs["mlflow_fold_run_id"])
        except MlflowException:  # not in this tracking store: no one here is refitting
            return False
        return run.info.status == "RUNNING" and resume.owner_alive(run.data.tags)

    waiting = False
    while True:
        for trial in refits.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not live(trial):
                fail_trial(refits, trial, "(a refit) was left by a worker that stopped")
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
            print(f"{what}: waiting for the refit running in another process")
            waiting = True
        runs.pause(WAIT_SECONDS)  # a stop signal ends the wait at once
