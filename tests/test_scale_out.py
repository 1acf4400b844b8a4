"""Scaling out (docs/scaling_out.md): workers sharing step 4's studies in PostgreSQL and its runs in an MLflow
tracking server backed by PostgreSQL. Three workers with one killed mid-trial, workers that start at the same
moment, heartbeats that fail the trials of workers on other hosts, a heartbeat that outlasts a server away for a
while, and the SLURM job-array script.

The tests of workers and of other hosts' trials need PostgreSQL on 127.0.0.1 (`bash scripts/local_services.sh
postgres` starts it). Elsewhere they skip with that sentence; in CI (REPROAI_CI=1, set by .ci/run) they fail
instead."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
from conftest import REPO, SIDE_BY_SIDE, load_step_module, mlflow_server, run_script
from optuna.trial import TrialState

ADMIN_URL = os.environ.get("REPROAI_POSTGRES_URL", "postgresql://reproai:reproai@127.0.0.1:5432/postgres")
HOW = "PostgreSQL does not answer on 127.0.0.1: start it with `bash scripts/local_services.sh postgres`, then rerun."


@pytest.fixture(scope="module")
def postgres():
    """A factory of fresh PostgreSQL databases (dropped afterwards); skips, or in CI fails, without PostgreSQL."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        if os.environ.get("REPROAI_CI"):
            pytest.fail(f"{HOW} ({error})")
        pytest.skip(HOW)
    made = []

    def new_database() -> str:
        name = f"reproai_test_{uuid.uuid4().hex[:10]}"
        admin.execute(f"CREATE DATABASE {name}")
        made.append(name)
        return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    yield new_database
    for name in made:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a PostgreSQL backend store and its own artifact folder: its URL."""
    with mlflow_server(postgres(), tmp_path_factory.mktemp("tracking_server"), workers=2) as url:
        yield url


def worker(args: list[str], cwd: Path, tracking_uri: str, script: str = "step_4/train.py") -> subprocess.Popen:
    """One worker process, as the guide starts it."""
    env = {**os.environ, **SIDE_BY_SIDE, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def fold_studies(storage: optuna.storages.BaseStorage) -> dict[str, optuna.Study]:
    """The per-fold studies in a storage (not the `claim-` ones), by name."""
    names = [name for name in optuna.get_all_study_names(storage) if not name.startswith("claim-")]
    return {name: optuna.load_study(study_name=name, storage=storage) for name in names}


def draws_by_slot(study: optuna.Study) -> dict[int, dict]:
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    slots = [t.user_attrs["slot"] for t in finished]
    assert len(slots) == len(set(slots)), slots  # no slot finished twice
    return {t.user_attrs["slot"]: t.params for t in finished}


def test_three_workers_share_every_fold_and_one_killed_mid_trial_loses_nothing(
    postgres, server, split_file, step4_search, tmp_path
):
    """Three workers at once on folds 0/0 and 0/1 against PostgreSQL and the tracking server; one is SIGKILLed
    in the middle of a trial. The others finish: exactly three finished trials per fold with the values one
    process draws, the killed trial redone, one root run, every fold complete and refitted, no run RUNNING."""
    data_dir, path = split_file
    storage = postgres()
    args = [
        "--quick", "--data-dir", str(data_dir), "--split-file", str(path), "--num-workers", "0",
        "--num-threads", "1", "--n-root-splits", "1", "--storage", storage,
    ]  # fmt: skip
    studies_db = optuna.storages.RDBStorage(storage)  # one connection pool for all the looking; makes the tables
    workers = [worker(args, tmp_path, server) for _ in range(3)]
    victim, killed = workers[0], None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.5)
        for study in fold_studies(studies_db).values():
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if trial.user_attrs.get("pid") == str(victim.pid) and "mlflow_run_id" in trial.user_attrs:
                    os.killpg(victim.pid, signal.SIGKILL)
                    killed = (study.study_name, trial.number, trial.user_attrs["mlflow_run_id"])
    victim.communicate(timeout=60)
    assert killed is not None, "the victim never ran a trial"
    outputs = [w.communicate(timeout=900)[0] for w in workers[1:]]
    for w, output in zip(workers[1:], outputs, strict=True):
        assert w.returncode == 0, output[-3000:]

    client = mlflow.MlflowClient(server)
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "step_4"]
    experiment_id = client.get_experiment_by_name("step_4").experiment_id
    every = client.search_runs([experiment_id], max_results=1000)
    assert not [r.info.run_id for r in every if r.info.status == "RUNNING"]
    (root,) = [r for r in every if r.data.tags.get("run_level") == "root"]  # one root run, not one per worker
    link = f"{server}/#/experiments/{experiment_id}/runs/{root.info.run_id}?workflowType=machine_learning"
    assert all(f"View it: {link}\n" in output for output in outputs)  # on the server, which serves the UI

    expected = {}  # fold -> draws by slot, from one uninterrupted process (the step-4 fixture)
    original = mlflow.MlflowClient(f"sqlite:///{step4_search['cwd'] / 'mlflow.db'}")
    storage_of_fixture = f"{step4_search['cwd'] / 'optuna_studies.journal'}"
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage_of_fixture))
    for run in original.search_runs(
        [original.get_experiment_by_name("step_4").experiment_id], "tags.run_level = 'fold'"
    ):
        fold = (run.data.tags["root_split_id"], run.data.tags["nested_split_id"])
        expected[fold] = draws_by_slot(optuna.load_study(study_name=run.data.tags["optuna_study"], storage=journal))

    studies = fold_studies(studies_db)
    assert len(studies) == 2  # one study per fold, however many workers
    complete = [r for r in every if r.data.tags.get("fold_complete") == "true"]
    assert sorted((r.data.tags["root_split_id"], r.data.tags["nested_split_id"]) for r in complete) == [
        ("0", "0"), ("0", "1"),
    ]  # fmt: skip
    for fold_run in complete:
        assert fold_run.data.tags["mlflow.parentRunId"] == root.info.run_id
        assert fold_run.data.tags["refit_check"] == "identical"
        assert {"dev_roc_auc", "test_roc_auc", "threshold"} <= set(fold_run.data.metrics)
        study = studies[fold_run.data.tags["optuna_study"]]
        assert TrialState.RUNNING not in [t.state for t in study.trials]
        fold = (fold_run.data.tags["root_split_id"], fold_run.data.tags["nested_split_id"])
        assert draws_by_slot(study) == expected[fold]  # slots 0, 1, 2: the same values, none twice
        refit = client.get_run(fold_run.data.tags["refit_run_id"])
        assert refit.info.status == "FINISHED"
        assert {"predictions/test_predictions.csv", "predictions/dev_predictions.csv"} <= {
            a.path for a in client.list_artifacts(refit.info.run_id, "predictions")
        }  # uploaded through the server to its artifact store

    name, number, run_id = killed
    dead = studies[name].trials[number]
    assert dead.state == TrialState.FAIL and not dead.user_attrs.get("surplus")
    assert any("marked FAIL, redone" in output for output in outputs)
    assert client.get_run(run_id).info.status == "KILLED"
    assert dead.user_attrs["slot"] in draws_by_slot(studies[name])  # its slot was finished by another worker

    analysis = run_script(
        "step_4/analyze_predictions.py", "--storage", storage, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": server}
    )
    assert f"Run {root.info.run_id}: 2 completed fold(s)" in analysis.stdout
    figures = {a.path for a in client.list_artifacts(root.info.run_id, "figures/search")}
    assert {f"figures/search/fold-0-{nested}_history.png" for nested in (0, 1)} <= figures  # the studies, read back


RACE = """
import sys, time
sys.path.insert(0, {step!r})
import mlflow, optuna, studies
from support import resume, runs
storage, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
experiment_id = runs.use_experiment("race")
studies.open_study(storage, "race-study", optuna.pruners.NopPruner())
made = []
with resume.root_run(experiment_id, "race-key", "race", lambda: made.append(1), []) as root:
    print("ROOT", root.info.run_id, bool(made))
    with mlflow.start_run(nested=True) as child:  # as a fold run: in the active experiment
        print("CHILD", child.info.experiment_id)
