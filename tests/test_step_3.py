"""Step 3: the split file (made, written atomically, validated on load), the folds as MLflow runs, one fold
alone, kill-and-resume, the dead-pid sweep, and the statistics across folds; a scrambled test split that reaches
no decision, --quick's caps, the frozen backbone, every input of the run key, and a root run whose record was never
written (tests/README.md lists the planted bugs these tests catch)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    REPO,
    assert_bit_identical,
    client_in,
    command_from_record,
    load_step_module,
    logged_predictions,
    main_captured,
    main_in_process,
    run_script,
    scramble_test_split,
    torch_settings_kept,
    user_error,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.entities import Metric, Param
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

N_SMALL = 240


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
    """The default 2 x 2 folds, then one more fold alone with the same settings, then the analysis, each as main()
    in this process (the tests that need a process of their own start one)."""
    cwd, single_fold = tmp_path_factory.mktemp("step3"), ["--root-split", "2", "--nested-split", "0"]
    first = main_captured("step_3/train.py", *train_args(split_file), cwd=cwd)
    single = main_captured("step_3/train.py", *train_args(split_file, *single_fold), cwd=cwd)
    analysis = main_captured("step_3/analyze_predictions.py", cwd=cwd)
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


def images_read(client: mlflow.MlflowClient, run: mlflow.entities.Run, tmp: Path) -> dict[str, list[str]]:
    """The image lists a fold run recorded from its DataLoaders, checked against their digest tags."""
    path = client.download_artifacts(run.info.run_id, "data/images.json", str(tmp / run.info.run_id))
    lists = json.loads(Path(path).read_text())
    for part, files in lists.items():
        assert run.data.tags[f"images_digest.{part}"] == hashlib.sha256("\n".join(files).encode()).hexdigest()
    return lists


def assert_fold_reads_only_its_own_images(lists: dict[str, list[str]], splits: dict, fold: tuple[int, int]) -> None:
    """Warm-up and training read only the fold's train images, early stopping its dev images, testing its test."""
    files, (root, nested) = splits["files"], fold
    allowed = {
        "train": splits["root_splits"][str(root)]["nested_splits"][str(nested)]["train_indices"],
        "dev": splits["root_splits"][str(root)]["nested_splits"][str(nested)]["dev_indices"],
        "test": splits["root_splits"][str(root)]["test_indices"],
    }
    assert lists["warmup"] == lists["train"], fold
    for part in ("train", "dev", "test"):
        outside = set(lists[part]) - {files[i] for i in allowed[part]}
        assert not outside, f"fold {fold}: {part} read {len(outside)} image(s) outside its part, e.g. {outside.pop()}"


def test_each_fold_reads_only_its_own_images(cv, split_file, tmp_path):
    """The leak guard on what the training code fed the model, not on the split file: a fold that trained on
    its test images (or tested on its training images) fails here."""
    splits = json.loads(split_file[1].read_text())
    for fold, (run,) in fold_runs(cv["client"]).items():
        lists = images_read(cv["client"], run, tmp_path)
        assert_fold_reads_only_its_own_images(lists, splits, fold)
        part_sizes = {part: len(lists[part]) for part in ("train", "dev", "test")}
        assert part_sizes == {part: int(run.data.params[f"n_{part}"]) for part in part_sizes}


def test_quick_caps_bite_at_full_quick_size(step3, make_standin, tmp_path):
    """One fold at a size where --quick's caps apply to train, dev and test: the fold reads exactly the seeded
    stratified subsample of its own parts (QUICK_SHARES of QUICK.max_images), nothing else."""
    data_dir = make_standin(step3.train.QUICK.max_images + 200)  # step 1's test builds this size too
    path = tmp_path / "splits.json"
    main_captured(  # 3 x 5 folds of 800 images: a test part of ~267, a nested dev part of ~107 and train of ~427
        "step_3/make_dataset_splits.py", "--data-dir", str(data_dir), "--k-root", "3", "--k-nested", "5",
        "--output", str(path), cwd=tmp_path,
    )  # fmt: skip
    args = [
        "--quick",
        "--data-dir",
        str(data_dir),
        "--split-file",
        str(path),
        "--root-split",
        "1",
        "--nested-split",
        "3",
    ]
    main_captured("step_3/train.py", *args, cwd=tmp_path)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = fold_runs(client)[(1, 3)]
    lists, splits = images_read(client, run, tmp_path), json.loads(path.read_text())
    assert_fold_reads_only_its_own_images(lists, splits, (1, 3))
    caps = {part: round(step3.train.QUICK.max_images * share) for part, share in step3.train.QUICK_SHARES.items()}
    assert {part: len(lists[part]) for part in caps} == caps  # every cap bit: each part is larger than its cap
    loaded = {"root_splits": {1: {"test": np.array(splits["root_splits"]["1"]["test_indices"]), "nested": {3: {
        part: np.array(splits["root_splits"]["1"]["nested_splits"]["3"][f"{part}_indices"]) for part in ("train", "dev")
    }}}}}  # fmt: skip
    labels = np.array([Path(f).name[0].isupper() for f in splits["files"]], dtype=int)  # capitalised breeds: cats
    expected = step3.splits.fold_indices(
        {**loaded, "labels": labels}, (1, 3), step3.train.QUICK.max_images, step3.train.QUICK_SHARES, 0
    )
    for part in caps:
        assert lists[part] == [splits["files"][i] for i in expected[part]], part
        share = np.mean(labels[expected[part]])
        whole = np.mean(labels[loaded["root_splits"][1]["test"] if part == "test" else
                               loaded["root_splits"][1]["nested"][3][part]])  # fmt: skip
        assert abs(share - whole) * caps[part] <= 1, part  # stratified: class shares kept within one image


def test_analysis_pools_the_three_outer_folds(cv):
    client = cv["client"]
    root_id = fold_runs(client)[(0, 0)][0].data.tags["mlflow.parentRunId"]
    metrics = client.get_run(root_id).data.metrics
    assert metrics["analysis_n_outer_folds"] == 3
    assert "Nadeau" in cv["analysis"].stdout


def test_the_analysis_leaves_no_downloaded_model_behind(cv, tmp_path, monkeypatch):
    """analyze_predictions.py rechecks every fold's logged model, which MLflow downloads first: into a temporary
    folder that is removed afterwards. (Left to MLflow, each stays in the temporary folder: ~45 MB a quick fold,
    every analysis.)"""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where this process's temporary folders go
    main_captured("step_3/analyze_predictions.py", cwd=cv["cwd"])
    checked = [run.data.tags.get("model_check") for runs in fold_runs(cv["client"]).values() for run in runs]
    assert checked and set(checked) == {"identical"}  # every fold's model was loaded and rechecked
    assert list(scratch.iterdir()) == []


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
    (killed,) = client.search_runs([experiment_id], "tags.run_level = 'root'")
    assert "run_complete" not in killed.data.tags  # complete only once every fold asked of it has completed
    assert {key for key in killed.data.tags if key.startswith("fold_asked.")} == {"fold_asked.0.0", "fold_asked.0.1"}

    resumed = run_script("step_3/train.py", *args, cwd=tmp_path)
    assert "fold 0/0 already complete: skipped" in resumed.stdout and "fold 0/1 complete" in resumed.stdout
    assert "Marked KILLED" in resumed.stdout
    assert not client.search_runs([experiment_id], "attributes.status = 'RUNNING'")
    folds = fold_runs(client)
    assert sorted(folds) == [(0, 0), (0, 1)] and all(len(r) == 1 for r in folds.values())
    uninterrupted = fold_runs(cv["client"])
    for fold in folds:
        pair = (client, folds[fold][0].info.run_id), (cv["client"], uninterrupted[fold][0].info.run_id)
        assert_bit_identical(f"step3-resume-fold-{fold[0]}-{fold[1]}", *pair, tmp_path / "compared")
        assert folds[fold][0].data.metrics == uninterrupted[fold][0].data.metrics, fold
    roots = client.search_runs([experiment_id], "tags.run_level = 'root'")
    assert len(roots) == 1 and roots[0].data.tags["run_complete"] == "true"


