"""Resume: find the work already done, through MLflow alone, and skip it.

A root run and its fold runs carry a run key, a short hash of what decides their results (split file, seed,
settings, thread count, code). The same command again finds the root run with that key, and a fold counts as done
only when its completion tag is there: a FINISHED status alone proves nothing (MLflow's exit hook marks open runs
FINISHED). Likewise a root run is reopened only when its tag `root_record` says that its record (params,
provenance, split file) was written to the end; a root whose first command failed or was killed before that stays
as it ended, and a new root run is started.
Runs also carry `host` and `pid`, so a new invocation can mark KILLED the runs left RUNNING by a dead process.
With a tracking server, workers may run on other machines, whose pids cannot be checked: there a worker's root
and fold runs carry a `heartbeat` tag (Unix time, renewed every RUN_HEARTBEAT_SECONDS), and a run of another host
whose heartbeat is RUN_GRACE_SECONDS old is a dead process's (the hosts' clocks must agree, as NTP or SLURM ensure).
Several processes may work on one fold's search at once; workers that start together make one root run, not one
each (`root_run`).
(The finished trials themselves are kept in the Optuna study: studies.py, sharing.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlflow
import torch
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException

from support import runs

RUN_HEARTBEAT_SECONDS = 20  # tracking server: how often a worker's root and fold runs get a fresh heartbeat tag
RUN_GRACE_SECONDS = 120  # a run of another host whose heartbeat is this old belongs to a dead process
ROOT_WAIT_SECONDS = 120  # how long to wait for the root run that another worker is creating


def run_key(*parts: object) -> str:
    """A short hash of everything that decides a run's results (split file, seed, settings, threads, code)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def owner_tags() -> dict[str, str]:
    """Which process runs this: the host and process id that `sweep_dead_runs` checks."""
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def owner_alive(tags: dict[str, str]) -> bool:
    """Whether the process that owns a run is alive: on this host by its pid, on another by its heartbeat tag."""
    if tags.get("host") == socket.gethostname():
        return "pid" not in tags or pid_alive(int(tags["pid"]))
    return "heartbeat" not in tags or time.time() - float(tags["heartbeat"]) < RUN_GRACE_SECONDS