"""


def test_workers_that_start_at_the_same_moment_make_one_study_one_experiment_one_root_run(postgres, server, tmp_path):
    """Six processes on an empty database start within a millisecond of each other: Optuna's tables, the study,
    the MLflow experiment and the root run are each created once, and every process gets the same ones."""
    storage = postgres()
    script = tmp_path / "race.py"
    script.write_text(textwrap.dedent(RACE.format(step=str(REPO / "step_4"))))
    start = f"{time.time() + 15:.3f}"  # after every process has imported torch, optuna and mlflow
    env = {**os.environ, **SIDE_BY_SIDE, "MLFLOW_TRACKING_URI": server}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), storage, start],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for _ in range(6)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("a process hung:\n" + "\n=====\n".join(p.communicate()[0][-3000:] for p in procs))
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    roots = [line.split() for output in outputs for line in output.splitlines() if line.startswith("ROOT")]
    assert len(roots) == 6 and len({run_id for _, run_id, _ in roots}) == 1
    assert [new for _, _, new in roots].count("True") == 1
    client = mlflow.MlflowClient(server)
    (experiment,) = client.search_experiments(filter_string="name = 'race'")
    assert client.get_run(roots[0][1]).info.experiment_id == experiment.experiment_id  # not in Default
    children = [line.split()[1] for output in outputs for line in output.splitlines() if line.startswith("CHILD")]
    assert children == [experiment.experiment_id] * 6  # every process's runs in the experiment, none in Default
    assert sorted(optuna.get_all_study_names(storage)) == ["race-study"]  # the root run is claimed in MLflow


def test_trials_of_gone_workers_on_other_hosts_are_failed_by_heartbeat(postgres, tmp_path, monkeypatch):
    """Three RUNNING trials of workers on another host (their pids cannot be checked): one whose heartbeat went
    stale, one that died before its first heartbeat, one alive. After the grace period the first two are FAIL
    and their MLflow runs KILLED; the live one is left alone, as is every trial before the grace period ends."""
    sharing = load_step_module("step_4", "sharing")
    monkeypatch.setattr(sharing, "TRIAL_GRACE_SECONDS", 1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("heartbeats", artifact_location=(tmp_path / "mlruns").as_uri())
    storage = sharing.open_storage(postgres())
    study = optuna.create_study(study_name="gone", storage=storage)
    trials, run_ids = [study.ask() for _ in range(3)], []
    for trial in trials:
        run_ids.append(client.create_run(experiment_id).info.run_id)
        for key, value in {"host": "another-host", "pid": "1", "mlflow_run_id": run_ids[-1]}.items():
            trial.set_user_attr(key, value)
    stale, never, alive = (t._trial_id for t in trials)  # noqa: SLF001
    storage.record_heartbeat(stale)
    storage.record_heartbeat(alive)

    sharing.sweep_dead_trials(study)  # sees `never` without a heartbeat for the first time
    assert [t.state for t in study.trials] == [TrialState.RUNNING] * 3
    time.sleep(2.5)
    storage.record_heartbeat(alive)
    sharing.sweep_dead_trials(study)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING]
    assert [client.get_run(r).info.status for r in run_ids] == ["KILLED", "KILLED", "RUNNING"]


def test_a_heartbeat_that_cannot_reach_the_server_keeps_trying(monkeypatch, capsys):
    """A tracking server away for a while must not stop a worker's heartbeats for good: other hosts would then take
    its runs for a dead process's and mark them KILLED while it works on."""
    resume = load_step_module("step_4", "resume")
    sent = []

    def set_tag(self, run_id, key, value):
        sent.append(value)
        if len(sent) == 2:
            raise mlflow.exceptions.MlflowException("API request to the server failed")

    monkeypatch.setattr(mlflow.MlflowClient, "set_tag", set_tag)
    monkeypatch.setattr(resume, "RUN_HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://127.0.0.1:1")  # heartbeats only with a server
    with resume.heartbeat("run-id"):
        time.sleep(0.6)
    assert len(sent) >= 5, sent  # beats after the failed one
    assert "heartbeat of run run-id not sent, trying again" in capsys.readouterr().err