def test_a_fold_is_rerun_bit_for_bit_from_its_record_alone(cv, tmp_path):
    """Fold 2/0, rebuilt from what MLflow recorded (conftest.command_from_record: the root's params and logged split
    file, the fold run's params and tags) and run in a new folder, gives the same metrics and predictions."""
    (original,) = fold_runs(cv["client"])[(2, 0)]
    (cwd := tmp_path / "rerun").mkdir()
    run_script("step_3/train.py", *command_from_record(cv["client"], original, tmp_path), cwd=cwd)
    (again,) = fold_runs(client_in(cwd))[(2, 0)]
    pair = (client_in(cwd), again.info.run_id), (cv["client"], original.info.run_id)
    assert_bit_identical("step3-rerun-from-record", *pair, tmp_path / "compared")
    assert again.data.metrics == original.data.metrics
    assert logged_predictions(client_in(cwd), again.info.run_id, tmp_path) == logged_predictions(
        cv["client"], original.info.run_id, tmp_path
    )


def test_worker_processes_change_no_bit(cv, tmp_path):
    """Fold 2/0 again, from its record, but with two worker processes augmenting the images: the metrics and
    predictions of the fixture's run without workers, bit for bit. Workers that drew the augmentation from their own
    random state instead of the per-sample seed would give other bits, and so would workers kept for the loader's
    life (persistent_workers), which change the shuffling order: the DataLoader draws its workers' seed from the
    generator that shuffles whenever it starts them."""
    (original,) = fold_runs(cv["client"])[(2, 0)]
    flags = command_from_record(cv["client"], original, tmp_path)
    assert flags[flags.index("--num-workers") + 1] == "0"
    flags[flags.index("--num-workers") + 1] = "2"
    (cwd := tmp_path / "workers").mkdir()
    run_script("step_3/train.py", *flags, cwd=cwd)
    (again,) = fold_runs(client_in(cwd))[(2, 0)]
    assert again.data.params["num_workers"] == "2"
    pair = (client_in(cwd), again.info.run_id), (cv["client"], original.info.run_id)
    assert_bit_identical("step3-workers-0-vs-2", *pair, tmp_path / "compared")
    assert again.data.metrics == original.data.metrics
    assert logged_predictions(client_in(cwd), again.info.run_id, tmp_path) == logged_predictions(
        cv["client"], original.info.run_id, tmp_path
    )


def test_dead_pid_sweep_marks_only_dead_processes_on_this_host(tmp_path):
    resume = load_step_module("step_3", "resume")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("sweep", artifact_location=(tmp_path / "mlruns").as_uri())
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
        killed = resume.sweep_dead_runs(client, experiment_id)
        status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    finally:
        alive.kill()
        alive.wait()
    assert sorted(killed) == sorted([runs["dead"], runs["child_of_dead"]])
    assert status == {"dead": "KILLED", "alive": "RUNNING", "other_host": "RUNNING", "child_of_dead": "KILLED"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--root-split", "3", "--nested-split", "0"], "Fold (3, 0) (--root-split, --nested-split) is not in"),
        (["--root-split", "1"], "--root-split and --nested-split go together"),
        (["--n-root-splits", "7"], "--n-root-splits 7: give a number from 1 to 3"),
    ],
)
def test_bad_fold_choices_are_one_clear_sentence(split_file, tmp_path, monkeypatch, extra, message):
    assert message in user_error("step_3/train.py", train_args(split_file, *extra), tmp_path, monkeypatch)
    assert not (tmp_path / "mlflow.db").exists()  # stopped before any run was created


def test_missing_split_file_says_how_to_make_it(make_standin, tmp_path, monkeypatch):
    args = ["--quick", "--data-dir", str(make_standin(N_SMALL)), "--split-file", str(tmp_path / "none.json")]
    assert "make_dataset_splits.py" in user_error("step_3/train.py", args, tmp_path, monkeypatch)


# ----------------------------------------------------------------------------------------------------------
# Leak guards: no decision of a fold reads its test split (tests/README.md lists the bugs these catch)
def dev_auc_by_epoch(client: mlflow.MlflowClient, run: mlflow.entities.Run) -> dict[str, list[tuple[int, float]]]:
    """Each phase run's dev ROC AUC after each epoch: what early stopping decided on."""
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    metric = "dev_roc_auc"
    return {
        child.data.tags["phase"]: [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, metric)]
        for child in children
    }


def test_no_decision_of_a_fold_reads_its_test_split(cv, split_file, tmp_path, monkeypatch):
    """The leak guard of step 3 (conftest.scramble_test_split, as in steps 4 and 5): fold 0/0 of the cv fixture
    again, in this process, with every test label of outer fold 0 flipped (after the split file was loaded and
    checked) and every test image read as noise. Every decision must come out bit for bit the same: the images of
    each part, early stopping (each epoch's dev ROC AUC, the phase and epoch kept), the dev predictions and the
    threshold fitted on them; so must any statistic of the images read after the split file is loaded (the
    normalisation). Only the test results change: proof that the scrambled test split was used where it belongs."""
    train = load_step_module("step_3", "train")
    scramble_test_split(train, 0, tmp_path, monkeypatch)
    fold = ["--root-split", "0", "--nested-split", "0"]  # as the cv fixture ran it, in its first command
    with torch_settings_kept():
        main_in_process(train, train_args(split_file, *fold), tmp_path, monkeypatch)
    client = client_in(tmp_path)
    (new,) = fold_runs(client)[(0, 0)]
    (old,) = fold_runs(cv["client"])[(0, 0)]
    assert images_read(client, new, tmp_path) == images_read(cv["client"], old, tmp_path)
    assert new.data.params == old.data.params  # seed, threads, workers and the size of each part
    for metric in ("dev_roc_auc", "threshold"):
        assert new.data.metrics[metric] == old.data.metrics[metric], metric
    kept = ("best_phase", "best_epoch")
    assert {t: new.data.tags[t] for t in kept} == {t: old.data.tags[t] for t in kept}
    assert dev_auc_by_epoch(client, new) == dev_auc_by_epoch(cv["client"], old)  # early stopping saw the same
    predictions = logged_predictions(client, new.info.run_id, tmp_path)
    before = logged_predictions(cv["client"], old.info.run_id, tmp_path)
    assert predictions["dev"] == before["dev"]
    tables = [pd.read_csv(io.BytesIO(p["test"])) for p in (predictions, before)]
    assert (tables[0]["label"] == 1 - tables[1]["label"]).all()  # the flipped labels reached the test ...
    assert not np.array_equal(tables[0]["score"], tables[1]["score"])  # ... and so did the noise
    assert new.data.metrics["test_roc_auc"] != old.data.metrics["test_roc_auc"]


def test_quick_caps_of_train_and_dev_read_no_test_label(step3):
    """--quick's caps subsample each part of a fold on that part's own labels (fold_indices), at a size where every
    cap bites: with the test labels shuffled, exactly the same train and dev images are kept; only the test
    subsample, stratified on the test labels, changes."""
    rng, cap = np.random.default_rng(0), step3.train.QUICK.max_images
    labels, order = rng.integers(0, 2, 2000), rng.permutation(2000)
    test, train, dev = np.sort(order[:500]), np.sort(order[500:1600]), np.sort(order[1600:])
    splits = {"labels": labels, "root_splits": {0: {"test": test, "nested": {0: {"train": train, "dev": dev}}}}}
    shuffled = labels.copy()
    shuffled[test] = rng.permutation(labels[test])
    shares = step3.train.QUICK_SHARES
    before = step3.splits.fold_indices(splits, (0, 0), cap, shares, 0)
    after = step3.splits.fold_indices({**splits, "labels": shuffled}, (0, 0), cap, shares, 0)
    for part in ("train", "dev"):
        assert np.array_equal(after[part], before[part]), f"the {part} subsample depends on the test labels"
    assert not np.array_equal(after["test"], before["test"])
    caps = {part: round(cap * share) for part, share in step3.train.QUICK_SHARES.items()}
    assert {part: len(before[part]) for part in caps} == caps  # every cap bit


