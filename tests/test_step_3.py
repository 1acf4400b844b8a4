"""Step 3: folds from the split file as MLflow runs, one fold alone, kill-and-resume, the dead-pid sweep."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import REPO, load_step_module, run_script

N_SMALL = 240


@pytest.fixture(scope="module")
def split_file(make_standin, tmp_path_factory) -> tuple[Path, Path]:
    """A 3 x 3 split file for the small stand-in (written next to it in a temp folder, not into the shared data)."""
    data_dir = make_standin(N_SMALL)
    path = tmp_path_factory.mktemp("splits") / "dataset_splits.json"
    run_script(
        "step_3/make_dataset_splits.py", "--data-dir", str(data_dir), "--k-root", "3", "--k-nested", "3",
        "--output", str(path), cwd=REPO,
    )  # fmt: skip
    return data_dir, path


def train_args(split_file: tuple[Path, Path], *extra: str) -> list[str]:
    """The quick step-3 command line on the small stand-in and its split file."""
    data_dir, path = split_file
    return ["--quick", "--data-dir", str(data_dir), "--split-file", str(path), "--num-workers", "0", *extra]


def fold_runs(client: mlflow.MlflowClient, complete_only: bool = True) -> dict[tuple[int, int], list]:
    """Fold runs of experiment step_3 by (root split, nested split)."""
    experiment = client.get_experiment_by_name("step_3")
    query = "tags.run_level = 'fold'" + (" AND tags.fold_complete = 'true'" if complete_only else "")
    runs: dict[tuple[int, int], list] = {}
    for run in client.search_runs([experiment.experiment_id], query):
        runs.setdefault((int(run.data.tags["root_split_id"]), int(run.data.tags["nested_split_id"])), []).append(run)
    return runs


@pytest.fixture(scope="module")
def cv(split_file, tmp_path_factory) -> dict:
    """The default 2 x 2 folds, then one more fold alone with the same settings, then the analysis."""
    cwd = tmp_path_factory.mktemp("step3")
    first = run_script("step_3/train.py", *train_args(split_file), cwd=cwd)
    single = run_script("step_3/train.py", *train_args(split_file, "--root-split", "2", "--nested-split", "0"), cwd=cwd)
    analysis = run_script("step_3/analyze_predictions.py", cwd=cwd)
    return {"cwd": cwd, "first": first, "single": single, "analysis": analysis,
            "client": mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")}  # fmt: skip


def test_each_fold_is_a_run_with_its_phases_under_one_root(cv, split_file):
    client = cv["client"]
    folds = fold_runs(client)
    assert sorted(folds) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert all(len(runs) == 1 for runs in folds.values())
    roots = {run.data.tags["mlflow.parentRunId"] for runs in folds.values() for run in runs}
    assert len(roots) == 1  # the single-fold command reopened the same root run
    root = client.get_run(roots.pop())
    assert root.info.status == "FINISHED" and root.data.tags["run_complete"] == "true"
    assert root.data.tags["split_file_digest"] and root.data.params["k_root"] == "3"
    assert {a.path for a in client.list_artifacts(root.info.run_id, "splits")} == {"splits/dataset_splits.json"}
    for (run,) in folds.values():
        assert run.data.tags["run_key"] == root.data.tags["run_key"]
        assert {"dev_roc_auc", "test_roc_auc", "threshold"} <= set(run.data.metrics)
        phases = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        assert sorted(p.data.tags["phase"] for p in phases) == ["finetune", "warmup"]
    assert "MLflow run reopened" in cv["single"].stdout and "fold 2/0 complete" in cv["single"].stdout


def test_quick_subsample_and_fold_sizes_follow_the_split_file(cv, split_file):
    splits = json.loads(split_file[1].read_text())
    run = fold_runs(cv["client"])[(1, 0)][0]
    assert int(run.data.params["n_test"]) == len(splits["root_splits"]["1"]["test_indices"])  # under the cap
    assert int(run.data.params["n_dev"]) == len(splits["root_splits"]["1"]["nested_splits"]["0"]["dev_indices"])


def test_analysis_pools_the_three_outer_folds(cv):
    client = cv["client"]
    root_id = fold_runs(client)[(0, 0)][0].data.tags["mlflow.parentRunId"]
    metrics = client.get_run(root_id).data.metrics
    assert metrics["analysis_n_outer_folds"] == 3
    assert "Nadeau" in cv["analysis"].stdout


def test_kill_after_the_first_fold_then_resume_gives_the_same_folds(cv, split_file, tmp_path):
    """SIGKILL (nothing can clean up) after fold 0/0; the same command again finishes the rest, retrains
    nothing that completed, and gives the per-fold metrics of the uninterrupted run."""
    args = train_args(split_file, "--n-root-splits", "1", "--n-nested-splits", "2")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "step_3/train.py"), *args], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    seen = io.StringIO()
    for line in proc.stdout:
        seen.write(line)
        if line.startswith("fold 0/0 complete"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, seen.getvalue()[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("step_3").experiment_id
    assert client.search_runs([experiment_id], "attributes.status = 'RUNNING'")  # the kill left runs RUNNING

    resumed = run_script("step_3/train.py", *args, cwd=tmp_path)
    assert "fold 0/0 already complete: skipped" in resumed.stdout and "fold 0/1 complete" in resumed.stdout
    assert "Marked KILLED" in resumed.stdout
    assert not client.search_runs([experiment_id], "attributes.status = 'RUNNING'")
    folds = fold_runs(client)
    assert sorted(folds) == [(0, 0), (0, 1)] and all(len(r) == 1 for r in folds.values())
    uninterrupted = fold_runs(cv["client"])
    for fold in folds:
        assert folds[fold][0].data.metrics == uninterrupted[fold][0].data.metrics, fold
    roots = client.search_runs([experiment_id], "tags.run_level = 'root'")
    assert len(roots) == 1 and roots[0].data.tags["run_complete"] == "true"


def test_dead_pid_sweep_marks_only_dead_processes_on_this_host(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "step_3"))
    train = load_step_module("step_3", "train")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("sweep")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()
    try:
        runs = {}
        for name, tags in (
            ("dead", {"host": host, "pid": str(dead.pid)}),
            ("alive", {"host": host, "pid": str(alive.pid)}),
            ("other_host", {"host": host + "-elsewhere", "pid": str(dead.pid)}),
        ):
            runs[name] = client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
        runs["child_of_dead"] = client.create_run(experiment_id, tags={"mlflow.parentRunId": runs["dead"]}).info.run_id
        killed = train.sweep_dead_runs(client, experiment_id)
        status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    finally:
        alive.kill()
        alive.wait()
    assert sorted(killed) == sorted([runs["dead"], runs["child_of_dead"]])
    assert status == {"dead": "KILLED", "alive": "RUNNING", "other_host": "RUNNING", "child_of_dead": "KILLED"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--root-split", "3", "--nested-split", "0"], "Fold (3, 0) is not in"),
        (["--root-split", "1"], "--root-split and --nested-split go together"),
        (["--n-root-splits", "7"], "--n-root-splits 7: give a number from 1 to 3"),
    ],
)
def test_bad_fold_choices_are_one_clear_sentence(split_file, tmp_path, extra, message):
    proc = run_script("step_3/train.py", *train_args(split_file, *extra), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # stopped before any run was created


def test_missing_split_file_says_how_to_make_it(make_standin, tmp_path):
    args = ["--quick", "--data-dir", str(make_standin(N_SMALL)), "--split-file", str(tmp_path / "none.json")]
    proc = run_script("step_3/train.py", *args, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "make_dataset_splits.py" in proc.stderr and "Traceback" not in proc.stderr
