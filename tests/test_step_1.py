"""Step 1: the naive baseline run end to end as the README runs it: it copes with the stand-in's planted defects
and is visibly not reproducible. (download_data.py and the stand-in are tested in test_download_data.py.)"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, load_step_module, run_script, user_error
from PIL import Image

N_SMALL = 240  # images in the small stand-in the end-to-end tests share


train = load_step_module("step_1", "train")


def marker_files(data_dir: Path, kind: str) -> list[str]:
    """Names (without .jpg) of the planted defects of one kind, from the stand-in's marker."""
    marker = json.loads((data_dir / "oxford-iiit-pet" / "SYNTHETIC.json").read_text())
    return [Path(d["file"]).stem for d in marker["defects"] if d["kind"] == kind]


@pytest.fixture(scope="module")
def quick_run(make_standin, tmp_path_factory) -> dict:
    """Two step-1 quick runs (train + analyze) in one working directory, as the README runs them."""
    data_dir = make_standin(N_SMALL)
    cwd = tmp_path_factory.mktemp("step1")
    runs = []
    for _ in range(2):
        trained = run_script("step_1/train.py", "--quick", "--data-dir", str(data_dir), cwd=cwd)
        analyzed = run_script("step_1/analyze_predictions.py", cwd=cwd)
        tables = {name: pd.read_csv(cwd / "results/step_1" / f"{name}_predictions.csv") for name in ("dev", "test")}
        runs.append({"train": trained, "analyze": analyzed, "tables": tables})
    return {"data_dir": data_dir, "cwd": cwd, "runs": runs}


def test_quick_run_writes_predictions_threshold_and_model(quick_run):
    run, results = quick_run["runs"][1], quick_run["cwd"] / "results/step_1"
    dev, test = run["tables"]["dev"], run["tables"]["test"]
    assert set(dev["file"]).isdisjoint(test["file"])
    assert 0.1 < len(test) / N_SMALL < 0.2 and 0.1 < len(dev) / N_SMALL < 0.2
    assert dev["score"].between(0, 1).all() and test["score"].between(0, 1).all()
    for table in (dev, test):  # labels from the annotations: capitalised breeds are cats (label 1)
        assert (table["label"] == table["file"].str[0].str.isupper().astype(int)).all()
    summary = json.loads((results / "threshold.json").read_text())
    assert 0 <= summary["threshold"] <= 1 and summary["settings"]["backbone"] == "resnet18"
    state = torch.load(results / "model.pt", weights_only=True)
    assert "head.3.weight" in state and state["head.3.weight"].shape == (1, train.QUICK.head_hidden)
    for name in ("dev_predictions.csv", "test_predictions.csv", "threshold.json", "model.pt"):
        assert str(Path("results/step_1") / name) in run["train"].stdout


def test_stand_in_is_announced(quick_run):
    assert "SYNTHETIC STAND-IN" in quick_run["runs"][0]["train"].stdout


def test_undecodable_and_unlisted_files_never_reach_the_model(quick_run):
    data_dir, run = quick_run["data_dir"], quick_run["runs"][0]
    truncated = marker_files(data_dir, "truncated_jpeg")
    assert len(truncated) == 1
    excluded_lines = [line for line in run["train"].stdout.splitlines() if line.startswith("Excluded")]
    assert excluded_lines == [f"Excluded 1 undecodable file(s): {truncated[0]}.jpg"]
    used = set(pd.concat(run["tables"].values())["file"])
    assert f"{truncated[0]}.jpg" not in used
    assert not used & {f"{name}.jpg" for name in marker_files(data_dir, "unlisted_image")}
    # the impostors that do decode (PNG, GIF, grayscale, CMYK named .jpg) stay in the pool
    decodable = sum(
        len(marker_files(data_dir, k)) for k in ("png_named_jpg", "gif_named_jpg", "grayscale_jpeg", "cmyk_jpeg")
    )
    assert decodable == 4


def test_analyze_prints_metrics_and_saves_figures(quick_run):
    out = quick_run["runs"][1]["analyze"].stdout
    for metric in ("roc_auc", "accuracy", "balanced_accuracy", "f1", "true cat", "predicted dog"):
        assert metric in out
    test = quick_run["runs"][1]["tables"]["test"]
    threshold = json.loads((quick_run["cwd"] / "results/step_1/threshold.json").read_text())["threshold"]
    accuracy = float(next(line.split()[1] for line in out.splitlines() if line.strip().startswith("accuracy")))
    assert accuracy == pytest.approx(((test["score"] >= threshold) == test["label"]).mean(), abs=1e-3)
    for name in ("roc_curve.png", "score_distributions.png"):
        path = quick_run["cwd"] / "results/step_1" / name
        assert str(Path("results/step_1") / name) in out
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300


def test_the_flaw_two_runs_give_different_results(quick_run):
    first, second = (run["tables"]["test"] for run in quick_run["runs"])
    same_split = set(first["file"]) == set(second["file"])
    assert not same_split or not np.allclose(first.sort_values("file")["score"], second.sort_values("file")["score"])


def test_analyze_without_results_says_what_to_do(tmp_path, monkeypatch):
    message = user_error("step_1/analyze_predictions.py", [], tmp_path, monkeypatch)
    assert "run `python step_1/train.py --quick` first" in message