def tiny_loader(seed: int) -> DataLoader:
    """16 random 32 px images far from BatchNorm's statistics, alternating labels, as the training code reads them."""
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    dataset = TensorDataset(images, torch.arange(16.0) % 2)
    dataset.labels, dataset.epoch = np.arange(16) % 2, 0
    return DataLoader(dataset, batch_size=8)


def test_the_warm_up_moves_the_head_and_nothing_of_the_frozen_backbone(step3, tmp_path, monkeypatch):
    """One warm-up epoch through fit: the head learns, and not one weight or BatchNorm running statistic of the
    frozen backbone moves (a backbone left in train mode updates its running statistics on every batch: an epoch
    with freeze_backbone off, on the same images, shows that they do move them)."""
    train = step3.training
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    settings = dataclasses.replace(step3.train.QUICK, warmup_epochs=1, finetune_epochs=0)
    torch.manual_seed(0)
    model = train.build_model(settings)
    loaders = {"warmup": tiny_loader(0), "dev": tiny_loader(1)}
    loaders["train"] = loaders["warmup"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    best = train.fit(model, loaders, settings, torch.device("cpu"))
    assert best["phase"] == "warmup" and mlflow.active_run() is None  # the phase runs were closed
    moved = [k for k in before if k.startswith("backbone.") and not torch.equal(before[k], best["state"][k])]
    assert not moved, f"the warm-up moved the frozen backbone: {moved[:3]}"
    assert not torch.equal(before["head.0.weight"], best["state"]["head.0.weight"])
    optimizer = torch.optim.AdamW(model.head.parameters())
    with mlflow.start_run():
        cpu = torch.device("cpu")
        train.train_one_epoch(model, loaders["warmup"], optimizer, cpu, 1, False, train.Precision("cpu", "fp32"))
    assert not torch.equal(before["backbone.bn1.running_mean"], model.state_dict()["backbone.bn1.running_mean"])


def count_calls(module: torch.nn.Module) -> list:
    """A list that grows by one with every forward call of the module."""
    calls: list = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_the_warm_up_features_are_the_frozen_backbones_computed_once(step3, make_standin, tmp_path):
    """The warm-up's features are the eval-mode backbone's output for the loader's batches, bit for bit; a second
    model with the same weights reads them from this process's cache without running its backbone; other weights or
    a changed image file compute them again; the feature loader shuffles in the image loader's order."""
    train, settings = step3.training, step3.train.QUICK
    folder = make_standin(N_SMALL) / "oxford-iiit-pet" / "images"
    (copies := tmp_path / "images").mkdir()  # copies: one of them is changed below
    paths = [Path(shutil.copy2(path, copies)) for path in sorted(folder.glob("*.jpg"))[:40]]
    labels = np.arange(40) % 2
    args = SimpleNamespace(seed=0, num_workers=0)
    split = {"train": np.arange(0, 24), "dev": np.arange(24, 40)}
    fp32, cpu = train.Precision("cpu", "fp32"), torch.device("cpu")

    def features(seed: int) -> tuple[dict, list, dict]:
        torch.manual_seed(seed)
        model = train.build_model(settings)
        loaders = train.make_loaders(paths, labels, split, settings, args, cpu)
        calls = count_calls(model.backbone)
        made = train.frozen_features(model.backbone, {"train": loaders["warmup"], "dev": loaders["dev"]}, fp32)
        return made, calls, {"model": model, **loaders}

    made, calls, first = features(seed=0)
    assert len(calls) == 2  # one batch of 24 train images, one of 16 dev images (batches of 32)
    model = first["model"].eval()
    with torch.no_grad():
        for name, loader in (("train", first["warmup"]), ("dev", first["dev"])):
            expected = torch.cat([model.backbone(images) for images, _ in DataLoader(loader.dataset, 32)])
            assert torch.equal(made[name].dataset.features, expected), name
    assert list(made["train"].sampler) == list(first["warmup"].sampler)  # the same shuffling order
    assert list(made["dev"].sampler) == list(range(16))

    again, calls, _ = features(seed=0)
    assert not calls and all(torch.equal(again[n].dataset.features, made[n].dataset.features) for n in made)
    _, calls, _ = features(seed=1)
    assert len(calls) == 2  # other weights
    os.utime(paths[30], ns=(1, 1))  # a dev image's file changed (its modification time)
    again, calls, _ = features(seed=0)
    assert len(calls) == 1 and torch.equal(again["train"].dataset.features, made["train"].dataset.features)


def test_the_warm_up_features_are_kept_apart_for_another_batch_size_or_image_size(step3, make_standin, tmp_path):
    """Trainings in one process that differ only in the batch size (the last bits of a batch's features depend on
    what else is in it) or only in the image size each compute their own features, and each finds its own again."""
    train = step3.training
    folder = make_standin(N_SMALL) / "oxford-iiit-pet" / "images"
    paths = [Path(shutil.copy2(path, tmp_path)) for path in sorted(folder.glob("*.jpg"))[:12]]  # this test's files
    split, args = {"train": np.arange(12)}, SimpleNamespace(seed=0, num_workers=0)
    fp32, cpu = train.Precision("cpu", "fp32"), torch.device("cpu")
    variants = {
        "as quick": step3.train.QUICK,
        "batch size": dataclasses.replace(step3.train.QUICK, batch_size=5),
        "image size": dataclasses.replace(step3.train.QUICK, image_size=80),
    }

    def features(settings: object) -> tuple[torch.Tensor, int, torch.Tensor]:
        """The warm-up's features for these settings, how many batches the backbone computed for them, and the
        eval-mode backbone's output for the loader's own batches."""
        torch.manual_seed(0)  # the same weights every time
        model = train.build_model(settings)
        loader = train.make_loaders(paths, np.arange(12) % 2, split, settings, args, cpu)["warmup"]
        calls = count_calls(model.backbone)
        made = train.frozen_features(model.backbone, {"train": loader}, fp32)["train"].dataset.features
        computed = len(calls)
        with torch.no_grad():
            batches = DataLoader(loader.dataset, settings.batch_size)
            expected = torch.cat([model.backbone.eval()(images) for images, _ in batches])
        return made, computed, expected

    first = {name: features(variant) for name, variant in variants.items()}
    assert [computed for _, computed, _ in first.values()] == [1, 3, 1]  # 12 images: batches of 32, of 5, of 32
    for name, (made, _, expected) in first.items():
        assert torch.equal(made, expected), name
    for name, variant in variants.items():  # each found again: none computed twice
        made, computed, _ = features(variant)
        assert not computed and torch.equal(made, first[name][0]), name


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_mixed_precision_reruns_bit_for_bit_with_fp32_weights(step3, tmp_path, monkeypatch, name):
    """The mixed-precision path that a CUDA GPU takes by default (autocast, channels_last, for fp16 the gradient
    scaler), run on the CPU: a warm-up and a fine-tuning epoch twice from the same seed give the same bits, the
    weights stay fp32, the phase runs log the precision, and the bits differ from fp32's. On a CPU the default is
    fp32, with or without --amp."""
    train = step3.training
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    settings = dataclasses.replace(step3.train.QUICK, warmup_epochs=1, finetune_epochs=1)
    loaders = {"warmup": tiny_loader(0), "dev": tiny_loader(1)}
    loaders["train"] = loaders["warmup"]

    def fit(precision: str) -> dict:
        torch.manual_seed(0)
        model = train.build_model(settings)
        best = train.fit(model, loaders, settings, torch.device("cpu"), precision=train.Precision("cpu", precision))
        return best["state"]

    first, second, fp32 = fit(name), fit(name), fit("fp32")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(v.dtype == torch.float32 for v in first.values() if v.is_floating_point())
    assert not all(torch.equal(first[k], fp32[k]) for k in first)
    assert train.Precision("cpu", name).scaler.is_enabled() == (name == "fp16")
    phases = mlflow.search_runs(search_all_experiments=True)
    assert sorted(phases["params.precision"]) == sorted([name, name, name, name, "fp32", "fp32"])
    assert {train.choose_precision(torch.device("cpu"), amp).name for amp in (True, False)} == {"fp32"}


# ----------------------------------------------------------------------------------------------------------
# The run key: whether a root run is reopened and its complete folds skipped (tests/README.md lists the bugs)
def instant_training(calls: list) -> Callable[..., dict]:
    """train_and_evaluate without the training: fixed results, logged on the fold run as the real one logs them."""

    def train_and_evaluate(paths, labels, split, settings, args, device) -> dict:
        calls.append(split)
        results = {"dev_roc_auc": 0.75, "test_roc_auc": 0.7, "threshold": 0.5, "best_phase": "warmup", "best_epoch": 1}
        mlflow.log_metrics({key: results[key] for key in ("dev_roc_auc", "test_roc_auc", "threshold")})
        return results

    return train_and_evaluate


def key_command(standin_split: dict, *changes: str) -> list[str]:
    """Quick fold 0/0 of the 120-image stand-in, every flag of the run key given; `changes` override (argparse
    keeps the last value of a flag)."""
    return [
        "--quick", "--data-dir", str(standin_split["folder"].parent), "--split-file", str(standin_split["path"]),
        "--seed", "0", "--num-threads", "2", "--deterministic", "--num-workers", "0",
        "--root-split", "0", "--nested-split", "0", *changes,
    ]  # fmt: skip


def root_runs(client: mlflow.MlflowClient) -> list[mlflow.entities.Run]:
    """The root runs of experiment step_3, oldest first."""
    experiment = client.get_experiment_by_name("step_3")
    return client.search_runs(
        [experiment.experiment_id], "tags.run_level = 'root'", order_by=["attributes.start_time ASC"]
    )


@pytest.fixture(scope="module")
def keyed_store(step3, standin_split, tmp_path_factory) -> dict:
    """A store in which key_command completed fold 0/0 (with instant training): where the key tests start."""
    cwd = tmp_path_factory.mktemp("keyed")
    with pytest.MonkeyPatch.context() as patch, torch_settings_kept():
        patch.setattr(step3.train, "train_and_evaluate", instant_training([]))
        main_in_process(step3.train, key_command(standin_split), cwd, patch)
    (root,) = root_runs(client_in(cwd))
    return {"cwd": cwd, "root": root}


def test_code_digest_follows_the_python_files_and_nothing_else(tmp_path):
    """provenance.code_digest, the run key's input for the code: an edit to a .py file of the folder or of its
    support/, one more .py file, or a module moved between them gives another digest; an edit to another file, or
    the same files in another folder, does not."""
    provenance = load_step_module("step_3", "provenance")
    (code := tmp_path / "step").mkdir()
    (code / "train.py").write_text("x = 1\n")
    (code / "README.md").write_text("# notes\n")
    digest = provenance.code_digest(code)
    (code / "README.md").write_text("# other notes\n")
    assert provenance.code_digest(code) == digest
    assert provenance.code_digest(Path(shutil.copytree(code, tmp_path / "elsewhere"))) == digest
    (code / "train.py").write_text("x = 2\n")
    assert provenance.code_digest(code) != digest
    (code / "train.py").write_text("x = 1\n")
    assert provenance.code_digest(code) == digest
    (code / "helper.py").write_text("")
    assert (with_helper := provenance.code_digest(code)) != digest
    (code / "support").mkdir()
    (code / "support" / "pets.py").write_text("SIZE = 64\n")
    assert (with_support := provenance.code_digest(code)) != with_helper  # a module of the machinery is code too
    (code / "support" / "pets.py").write_text("SIZE = 32\n")
    assert provenance.code_digest(code) != with_support
    (code / "support" / "pets.py").write_text("SIZE = 64\n")
    assert provenance.code_digest(code) == with_support
    (code / "support" / "pets.py").rename(code / "pets.py")  # the same bytes, moved out of support/
    assert provenance.code_digest(code) not in (with_helper, with_support)


KEY_INPUTS = ["nothing", "seed", "threads", "determinism", "settings", "split file", "code", "code paths"]


@pytest.mark.parametrize("change", KEY_INPUTS)
def test_the_same_inputs_reopen_the_root_and_any_other_input_makes_a_new_one(
    change, step3, standin_split, keyed_store, tmp_path, monkeypatch, capsys
):
    """After fold 0/0 completed: the same command reopens its root run (its record complete) and skips the fold;
    a change to any one input of the run key makes a new root run that trains the fold again, rather than report
    the old results as its own. The code is changed as an edit would change it: train.py with one more comment
    line, in a copy of the step folder that main() digests instead of its own."""
    shutil.copy(keyed_store["cwd"] / "mlflow.db", tmp_path / "mlflow.db")  # the artifacts stay where they are
    train, calls, flags = step3.train, [], []
    monkeypatch.setattr(train, "train_and_evaluate", instant_training(calls))
    if change in ("seed", "threads", "determinism"):
        flags = {"seed": ["--seed", "1"], "threads": ["--num-threads", "1"], "determinism": ["--no-deterministic"]}
        flags = flags[change]
    elif change == "settings":
        monkeypatch.setattr(train, "QUICK", dataclasses.replace(train.QUICK, dropout=train.QUICK.dropout + 0.1))
    elif change == "split file":  # another valid split file of the same data: other folds (another seed)
        files, digest = standin_split["splits"]["files"], standin_split["splits"]["meta"]["dataset_digest"]
        labels = np.array([standin_split["labels"][f] for f in files])
        step3.splits.write_splits(step3.splits.make_splits(files, labels, 3, 3, 1, digest), tmp_path / "other.json")
        flags = ["--split-file", str(tmp_path / "other.json")]
    elif change == "code":
        real_code_digest = train.code_digest

        def edited(folder: Path) -> str:
            copy = Path(shutil.copytree(folder, tmp_path / "code", ignore=shutil.ignore_patterns("__pycache__")))
            (copy / "train.py").write_text((folder / "train.py").read_text() + "# one more comment\n")
            return real_code_digest(copy)

        monkeypatch.setattr(train, "code_digest", edited)
    elif change == "code paths":  # as on a CPU whose torch kernels run AVX-512 code (--no-portable there)
        real_pin = train.pin_code_paths
        monkeypatch.setattr(
            train, "pin_code_paths", lambda portable: {**real_pin(portable), "cpu_capability": "AVX512"}
        )
    with torch_settings_kept():
        main_in_process(train, key_command(standin_split, *flags), tmp_path, monkeypatch)
    out, client = capsys.readouterr().out, client_in(tmp_path)
    first, *others = root_runs(client)
    assert first.info.run_id == keyed_store["root"].info.run_id
    if change == "nothing":
        assert f"MLflow run reopened: {first.info.run_id}" in out and "fold 0/0 already complete: skipped" in out
        assert not calls and not others  # nothing trained again, no second root
        assert first.data.tags["root_record"] == "complete" and first.data.tags["run_complete"] == "true"
        return
    assert [len(others), len(calls)] == [1, 1], f"{change}: the old root was reopened and its fold skipped"
    (new,) = others
    assert f"MLflow run started: {new.info.run_id}" in out and "already complete" not in out
    assert new.data.tags["run_key"] != first.data.tags["run_key"] and new.data.tags["root_record"] == "complete"
    parents = sorted(run.data.tags["mlflow.parentRunId"] for run in fold_runs(client)[(0, 0)])
    assert parents == sorted([first.info.run_id, new.info.run_id])  # fold 0/0 complete under each root


def test_a_root_without_its_whole_record_is_never_reopened(step3, standin_split, tmp_path, monkeypatch, capsys):
    """The first command fails while it writes the root's record (its provenance, to an artifact store it cannot
    write): that root has no tag root_record and no fold. The same command again starts a new root and records it
    whole, rather than reopen a root whose params and provenance are missing."""
    train, calls = step3.train, []
    monkeypatch.setattr(train, "train_and_evaluate", instant_training(calls))

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "mlruns")

    with monkeypatch.context() as broken, torch_settings_kept():
        broken.setattr(train, "log_provenance", unwritable)
        with pytest.raises(PermissionError):
            main_in_process(train, key_command(standin_split), tmp_path, broken)
    with torch_settings_kept():
        main_in_process(train, key_command(standin_split), tmp_path, monkeypatch)
    out, client = capsys.readouterr().out, client_in(tmp_path)
    roots = root_runs(client)
    assert len(roots) == 2, "the second command reopened the root whose record was never written"
    failed, root = roots
    assert failed.info.status == "FAILED" and "root_record" not in failed.data.tags
    assert f"MLflow run started: {root.info.run_id}" in out and len(calls) == 1
    assert root.data.tags["root_record"] == "complete" and root.data.tags["run_complete"] == "true"
    assert root.data.params["seed"] == "0" and root.data.tags["code_digest"]  # the record: params, provenance
    assert {a.path for a in client.list_artifacts(root.info.run_id, "splits")} == {"splits/dataset_splits.json"}