@contextmanager
def heartbeat(run_id: str) -> Iterator[None]:
    """With a tracking server, renew the run's `heartbeat` tag every RUN_HEARTBEAT_SECONDS while the block runs."""
    if not mlflow.get_tracking_uri().startswith(("http://", "https://")):
        yield  # a local store: every worker is on this host, and pids tell
        return
    client, stop = mlflow.MlflowClient(), threading.Event()

    def beat() -> None:
        while True:
            try:
                client.set_tag(run_id, "heartbeat", f"{time.time():.0f}")
            except MlflowException as error:  # the server away for a while: beat on, or this run would look dead
                print(f"WARNING: heartbeat of run {run_id} not sent, trying again: {error}", file=sys.stderr)
            if stop.wait(RUN_HEARTBEAT_SECONDS):
                return

    client.set_tag(run_id, "heartbeat", f"{time.time():.0f}")
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def sweep_dead_runs(client: mlflow.MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs whose process (tags host, pid, heartbeat; children inherit their parent's) is
    dead. A run of a live process, or of another host without heartbeats, is left alone."""
    running = {r.info.run_id: r for r in client.search_runs([experiment_id], "attributes.status = 'RUNNING'")}
    killed = []
    for run_id, run in running.items():
        owner = run
        while "pid" not in owner.data.tags and owner.data.tags.get("mlflow.parentRunId"):
            owner = client.get_run(owner.data.tags["mlflow.parentRunId"])
        if not owner_alive(owner.data.tags):
            client.set_terminated(run_id, "KILLED")
            killed.append(run_id)
    if killed:
        print(f"Marked KILLED {len(killed)} run(s) left RUNNING by a process that no longer exists")
    return killed


def completed_folds(experiment_id: str, key: str) -> set[tuple[int, int]]:
    """Folds of this run key whose completion tag is there (a FINISHED status alone proves nothing)."""
    folds = mlflow.MlflowClient().search_runs(
        [experiment_id], f"tags.run_level = 'fold' AND tags.run_key = '{key}' AND tags.fold_complete = 'true'"
    )
    return {(int(r.data.tags["root_split_id"]), int(r.data.tags["nested_split_id"])) for r in folds}


def asked_folds(tags: dict[str, str]) -> set[tuple[int, int]]:
    """The folds that the commands which opened a root run asked of it (its tags fold_asked.R.N)."""
    return {(int(key.split(".")[1]), int(key.split(".")[2])) for key in tags if key.startswith("fold_asked.")}


def held_folds(client: mlflow.MlflowClient, root: mlflow.entities.Run) -> set[tuple[int, int]]:
    """The folds that have a completed fold run under this root run (with its run key)."""
    query = (
        f"tags.run_level = 'fold' AND tags.run_key = '{root.data.tags['run_key']}' AND tags.fold_complete = 'true' "
        f"AND tags.mlflow.parentRunId = '{root.info.run_id}'"
    )
    found = client.search_runs([root.info.experiment_id], query, max_results=10000)
    return {(int(r.data.tags["root_split_id"]), int(r.data.tags["nested_split_id"])) for r in found}


def ask(client: mlflow.MlflowClient, root_id: str, folds: list[tuple[int, int]]) -> None:
    """Add to the root run's record the folds this command asks for; a root that was complete is not, until the
    new ones are."""
    tags = client.get_run(root_id).data.tags
    new = sorted(set(folds) - asked_folds(tags))
    for start in range(0, len(new), 100):  # MLflow takes at most 100 tags in one batch
        batch = [RunTag(f"fold_asked.{root}.{nested}", "true") for root, nested in new[start : start + 100]]
        client.log_batch(root_id, tags=batch)
    if new and tags.get("run_complete") == "true":
        client.delete_tag(root_id, "run_complete")


def complete_if_done(client: mlflow.MlflowClient, experiment_id: str, root_id: str, key: str) -> None:
    """Tag the root run `run_complete` if every fold asked of it has a completed fold run under it: checked here,
    never assumed. Folds still missing (another process runs them, or a command stopped) are named instead."""

    def missing() -> list[tuple[int, int]]:
        root = client.get_run(root_id)
        return sorted(asked_folds(root.data.tags) - held_folds(client, root))

    if not missing():
        client.set_tag(root_id, "run_complete", "true")
        if not missing():  # no other command asked for more folds in the meantime
            return
        client.delete_tag(root_id, "run_complete")
    names = ", ".join(f"{root}/{nested}" for root, nested in missing())
    print(
        f"Root run {root_id} is not complete: its fold(s) {names} have not completed (another process is running "
        "them, or the command that asked for them stopped); the command that completes the last one tags it complete."
    )


def find_root_run(client: mlflow.MlflowClient, experiment_id: str, key: str) -> str | None:
    """The id of the latest root run with this run key whose record is complete, if any."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.run_level = 'root' AND tags.run_key = '{key}' AND tags.root_record = 'complete'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


STOPPED = "The same command resumes, skipping the completed folds and keeping the finished trials."


def claim_root(client: mlflow.MlflowClient, experiment_id: str, key: str) -> bool:
    """Whether this process is the first to claim the root run of run key `key`. Creating an MLflow experiment of a
    given name is atomic in every tracking store, so of workers that start together exactly one creates
    `claim-root-<experiment id>-<key>`; it is deleted at once, so the UI does not list it, and its name stays taken."""
    try:
        claim = client.create_experiment(f"claim-root-{experiment_id}-{key}")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return False
    client.delete_experiment(claim)
    return True


@contextmanager
def root_run(
    experiment_id: str, key: str, run_name: str, record: Callable[[], None], folds: list[tuple[int, int]]
) -> Iterator[mlflow.ActiveRun]:
    """The root run with this run key, reopened, or started when there is none, and then recorded by `record()`.

    A root's record (params, provenance, split file) is written once, when the run is new; its last tag says it
    is whole. Every command that opens it adds the folds it asks for (tags `fold_asked.R.N`), so the record names
    every fold the root holds, and the root is tagged `run_complete` once each of them has completed
    (`complete_if_done`). Workers that start at the same moment would each find no root run and start one: only the
    one that claims it (`claim_root`) starts it, and the others wait for it to appear. Runs left RUNNING by a dead
    process are marked KILLED first. Signals end the root run KILLED.
    """
    client = mlflow.MlflowClient()
    sweep_dead_runs(client, experiment_id)
    root_id = find_root_run(client, experiment_id, key)
    if root_id is None and not claim_root(client, experiment_id, key):
        root_id = wait_for_root_run(client, experiment_id, key)
    with runs.tracked_run(STOPPED, run_id=root_id, run_name=run_name) as root, heartbeat(root.info.run_id):
        mlflow.set_tags({"run_level": "root", "run_key": key, **owner_tags()})
        if root_id is None:
            record()  # a param cannot change later: what defines the root is logged once
            mlflow.set_tag("root_record", "complete")  # the last: a root is reopened only with its whole record
        ask(client, root.info.run_id, folds)  # the root's record grows by the folds this command asks for
        yield root
    complete_if_done(client, experiment_id, root.info.run_id, key)  # every fold asked of it, checked


def pending(experiment_id: str, key: str, folds: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The folds still to run, in order; the completed ones are named and skipped."""
    done = completed_folds(experiment_id, key)
    for fold in folds:
        if fold in done:
            print(f"fold {fold[0]}/{fold[1]} already complete: skipped")
        else:
            yield fold


@contextmanager
def fold_run(fold: tuple[int, int], key: str, args: object, parts: dict) -> Iterator[mlflow.ActiveRun]:
    """A fold's run, nested in the root run: tagged with its fold, the run key and the process that owns it, with
    what it ran with logged: the seed, the thread and worker counts, and how many images each part of the fold has;
    with a tracking server, a heartbeat tells other hosts this worker is alive."""
    tags = {"run_level": "fold", "root_split_id": str(fold[0]), "nested_split_id": str(fold[1])}
    with (
        runs.tracked_run(run_name=f"fold-{fold[0]}-{fold[1]}", nested=True, tags=tags) as run,
        heartbeat(run.info.run_id),
    ):
        mlflow.set_tags({"run_key": key, **owner_tags()})
        sizes = {f"n_{name}": len(parts[name]) for name in ("train", "dev", "test")}
        threads = {"num_threads": torch.get_num_threads(), "num_workers": args.num_workers}
        mlflow.log_params({"seed": args.seed, **threads, **sizes})
        yield run


def wait_for_root_run(client: mlflow.MlflowClient, experiment_id: str, key: str) -> str | None:
    """The root run that another worker claimed and is starting, once its record is complete; None (start one
    here) if that worker's root ended before its record was, or never appears."""
    deadline = time.monotonic() + ROOT_WAIT_SECONDS
    while time.monotonic() < deadline:
        if root_id := find_root_run(client, experiment_id, key):
            return root_id
        query = f"tags.run_level = 'root' AND tags.run_key = '{key}'"
        for other in client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1):
            if other.info.status != "RUNNING" or not owner_alive(other.data.tags):
                print(
                    f"Root run {other.info.run_id} of run key {key} ended {other.info.status} before its record was "
                    "complete: starting a new root run here"
                )
                return None
        try:
            runs.pause(0.5)  # a stop signal ends the wait at once
        except runs.StopRequested:
            raise SystemExit(
                "Stopped by a signal while waiting for another worker's root run: nothing started."
            ) from None
    print(f"WARNING: the worker that claimed run key {key}'s root run never started it: starting one here")
    return None