def test_missing_dataset_is_one_clear_sentence(tmp_path, monkeypatch):
    message = user_error("step_1/train.py", ["--quick", "--data-dir", str(tmp_path / "nothing")], tmp_path, monkeypatch)
    assert "download_data.py" in message


def test_an_unwritable_results_folder_stops_before_training(make_standin, tmp_path, monkeypatch, capsys):
    """results/ that cannot be written (here a file in its place: the tests run as root, whom chmod does not stop)
    is one sentence before any training, not a traceback after it with the model lost."""
    (tmp_path / "results").write_text("")
    message = user_error(
        "step_1/train.py", ["--quick", "--data-dir", str(make_standin(N_SMALL))], tmp_path, monkeypatch
    )
    assert message.startswith("Cannot write to results/step_1 (")
    printed = capsys.readouterr()
    assert "warmup" not in printed.err + printed.out  # stopped before the first epoch


def test_offline_pretrained_weights_give_one_clear_sentence(make_standin, tmp_path):
    """Without --quick, the ImageNet weights must be downloaded; offline that fails with advice, not a trace."""
    proc = run_script(
        "step_1/train.py",
        "--data-dir",
        str(make_standin(N_SMALL)),
        cwd=tmp_path,
        check=False,
        env={
            "TORCH_HOME": str(tmp_path / "torch_home"),
            "https_proxy": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9",
        },
        timeout=300,
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("Could not download the ImageNet weights of densenet121")
    assert "--quick" in message and "checkpoints" in message and "Traceback" not in proc.stderr


def test_full_configuration_trains_one_batch_on_cpu(make_standin):
    """The real model (DenseNet-121 at 224 px, new head) trains a batch of 4 augmented images; warm-up keeps the
    frozen backbone's BatchNorm statistics and weights still."""
    settings = dataclasses.replace(train.FULL, pretrained=False)
    folder = make_standin(N_SMALL) / "oxford-iiit-pet"
    paths, labels = train.read_annotations(folder)
    pick = [int(np.flatnonzero(labels == 1)[0]), int(np.flatnonzero(labels == 0)[0]), 2, 3]
    dataset = train.PetImages([paths[i] for i in pick], labels[pick], settings.image_size, augment=True)
    loader = train.make_loader(dataset, 4, True, 0, torch.device("cpu"))
    model = train.build_model(settings)
    assert type(model.backbone).__name__ == "DenseNet"
    before = {k: v.clone() for k, v in model.state_dict().items()}

    model.backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    loss = train.train_one_epoch(model, loader, optimizer, torch.device("cpu"), freeze_backbone=True)
    after = model.state_dict()
    assert np.isfinite(loss)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["head.0.weight"], after["head.0.weight"])

    model.backbone.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train.train_one_epoch(model, loader, optimizer, torch.device("cpu"), freeze_backbone=False)
    moved = model.state_dict()["backbone.features.norm5.running_mean"]
    assert not torch.equal(before["backbone.features.norm5.running_mean"], moved)


def test_a_quick_epoch_runs_with_spawned_workers(make_standin, tmp_path):
    """macOS and Windows start DataLoader workers with `spawn`: everything they receive must pickle."""
    code = f"""
import sys, multiprocessing as mp, pathlib, torch
sys.path.insert(0, {str(REPO / "step_1")!r})
import train
from support import pets
if __name__ == "__main__":
    mp.set_start_method("spawn", force=True)
    folder = train.dataset_folder(pathlib.Path({str(make_standin(N_SMALL))!r}))
    paths, labels = train.read_annotations(folder)
    keep = [i for i, p in enumerate(paths) if pets.is_decodable(p, 64)][:64]
    data = train.PetImages([paths[i] for i in keep], labels[keep], 64, augment=True)
    loader = train.make_loader(data, 16, True, 2, torch.device("cpu"))
    model = train.build_model(train.QUICK)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    print("loss", train.train_one_epoch(model, loader, optimizer, torch.device("cpu"), freeze_backbone=False))
    print("start method", mp.get_start_method())
"""
    script = tmp_path / "spawn_epoch.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "start method spawn" in proc.stdout and "loss" in proc.stdout


def test_quick_run_learns_at_full_quick_size(make_standin, tmp_path):
    """At full quick size (the cap of QUICK.max_images applies) a quick run separates cats from dogs.

    Step 1 is unseeded on purpose, and one unseeded run can land far below the mean: over 20 seeds on this
    stand-in, dev ROC AUC 0.833 ± 0.039 and test 0.842 ± 0.046 (benchmarks/learnability.py), yet an unseeded run
    once gave 0.68 / 0.63. So, as the benchmark does, the global RNGs of Python, NumPy and torch are seeded (seed 0)
    before step_1/train.py runs as a script: the outcome is fixed, and a bound far below the mean can only fail
    when learning is broken."""
    data_dir = make_standin(train.QUICK.max_images + 200)
    seeded = (
        "import random, runpy, sys; import numpy, torch; random.seed(0); numpy.random.seed(0); torch.manual_seed(0); "
        f"sys.path.insert(0, {str(REPO / 'step_1')!r}); "
        f"runpy.run_path({str(REPO / 'step_1/train.py')!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", seeded, "--quick", "--data-dir", str(data_dir)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "results/step_1/threshold.json").read_text())
    assert f"{train.QUICK.max_images} images" in proc.stdout
    assert summary["dev_roc_auc"] >= 0.7 and summary["test_roc_auc"] >= 0.7, summary