N_SPLITS = 120  # images in the stand-in; one of them is a planted truncated JPEG
REMAKE = "regenerate it with python step_3/make_dataset_splits.py"


@pytest.fixture(scope="module")
def step3() -> SimpleNamespace:
    """step_3's splits, train, training, analyze_predictions, cv_stats and make_dataset_splits modules."""
    return SimpleNamespace(
        splits=load_step_module("step_3", "splits"),
        train=load_step_module("step_3", "train"),
        training=load_step_module("step_3", "training"),
        analysis=load_step_module("step_3", "analyze_predictions"),
        cv_stats=load_step_module("step_3", "cv_stats"),
        make=load_step_module("step_3", "make_dataset_splits"),
    )


# ----------------------------------------------------------------------------------------------------------
# make_splits: properties over random dataset sizes, class balances and fold counts
@st.composite
def datasets(draw) -> dict:
    """Files, binary labels and fold counts for which every test and dev set can hold each class."""
    k_root, k_nested = draw(st.integers(2, 6)), draw(st.integers(2, 5))
    smallest = next(m for m in range(1, 100) if m >= k_root and m - math.ceil(m / k_root) >= k_nested)
    n_small = draw(st.integers(smallest, smallest + 30))
    n_large = draw(st.integers(n_small, n_small + 150))
    n_cats, n_dogs = (n_small, n_large) if draw(st.booleans()) else (n_large, n_small)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = rng.permutation(np.r_[np.ones(n_cats, int), np.zeros(n_dogs, int)])
    files = [f"images/pet_{i:04d}.jpg" for i in range(len(labels))]
    return {"files": files, "labels": labels, "k_root": k_root, "k_nested": k_nested, "seed": draw(st.integers(0, 99))}


