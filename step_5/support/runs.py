"""MLflow runs that end the way the work did: stop signals, KILLED runs, the experiment, cheap step logging.

Ctrl-C, `timeout`, `kill` and SLURM signal the whole process group. The handler only sets a flag; the training
loop calls `check_stop` after every batch, and every wait loop waits with `pause`, which checks it too. Both raise,
so every `tracked_run` closes as KILLED (an error closes it FAILED) and no run is left RUNNING. A handler that
raised by itself could fire inside MLflow or DataLoader code and leave runs RUNNING; DataLoader workers ignore the
signals and are shut down by the main process.
A trial stopped by Optuna's pruner ends its runs FINISHED: pruning is a normal end, not a failure.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import unquote

import mlflow
import optuna
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

STOP_REQUESTED = threading.Event()
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI then shows it as model training
UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


class StopRequested(Exception):
    """Raised by the training loop once a stop signal has arrived."""


def request_stop(signum: int, _frame: object) -> None:
    """Signal handler: remember the request; a second Ctrl-C interrupts at once."""
    STOP_REQUESTED.set()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    name = signal.Signals(signum).name
    print(f"\n{name} received: stopping after this batch, or at once if waiting", file=sys.stderr, flush=True)


def install_stop_handlers() -> None:
    """Turn Ctrl-C (SIGINT) and SIGTERM into a stop request that the training loop honours."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)


def check_stop() -> None:
    """Raise StopRequested if a stop signal has arrived."""
    if STOP_REQUESTED.is_set():
        raise StopRequested("stopped by a signal")


def pause(seconds: float) -> None:
    """Sleep, but raise StopRequested as soon as a stop signal arrives: every wait loop waits with this.

    Short naps with a look at the flag between them, not `STOP_REQUESTED.wait`: waiting on the Event holds its lock
    at moments, and the handler, which runs in this same thread, would then wait for that lock for ever."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        check_stop()
        time.sleep(min(left, 0.1))  # a signal cuts a nap short only to run the handler: the nap goes on after it
    check_stop()


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker start-up: leave SIGINT and SIGTERM to the main process, which shuts workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def tracked_run(stopped: str = "", **kwargs: object) -> Iterator[mlflow.ActiveRun]:
    """`mlflow.start_run`, but a run stopped by a signal ends KILLED, and one stopped by the pruner FINISHED.

    A stop ends a root (not nested) run's command with one sentence, and `stopped` after it (what to do next)."""
    if not kwargs.get("nested"):  # a root run: CPU, memory and GPU use over time, in the UI's System metrics tab
        kwargs.setdefault("log_system_metrics", True)
    try:
        with mlflow.start_run(**kwargs) as run:
            if not kwargs.get("nested"):
                started = "reopened" if kwargs.get("run_id") else "started"
                print(f"MLflow run {started}: {run.info.run_id} (experiment id {run.info.experiment_id})", flush=True)
            try:
                yield run
            except (StopRequested, KeyboardInterrupt):
                mlflow.end_run("KILLED")
                raise
            except optuna.TrialPruned:
                mlflow.end_run("FINISHED")
                raise
    except StopRequested:
        if kwargs.get("nested"):
            raise
        raise SystemExit(
            f"Stopped by a signal: run {run.info.run_id} and its open child runs were marked KILLED. {stopped}".strip()
        ) from None


@contextmanager
def store_lock(timeout: float = 60.0) -> Iterator[None]:
    """With a local sqlite store, one process at a time: processes started together (workers, a job array) would
    all create the store's tables or the same experiment at once, and all but one would fail (mlflow#10334)."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        yield  # a tracking server handles concurrent clients itself
        return
    lock = Path(unquote(uri.removeprefix("sqlite:///")) + ".lock")  # MLflow percent-encodes a space, a "+"
    while True:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL))  # atomic: exactly one process creates the file
            break
        except FileExistsError:
            with suppress(FileNotFoundError):
                if time.time() - lock.stat().st_mtime > timeout:  # left behind by a killed process
                    lock.unlink()
            try:
                pause(0.1)
            except StopRequested:  # the lock comes before the first run: there is no run to mark KILLED yet
                raise SystemExit(
                    f"Stopped by a signal while waiting for {lock}, which another process holds while it sets up the "
                    "MLflow store: nothing was started, and the same command starts afresh."
                ) from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def use_experiment(name: str) -> str:
    """Select (or create) the experiment, tagged as classic model training for the UI; return its id. From here
    on, Ctrl-C and SIGTERM are stop requests: the runs end KILLED instead of being left RUNNING."""
    install_stop_handlers()
    with store_lock():
        try:
            experiment = mlflow.set_experiment(name)  # MLflow's default store (./mlflow.db), or MLFLOW_TRACKING_URI
        except MlflowException:  # a tracking server: another client created it a moment ago; it exists now
            experiment = mlflow.set_experiment(name)
        # When another process created the experiment a moment earlier, set_experiment returns it without making
        # it the active one, and this process's runs would land in the Default experiment: select it by id.
        experiment = mlflow.set_experiment(experiment_id=experiment.experiment_id)
        if experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
            with suppress(MlflowException):  # another process tagged it at the same moment
                mlflow.set_experiment_tags(EXPERIMENT_KIND)
    return experiment.experiment_id


def where_to_view(experiment_id: str, run_id: str) -> str:
    """Where to see the run, in the UI's model-training view (without the query it opens the GenAI view): on the
    tracking server itself when the tracking URI is one (it serves the UI), else in `mlflow ui` from this directory."""
    uri = mlflow.get_tracking_uri()
    on_server = uri.startswith(("http://", "https://"))
    base = uri.rstrip("/") if on_server else UI
    link = f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return link if on_server else f"`mlflow ui` from this directory, then {link}"


def print_where(experiment_id: str, run_id: str) -> None:
    """Say where the run is: the tracking URI, the root run's id, and the link to it in the UI."""
    print(f"Tracking URI: {mlflow.get_tracking_uri()}\nRoot run: {run_id}")
    print(f"View it: {where_to_view(experiment_id, run_id)}")


def log_step_losses(losses: list[float], first_step: int) -> None:
    """Log the training loss of every step of an epoch to the active run, in one write.

    One `log_batch` per epoch: a store round trip per step (~3 ms on sqlite) would slow the training loop.
    """
    now = int(time.time() * 1000)
    metrics = [Metric("train_loss", loss, now, first_step + i) for i, loss in enumerate(losses)]
    mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=metrics)
