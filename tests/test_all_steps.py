"""Across the steps: the helper modules a step's idea does not change are byte-identical copies (so the tests of
one copy cover all), the warm-up keeps the frozen backbone still in every step's training code, and every
numeric flag of every step rejects a bad value with one sentence."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import REPO, load_step_module, run_script
from torch.utils.data import DataLoader, Dataset

STEPS = sorted(p.name for p in REPO.glob("step_*") if p.is_dir())
LESSONS = {"train.py", "analyze_predictions.py"}  # each step's own lesson: these differ on purpose
REWRITTEN: dict[tuple[str, str], str] = {  # (step, module) whose idea changes a helper module, and why
    ("step_4", "runs.py"): "a trial stopped by the pruner ends its runs FINISHED, not FAILED",
    ("step_4", "resume.py"): "several workers share a fold's search: only one of them refits it",
    ("step_5", "make_dataset_splits.py"): "the image check's size now comes from the quick config file",
}


def test_helper_modules_are_copied_unchanged_from_the_previous_step():
    """A module in step N that step N-1 also has is byte-identical to it, unless REWRITTEN says why not."""
    compared = 0
    for previous, step in zip(STEPS, STEPS[1:], strict=False):
        for module in sorted((REPO / step).glob("*.py")):
            before = REPO / previous / module.name
            if module.name in LESSONS or not before.exists() or (step, module.name) in REWRITTEN:
                continue
            assert module.read_bytes() == before.read_bytes(), (
                f"{step}/{module.name} differs from {previous}/{module.name}: copy it, or fix both, or list it in "
                "REWRITTEN with the reason the step's idea changes it"
            )
            compared += 1
    assert compared >= 6  # pets and download_data from step 2 on, runs and provenance from step 3 on


class TinyImages(Dataset):
    """Random 32 px images with alternating labels, with the attributes the training code reads."""

    def __init__(self, n: int, seed: int) -> None:
        self.images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        self.labels = np.arange(n) % 2
        self.paths = [Path(f"images/tiny_{i}.jpg") for i in range(n)]
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index] * 3 + 1, torch.tensor(float(self.labels[index]))  # far from BatchNorm's stats


def quick_settings(train) -> tuple[object, object]:
    """The quick settings with one warm-up epoch and no fine-tuning: for build_model, and for fit. From step 5 on
    they come from the quick config file, each hyper-parameter at the low end of its range."""
    if hasattr(train, "QUICK"):
        settings = dataclasses.replace(train.QUICK, warmup_epochs=1, finetune_epochs=0)
        return settings, settings
    config, _ = train.load(train.QUICK_CONFIG, ["training.warmup_epochs=1", "training.finetune_epochs=0"])
    config = train.resolve(config, lambda _, hp: hp.choices[0] if hasattr(hp, "choices") else hp.low)
    return config.model, config.training


@pytest.mark.parametrize("step", STEPS)
def test_warm_up_keeps_the_frozen_backbone_still(step, tmp_path, monkeypatch):
    """One warm-up epoch through `fit`: the head learns, the backbone's weights and BatchNorm statistics do not
    move (a frozen backbone left in train mode would update its running means)."""
    train = load_step_module(step, "train")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    model_settings, settings = quick_settings(train)
    torch.manual_seed(0)
    model = train.build_model(model_settings)
    loaders = {name: DataLoader(TinyImages(16, seed), batch_size=8) for seed, name in enumerate(("warmup", "dev"))}
    loaders["train"] = loaders["warmup"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    best = train.fit(model, loaders, settings, torch.device("cpu"))
    after = best["state"]
    assert best["phase"] == "warmup"
    moved = [k for k in before if k.startswith("backbone.") and not torch.equal(before[k], after[k])]
    assert not moved, f"{step}: the warm-up moved the frozen backbone: {moved[:3]}"
    assert not torch.equal(before["head.0.weight"], after["head.0.weight"])
    assert "bn1.running_mean" in " ".join(before)  # the backbone has BatchNorm statistics to protect
    if "epoch" in inspect.signature(train.train_one_epoch).parameters:
        assert mlflow.active_run() is None  # the phase runs were closed


BAD_FLAGS = [  # (script, flag, bad value, what the sentence says); each step that has the script and flag
    ("train.py", "--num-workers", "-2", "-2 is out of range: give a whole number from 0 up"),
    ("train.py", "--num-workers", "two", "'two' is not a whole number"),
    ("train.py", "--seed", "-3", "-3 is out of range: give a whole number from 0 to 4294967295"),
    ("train.py", "--seed", str(2**32), "out of range"),
    ("train.py", "--num-threads", "0", "0 is out of range: give a whole number from 1 up"),
    ("train.py", "--root-split", "-1", "-1 is out of range"),
    ("train.py", "--nested-split", "x", "'x' is not a whole number"),
    ("make_dataset_splits.py", "--k-root", "1", "1 is out of range: give a whole number from 2 up"),
    ("make_dataset_splits.py", "--k-nested", "0", "out of range"),
    ("make_dataset_splits.py", "--seed", "-1", "out of range"),
    ("train.py", "--n-trials", "0", "0 is out of range: give a whole number from 1 up"),
]
CASES = [
    pytest.param(step, *case, id=f"{step}-{case[0]}{case[1]}={case[2]}")
    for step in STEPS
    for case in BAD_FLAGS
    if (REPO / step / case[0]).exists() and case[1] in (REPO / step / case[0]).read_text()
]


@pytest.mark.parametrize(("step", "script", "flag", "value", "expected"), CASES)
def test_a_bad_number_is_one_sentence_naming_the_flag(step, script, flag, value, expected, capsys):
    module = load_step_module(step, script.removesuffix(".py"))
    with pytest.raises(SystemExit) as stopped:
        module.parse_args([flag, value])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: argument {flag}: " in error and expected in error, error


def test_every_step_covers_the_numeric_flags():
    """The table above reaches every step (a new step or a renamed flag would silently drop out of it)."""
    assert {case.values[0] for case in CASES} == set(STEPS)
    assert sum(case.values[2] == "--seed" for case in CASES) >= 2 * (len(STEPS) - 1)


def test_a_bad_number_from_the_command_line_has_no_traceback(tmp_path):
    proc = run_script("step_2/train.py", "--seed", "-3", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith("error: argument --seed: -3 is out of range: give a whole number from 0 to 4294967295")
    assert not (tmp_path / "mlflow.db").exists()