@settings(max_examples=40, deadline=None)
@given(data=datasets())
def test_make_splits_always_partitions_stratifies_and_validates(step3, data):
    splits = step3.splits.make_splits(
        data["files"], data["labels"], data["k_root"], data["k_nested"], data["seed"], "d" * 64
    )
    labels, n = data["labels"], len(data["labels"])
    step3.splits.check_structure(splits, labels, "x.json")  # SystemExit would fail the test
    assert json.loads(json.dumps(splits)) == splits  # JSON-able as it is
    assert splits["files"] == data["files"] and splits["meta"]["n_files"] == n
    assert splits["meta"]["class_counts"] == {"cat": int(labels.sum()), "dog": int(n - labels.sum())}
    roots = splits["root_splits"]
    assert sorted(roots, key=int) == [str(i) for i in range(data["k_root"])]
    all_tests = sorted(i for split in roots.values() for i in split["test_indices"])
    assert all_tests == list(range(n))  # every file in exactly one outer test set
    for split in roots.values():
        test = split["test_indices"]
        assert test == sorted(test) and {0, 1} <= set(labels[test])
        pool = sorted(set(range(n)) - set(test))
        assert abs(np.sum(labels[test]) - len(test) * labels.mean()) <= 1 + 1e-9  # stratified against all files
        assert sorted(i for p in split["nested_splits"].values() for i in p["dev_indices"]) == pool
        assert len(split["nested_splits"]) == data["k_nested"]
        for parts in split["nested_splits"].values():
            train, dev = parts["train_indices"], parts["dev_indices"]
            assert sorted(train + dev + test) == list(range(n)) and not set(train) & set(dev)
            assert {0, 1} <= set(labels[dev])
            for part in (train, dev):  # stratified against the outer fold's pool
                assert abs(np.sum(labels[part]) - len(part) * labels[pool].mean()) <= 1 + 1e-9
    again = step3.splits.make_splits(
        list(data["files"]), labels.copy(), data["k_root"], data["k_nested"], data["seed"], "d" * 64
    )
    assert again == splits


@settings(max_examples=20, deadline=None)
@given(data=datasets(), which=st.sampled_from(["leak", "drop"]))
def test_check_structure_catches_a_damaged_fold(step3, data, which):
    splits = step3.splits.make_splits(
        data["files"], data["labels"], data["k_root"], data["k_nested"], data["seed"], "d" * 64
    )
    parts = splits["root_splits"]["1"]["nested_splits"]["0"]
    if which == "leak":  # a test image also in training
        parts["train_indices"] = sorted([*parts["train_indices"], splits["root_splits"]["1"]["test_indices"][0]])
        expected = "root split 1, nested split 0: train and test share 1 index"
    else:  # an image in no part of the fold
        parts["dev_indices"] = parts["dev_indices"][1:]
        expected = "root split 1, nested split 0: 1 files are in no part"
    with pytest.raises(SystemExit, match=expected):
        step3.splits.check_structure(splits, data["labels"], "x.json")


def test_make_splits_refuses_too_many_folds_for_a_class(step3):
    labels = np.r_[np.ones(4, int), np.zeros(40, int)]
    files = [f"images/p{i:02d}.jpg" for i in range(44)]
    with pytest.raises(SystemExit, match=r"Only 4 cat image\(s\): too few for 5 outer x 2 nested folds"):
        step3.splits.make_splits(files, labels, 5, 2, 0, "d")
    with pytest.raises(SystemExit, match="at least 2 folds"):
        step3.splits.make_splits(files, labels, 1, 2, 0, "d")
    assert step3.splits.make_splits(files, labels, 2, 2, 0, "d")["meta"]["k_root"] == 2  # 4 cats: 2 x 2 works


def test_check_structure_refuses_a_fold_that_is_not_stratified(step3):
    labels = np.r_[np.ones(30, int), np.zeros(60, int)]
    files = [f"images/p{i:02d}.jpg" for i in range(90)]
    splits = step3.splits.make_splits(files, labels, 3, 2, 0, "d")
    step3.splits.check_structure(splits, labels, "x.json")
    test = splits["root_splits"]["0"]["test_indices"]
    skewed = np.zeros(90, int)
    skewed[test[:25] + [i for i in range(90) if i not in test][:5]] = 1  # still 30 cats, but 25 in one test set
    with pytest.raises(SystemExit, match=r"x.json: root split 0, nested split 0: test holds 5 dog images where "):
        step3.splits.check_structure(splits, skewed, "x.json")


def test_check_structure_wants_each_class_in_every_test_and_dev_set(step3):
    labels = np.array([1, 1, 0, 0, 0, 1, 1, 0, 0, 0])  # two cats in each half

    def fold(test: list[int], dev_sets: list[list[int]]) -> dict:
        pool = sorted(set(range(10)) - set(test))
        nested = {
            str(i): {"dev_indices": d, "train_indices": sorted(set(pool) - set(d))} for i, d in enumerate(dev_sets)
        }
        return {"test_indices": test, "nested_splits": nested}

    meta = {"format_version": 1, "dataset_digest": "d", "k_root": 2, "k_nested": 2}
    files = [f"images/p{i}.jpg" for i in range(10)]
    good = {"0": fold([0, 1, 2, 3, 4], [[5, 7], [6, 8]]), "1": fold([5, 6, 7, 8, 9], [[0, 2], [1, 3]])}
    step3.splits.check_structure({"meta": meta, "files": files, "root_splits": good}, labels, "x.json")
    # the dev set [7, 8] holds no cat: within 1 of its share (2 x 2/5 = 0.8), but its ROC AUC is undefined
    bad = {**good, "0": fold([0, 1, 2, 3, 4], [[7, 8], [5, 6]])}
    with pytest.raises(SystemExit, match=r"root split 0, nested split 0: dev holds 0 cat images where .* needs 0.8"):
        step3.splits.check_structure({"meta": meta, "files": files, "root_splits": bad}, labels, "x.json")