def test_the_slurm_script_gives_each_array_task_its_fold_or_makes_it_a_worker(tmp_path):
    """The job-array script as SLURM would run it (dry run): one fold per task, or identical workers; step 5's
    folds through --set."""

    def command(step: str, mode: str, task: int) -> str:
        env = {
            **os.environ, "SLURM_ARRAY_TASK_ID": str(task), "REPROAI_STEP": step, "REPROAI_MODE": mode,
            "REPROAI_DRY_RUN": "1", "OPTUNA_STORAGE": "postgresql://u@db/optuna", "MLFLOW_TRACKING_URI": "http://t:5000",
        }  # fmt: skip
        proc = subprocess.run(["bash", str(REPO / "scripts/slurm_array.sh")], cwd=REPO, env=env, capture_output=True,
                              text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().splitlines()[-1]

    assert command("4", "fold", 3).endswith(
        "step_4/train.py --storage postgresql://u@db/optuna --root-split 1 --nested-split 1"
    )  # task 3 of 2 x 2 folds
    assert command("4", "worker", 5).endswith("step_4/train.py --storage postgresql://u@db/optuna")
    assert command("5", "fold", 0).endswith(
        "step_5/train.py --set search.storage=postgresql://u@db/optuna --set cv.root_split=0 --set cv.nested_split=0"
    )