def test_write_splits_is_deterministic_and_atomic(step3, tmp_path, monkeypatch):
    labels = np.r_[np.ones(12, int), np.zeros(20, int)]
    splits = step3.splits.make_splits([f"images/p{i:02d}.jpg" for i in range(32)], labels, 3, 2, 7, "d")
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    step3.splits.write_splits(splits, first)
    step3.splits.write_splits(dict(reversed(json.loads(first.read_text()).items())), second)  # keys reordered
    assert first.read_bytes() == second.read_bytes() and first.read_bytes().endswith(b"}\n")
    assert json.loads(first.read_text()) == splits
    assert (first.stat().st_mode & 0o777) == 0o644

    def broken_replace(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    other = step3.splits.make_splits(splits["files"], labels, 2, 2, 8, "d")
    with pytest.raises(OSError, match="disk full"):
        step3.splits.write_splits(other, first)
    assert json.loads(first.read_text()) == splits  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temporary file left


# ----------------------------------------------------------------------------------------------------------
# load_splits on a real (small) stand-in: a valid file, and hand-made broken ones
@pytest.fixture(scope="module")
def standin_split(step3, make_standin, tmp_path_factory) -> dict:
    """A valid 3 x 3 split file of the 120-image stand-in, made in-process, and the labels train.py would read."""
    folder = make_standin(N_SPLITS) / "oxford-iiit-pet"
    paths, labels = step3.train.read_annotations(folder)
    paths, labels = step3.train.drop_undecodable(paths, labels, step3.train.QUICK.image_size)
    by_file = {p.relative_to(folder).as_posix(): int(y) for p, y in zip(paths, labels, strict=True)}
    files = sorted(by_file)
    digest = step3.splits.dataset_digest(folder, [folder / f for f in files])
    splits = step3.splits.make_splits(files, np.array([by_file[f] for f in files]), 3, 3, 0, digest)
    path = tmp_path_factory.mktemp("split") / "dataset_splits.json"
    step3.splits.write_splits(splits, path)
    return {"folder": folder, "labels": by_file, "splits": splits, "path": path}


def test_load_splits_returns_arrays_ready_for_training(step3, standin_split):
    loaded = step3.splits.load_splits(standin_split["path"], standin_split["folder"], standin_split["labels"])
    raw = standin_split["splits"]
    assert loaded["digest"] == hashlib.sha256(standin_split["path"].read_bytes()).hexdigest()
    assert loaded["files"] == [standin_split["folder"] / f for f in raw["files"]]
    assert list(loaded["labels"]) == [standin_split["labels"][f] for f in raw["files"]]
    assert sorted(loaded["root_splits"]) == [0, 1, 2] and sorted(loaded["root_splits"][2]["nested"]) == [0, 1, 2]
    fold = loaded["root_splits"][2]
    assert fold["test"].tolist() == raw["root_splits"]["2"]["test_indices"]
    assert fold["nested"][1]["train"].tolist() == raw["root_splits"]["2"]["nested_splits"]["1"]["train_indices"]
    assert fold["nested"][1]["dev"].tolist() == raw["root_splits"]["2"]["nested_splits"]["1"]["dev_indices"]
    assert loaded["meta"]["dataset_digest"] == raw["meta"]["dataset_digest"]


def broken(splits: dict, how: str) -> tuple[dict, str]:
    """A copy of a valid split dict damaged in one way, and the start of the sentence it must produce."""
    damaged = json.loads(json.dumps(splits))
    roots = damaged["root_splits"]
    if how == "train_dev_overlap":
        parts = roots["1"]["nested_splits"]["2"]
        parts["train_indices"] = sorted([*parts["train_indices"], parts["dev_indices"][0]])
        return damaged, rf"root split 1, nested split 2: train and dev share 1 index \(e.g. {parts['dev_indices'][0]}\)"
    if how == "out_of_range":
        roots["2"]["test_indices"][-1] = 500
        return damaged, r"root split 2: test_indices holds 500, not an integer from 0 to 118"
    if how == "missing_dev_key":
        del roots["0"]["nested_splits"]["1"]["dev_indices"]
        return damaged, r"root split 0, nested split 1: key 'dev_indices' is missing"
    if how == "missing_meta_digest":
        del damaged["meta"]["dataset_digest"]
        return damaged, r"key 'meta.dataset_digest' is missing"
    if how == "missing_root_split":
        del roots["2"]
        return damaged, r"'root_splits' is not numbered 0 to meta.k_root - 1"
    raise ValueError(how)


@pytest.mark.parametrize(
    "how", ["train_dev_overlap", "out_of_range", "missing_dev_key", "missing_meta_digest", "missing_root_split"]
)
def test_load_splits_names_the_fold_or_key_at_fault(step3, standin_split, tmp_path, how):
    damaged, expected = broken(standin_split["splits"], how)
    path = tmp_path / "dataset_splits.json"
    step3.splits.write_splits(damaged, path)
    with pytest.raises(SystemExit) as error:
        step3.splits.load_splits(path, standin_split["folder"], standin_split["labels"])
    message = str(error.value.code)
    assert message.startswith(f"{path}: ") and message.endswith(f"{REMAKE}.") and "\n" not in message
    assert len(re.findall(expected, message)) == 1, message


def test_load_splits_refuses_missing_and_malformed_files(step3, standin_split, tmp_path):
    args = (standin_split["folder"], standin_split["labels"])
    with pytest.raises(SystemExit, match=r"No split file at .*nothing.json: make it with `python step_3/make_dataset_"):
        step3.splits.load_splits(tmp_path / "nothing.json", *args)
    truncated = tmp_path / "truncated.json"
    truncated.write_bytes(standin_split["path"].read_bytes()[:1000])
    with pytest.raises(SystemExit, match=rf"truncated.json is not valid JSON .*; {REMAKE}"):
        step3.splits.load_splits(truncated, *args)


@pytest.fixture
def data_copy(standin_split, tmp_path) -> Path:
    """A private copy of the stand-in's dataset folder, free to damage."""
    return Path(shutil.copytree(standin_split["folder"], tmp_path / "oxford-iiit-pet"))


@pytest.mark.parametrize("change", ["annotation_byte", "image_bytes"])
def test_load_splits_refuses_a_stale_file_after_the_data_changed(step3, standin_split, data_copy, change):
    step3.splits.load_splits(standin_split["path"], data_copy, standin_split["labels"])  # the copy matches
    if change == "annotation_byte":  # trainval.txt is hashed but not read for labels: only the digest can tell
        target = data_copy / "annotations" / "trainval.txt"
        text = bytearray(target.read_bytes())
        text[-2] = ord("2") if text[-2] != ord("2") else ord("1")
        target.write_bytes(bytes(text))
    else:  # bytes after a JPEG's end marker: the image still decodes the same
        with open(data_copy / standin_split["splits"]["files"][5], "ab") as image:
            image.write(b"\0")
    with pytest.raises(
        SystemExit, match=rf"meta.dataset_digest does not match the images and annotations in .*{REMAKE}"
    ):
        step3.splits.load_splits(standin_split["path"], data_copy, standin_split["labels"])


def test_load_splits_refuses_a_file_missing_on_disk_or_other_data(step3, standin_split, data_copy):
    gone = standin_split["splits"]["files"][7]
    (data_copy / gone).unlink()
    with pytest.raises(SystemExit, match=rf"1 listed file\(s\) are not in .* \(e.g. {gone}\); {REMAKE}"):
        step3.splits.load_splits(standin_split["path"], data_copy, standin_split["labels"])
    extra = {**standin_split["labels"], "images/newcomer_1.jpg": 0}
    with pytest.raises(SystemExit, match=r"made from other data \(images/newcomer_1.jpg is listed in the annotations"):
        step3.splits.load_splits(standin_split["path"], standin_split["folder"], extra)


# ----------------------------------------------------------------------------------------------------------
# make_dataset_splits.py end to end
def test_make_dataset_splits_end_to_end(step3, make_standin, tmp_path):
    data_dir = Path(shutil.copytree(make_standin(N_SPLITS), tmp_path / "oxfordiii"))  # default output goes in it
    proc = run_script(
        "step_3/make_dataset_splits.py", "--data-dir", str(data_dir), "--k-root", "3", "--k-nested", "3", cwd=tmp_path
    )
    written = data_dir / "dataset_splits.json"
    again = tmp_path / "again.json"
    step3.make.main(["--data-dir", str(data_dir), "--k-root", "3", "--k-nested", "3", "--output", str(again)])
    assert written.read_bytes() == again.read_bytes()

    folder = data_dir / "oxford-iiit-pet"
    marker = json.loads((folder / "SYNTHETIC.json").read_text())
    (truncated,) = [d["file"] for d in marker["defects"] if d["kind"] == "truncated_jpeg"]
    assert proc.stdout.count(f"Excluded 1 undecodable file(s): {Path(truncated).name}") == 1
    assert "SYNTHETIC STAND-IN" in proc.stdout and f"Wrote {written}" in proc.stdout
    paths, labels = step3.train.read_annotations(folder)
    listed = {p.relative_to(folder).as_posix(): int(y) for p, y in zip(paths, labels, strict=True)}
    assert truncated in listed and len(listed) == N_SPLITS
    del listed[truncated]
    loaded = step3.splits.load_splits(written, folder, listed)
    meta = loaded["meta"]
    assert (meta["k_root"], meta["k_nested"], meta["seed"], meta["n_files"]) == (3, 3, 0, N_SPLITS - 1)
    assert meta["excluded_undecodable"] == [truncated] and meta["dataset_synthetic"] is True
    assert f"split file sha256 {loaded['digest'][:12]}" in proc.stdout


# ----------------------------------------------------------------------------------------------------------
# Statistics: checked against numbers computed here by hand
T_975 = {1: 12.706204736174698, 3: 3.182446305284263}  # Student t quantiles, from tables


def test_corrected_interval_by_hand(step3):
    interval = step3.cv_stats.corrected_t_interval
    result = interval([[0.80], [0.84], [0.82], [0.86]], 0.25)
    variance = (0.03**2 + 0.01**2 + 0.01**2 + 0.03**2) / 3
    half = T_975[3] * math.sqrt((1 / 4 + 0.25) * variance)
    assert result["mean"] == pytest.approx(0.83)
    assert result["sd"] == pytest.approx(math.sqrt(variance))
    assert (result["low"], result["high"]) == pytest.approx((0.83 - half, 0.83 + half), abs=1e-9)
    assert result["n_outer"] == 4 and result["df"] == 3
    # nested repeats are averaged per outer fold first: these average to the four values above
    nested = interval([[0.78, 0.82], [0.84], [0.80, 0.82, 0.84], [0.86, 0.86]], 0.25)
    assert (nested["mean"], nested["low"], nested["high"]) == pytest.approx((0.83, 0.83 - half, 0.83 + half))
    naive = interval([[0.80], [0.84], [0.82], [0.86]], 0.0)  # folds taken as independent
    assert naive["high"] - naive["low"] == pytest.approx(2 * T_975[3] * math.sqrt(variance / 4))
    assert naive["high"] - naive["low"] < result["high"] - result["low"]


def test_two_outer_folds_warn_and_one_gives_no_interval(step3):
    cv_stats, more = step3.cv_stats, step3.analysis.MORE_FOLDS
    two = cv_stats.corrected_t_interval([[0.80, 0.82], [0.90]], 0.1)
    half = T_975[1] * math.sqrt((1 / 2 + 0.1) * (0.90 - 0.81) ** 2 / 2)  # s² of two values: (a - b)² / 2
    assert (two["low"], two["high"]) == pytest.approx((0.855 - half, 0.855 + half))
    warning = cv_stats.interval_warning(2, more)
    assert "only 2 outer folds" in warning and "1 degree(s) of freedom" in warning and "t = 12.7" in warning
    assert "--n-root-splits all" in warning
    one = cv_stats.corrected_t_interval([[0.80, 0.90]], 0.1)
    assert one["mean"] == pytest.approx(0.85) and math.isnan(one["low"]) and math.isnan(one["high"])
    assert "no interval" in cv_stats.interval_warning(1, more)
    assert cv_stats.interval_warning(10, more) is None


def test_corrected_paired_t_test_by_hand(step3):
    test = step3.cv_stats.corrected_paired_t_test
    result = test([[0.02, 0.04], [0.01], [0.05], [0.00, 0.02]], 0.1)  # outer-fold means 0.03, 0.01, 0.05, 0.01
    variance = (0.005**2 + 0.015**2 + 0.025**2 + 0.015**2) / 3
    se = math.sqrt((1 / 4 + 0.1) * variance)
    t = 0.025 / se
    assert result["mean"] == pytest.approx(0.025) and result["t"] == pytest.approx(t) and result["df"] == 3
    assert result["p"] == pytest.approx(2 * stats.t.sf(t, 3))
    assert 0.05 < result["p"] < 0.2  # t ≈ 2.21 with 3 degrees of freedom
    assert (result["low"], result["high"]) == pytest.approx((0.025 - T_975[3] * se, 0.025 + T_975[3] * se))
    same = test([[0.0, 0.0], [0.0]], 0.1)
    assert same["t"] == 0 and same["p"] == pytest.approx(1.0)
    assert math.isnan(test([[0.01, 0.02]], 0.1)["p"])


# ----------------------------------------------------------------------------------------------------------
# analyze_predictions.py on fake runs laid out as step_3/train.py records them
def fake_predictions(rng: np.random.Generator, separation: float, n: int = 40) -> pd.DataFrame:
    """A prediction table with both classes; larger separation, higher ROC AUC."""
    labels = np.r_[np.ones(n // 2, int), np.zeros(n - n // 2, int)]
    scores = np.clip(0.5 + separation * (labels - 0.5) + rng.normal(0, 0.2, n), 0, 1)
    return pd.DataFrame({"file": [f"p{i}.jpg" for i in range(n)], "label": labels, "score": scores})


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory) -> dict:
    """A sqlite store with root runs and fold runs in the layout of step_3/train.py, and what a reader expects."""
    tmp = tmp_path_factory.mktemp("fake_store")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("step_3", artifact_location=(tmp / "artifacts").as_uri())
    rng, clock = np.random.default_rng(0), [1_700_000_000_000]

    def tick() -> int:
        clock[0] += 1000
        return clock[0]

    def root(key: str, digest: str, complete: bool = True) -> str:
        tags = {"run_level": "root", "run_key": key, "split_file_digest": digest, "split_file": "splits.json"}
        run_id = client.create_run(experiment, start_time=tick(), tags=tags).info.run_id
        if complete:
            client.set_tag(run_id, "run_complete", "true")
            client.set_terminated(run_id, "FINISHED", end_time=tick())
        return run_id

    def fold(parent: str, key: str, r: int, n: int, separation: float, complete: bool = True) -> tuple[str, dict]:
        tags = {"mlflow.parentRunId": parent, "run_level": "fold", "root_split_id": str(r), "nested_split_id": str(n)}
        run_id = client.create_run(experiment, start_time=tick(), tags={**tags, "run_key": key}).info.run_id
        tables = {"dev": fake_predictions(rng, separation), "test": fake_predictions(rng, separation)}
        threshold = 0.5 + rng.uniform(-0.1, 0.1)
        now = tick()
        metrics = {"dev_roc_auc": roc_auc_score(tables["dev"]["label"], tables["dev"]["score"]), "threshold": threshold}
        metrics["test_roc_auc"] = roc_auc_score(tables["test"]["label"], tables["test"]["score"])
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in {"n_train": "60", "n_dev": "40", "n_test": "40", "seed": "0"}.items()],
        )
        for name, table in tables.items():
            client.log_text(run_id, table.to_csv(index=False), f"predictions/{name}_predictions.csv")
        if complete:
            client.set_tag(run_id, "fold_complete", "true")
        client.set_terminated(run_id, "FINISHED", end_time=tick())  # FINISHED, complete or not
        return run_id, {**tables, "threshold": threshold}

    four = [(0, 0), (0, 1), (1, 0), (1, 1)]
    a, b = root("key_a", "digest_1"), root("key_a", "digest_1")  # two jobs of one configuration
    fold(a, "key_a", 0, 0, 0.1)  # an earlier attempt at fold (0, 0): superseded by the one below
    expected = {f: fold(a if f[0] == 0 else b, "key_a", *f, 0.3 + 0.1 * i) for i, f in enumerate(four)}
    fold(b, "key_a", 2, 0, 0.9, complete=False)  # FINISHED without its completion tag: must be ignored
    c = root("key_c", "digest_1")
    other = {f: fold(c, "key_c", *f, 0.2) for f in four}
    e = root("key_e", "digest_2")
    for f in four:
        fold(e, "key_e", *f, 0.3)
    g = root("key_g", "digest_1")
    for f in four[:2]:
        fold(g, "key_g", *f, 0.3)
    h = root("key_h", "digest_1", complete=False)
    return {"uri": uri, "client": client, "ids": dict(a=a, b=b, c=c, e=e, g=g, h=h), "a": expected, "c": other}


def independent_interval(aucs: dict[tuple[int, int], float], ratio: float) -> tuple[float, float, float, float]:
    """Mean, SD and corrected 95% interval computed here from per-fold AUCs."""
    outer = [np.mean([v for (r, _), v in aucs.items() if r == root]) for root in sorted({r for r, _ in aucs})]
    mean, sd, j = np.mean(outer), np.std(outer, ddof=1), len(outer)
    half = stats.t.ppf(0.975, j - 1) * math.sqrt((1 / j + ratio) * sd**2)
    return mean, sd, mean - half, mean + half


def test_analysis_end_to_end_on_folds_from_two_jobs(fake_store, tmp_path):
    client, ids = fake_store["client"], fake_store["ids"]
    proc = run_script(
        "step_3/analyze_predictions.py",
        "--run-id",
        ids["a"],
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": fake_store["uri"]},
    )
    aucs = {f: roc_auc_score(t["test"]["label"], t["test"]["score"]) for f, (_, t) in fake_store["a"].items()}
    mean, sd, low, high = independent_interval(aucs, 40 / 60)
    root = client.get_run(ids["a"])
    metrics = root.data.metrics
    assert root.info.status == "FINISHED"
    assert metrics["analysis_test_roc_auc_mean"] == pytest.approx(mean, rel=1e-9)
    assert metrics["analysis_test_roc_auc_sd"] == pytest.approx(sd, rel=1e-9)
    assert (metrics["analysis_test_roc_auc_ci_low"], metrics["analysis_test_roc_auc_ci_high"]) == pytest.approx(
        (low, high), rel=1e-9
    )
    assert (metrics["analysis_n_outer_folds"], metrics["analysis_n_folds"]) == (2, 4)
    assert metrics["analysis_test_train_ratio"] == pytest.approx(40 / 60)
    accuracy = {
        f: np.mean((t["test"]["score"] >= t["threshold"]) == t["test"]["label"])
        for f, (_, t) in fake_store["a"].items()
    }
    assert metrics["analysis_test_accuracy_mean"] == pytest.approx(independent_interval(accuracy, 0)[0])
    assert root.data.tags["analysis_root_runs"] == ",".join(sorted([ids["a"], ids["b"]]))
    assert not any(k.startswith("analysis_") for k in client.get_run(ids["b"]).data.metrics)

    folder = Path(client.download_artifacts(ids["a"], "", str(tmp_path / "artifacts")))
    for name in ("fold_roc_curves.png", "forest_plot.png"):
        assert (folder / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_json(folder / "analysis" / "fold_metrics.json", orient="split")  # as mlflow.log_table writes it
    assert list(zip(table["root_split"], table["nested_split"], strict=True)) == list(fake_store["a"])
    assert list(table["run_id"]) == [run_id for run_id, _ in fake_store["a"].values()]  # the latest (0, 0)
    assert np.allclose(table["test_roc_auc"], list(aucs.values()))
    assert "only 2 outer folds" in proc.stdout and "t = 12.7" in proc.stdout and "Nadeau & Bengio" in proc.stdout
    assert f"{low:.4f} to {high:.4f}" in proc.stdout


def test_compare_two_configurations_fold_by_fold(step3, fake_store, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fake_store["uri"])
    ids = fake_store["ids"]
    step3.analysis.main(["--compare", ids["a"], ids["c"]])
    out = capsys.readouterr().out
    differences = {
        f: roc_auc_score(fake_store["a"][f][1]["test"]["label"], fake_store["a"][f][1]["test"]["score"])
        - roc_auc_score(fake_store["c"][f][1]["test"]["label"], fake_store["c"][f][1]["test"]["score"])
        for f in fake_store["a"]
    }
    outer = [np.mean([differences[(r, 0)], differences[(r, 1)]]) for r in (0, 1)]
    mean, se = np.mean(outer), math.sqrt((1 / 2 + 40 / 60) * np.var(outer, ddof=1))
    p = 2 * stats.t.sf(abs(mean / se), 1)
    assert f"Mean difference A − B over 2 outer fold(s): {mean:+.4f}" in out
    assert f"t = {mean / se:.2f} with 1 degree(s) of freedom, two-sided p = {p:.3g}" in out
    assert f"95% interval {mean - T_975[1] * se:+.4f} to {mean + T_975[1] * se:+.4f}" in out


@pytest.mark.parametrize(
    "other, expected",
    [
        ("g", r"completed different folds \(only in the first: \[\(1, 0\), \(1, 1\)\]; only in the second: none\)"),
        ("h", r"is RUNNING and did not complete"),
        ("b", r"share their run key: they are one configuration"),
        ("nonexistent", r"No run with id nonexistent in sqlite:.*: check --compare\."),
    ],
)
def test_compare_refuses_runs_that_cannot_be_paired(step3, fake_store, monkeypatch, other, expected):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fake_store["uri"])
    other_id = fake_store["ids"].get(other, other)
    with pytest.raises(SystemExit, match=expected):
        step3.analysis.main(["--compare", fake_store["ids"]["a"], other_id])


def test_compare_refuses_different_split_files_in_one_sentence(fake_store, tmp_path):
    ids = fake_store["ids"]
    proc = run_script(
        "step_3/analyze_predictions.py",
        "--compare",
        ids["a"],
        ids["e"],
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": fake_store["uri"]},
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"Runs {ids['a']} and {ids['e']} were made on different split files")
    assert "split_file_digest digest_1 vs digest_2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_root_is_complete_only_when_every_fold_asked_of_it_has_completed(split_file, tmp_path, monkeypatch, capsys):
    """Folds stubbed (no training): a fold left incomplete (as when another process still runs it) keeps the root
    incomplete and is named; completing it completes the root; a later command that asks for one more fold of the
    same root takes the tag away until that fold completes too."""
    train = load_step_module("step_3", "train")
    unfinished: set[tuple[int, int]] = set()

    def stub_fold(fold, splits, settings, args, device, key) -> None:
        tags = {"run_level": "fold", "root_split_id": str(fold[0]), "nested_split_id": str(fold[1]), "run_key": key}
        with mlflow.start_run(run_name=f"fold-{fold[0]}-{fold[1]}", nested=True, tags=tags):
            if fold not in unfinished:
                mlflow.set_tag("fold_complete", "true")

    monkeypatch.setattr(train, "run_fold", stub_fold)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    def root_tags(*flags: str) -> dict[str, str]:
        main_in_process(train, train_args(split_file, "--n-root-splits", "1", *flags), tmp_path, monkeypatch)
        (root,) = client.search_runs([client.get_experiment_by_name("step_3").experiment_id], "tags.run_level = 'root'")
        return root.data.tags

    unfinished.add((0, 1))
    tags = root_tags("--n-nested-splits", "2")
    assert "run_complete" not in tags and "its fold(s) 0/1 have not completed" in capsys.readouterr().out
    unfinished.clear()
    assert root_tags("--n-nested-splits", "2")["run_complete"] == "true"
    unfinished.add((0, 2))
    tags = root_tags("--root-split", "0", "--nested-split", "2")
    assert "run_complete" not in tags and "fold_asked.0.2" in tags
    unfinished.clear()
    assert root_tags("--root-split", "0", "--nested-split", "2")["run_complete"] == "true"
