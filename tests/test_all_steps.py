"""Across the steps: the helper modules a step's idea does not change are byte-identical copies (so the tests of
one copy cover all), the warm-up keeps the frozen backbone still in every step's training code, and every
numeric flag of every step rejects a bad value with one sentence; the image checks kept in the dataset folder and
the images decoded once per process (pets.py)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import shutil
import struct
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import REPO, load_step_module, run_script
from PIL import Image
from torch.utils.data import DataLoader, Dataset

STEPS = sorted(p.name for p in REPO.glob("step_*") if p.is_dir())
LESSONS = {"train.py", "analyze_predictions.py"}  # each step's own lesson: these differ on purpose
REWRITTEN: dict[tuple[str, str], str] = {  # (step, module) whose idea changes a helper module, and why
    ("step_4", "runs.py"): "a trial stopped by the pruner ends its runs FINISHED, not FAILED",
    ("step_4", "resume.py"): "several workers run one experiment, on other hosts too: heartbeats show theirs alive, "
    "and of workers that start together only the one that claims it starts the root run",
}


def modules(step: str) -> dict[str, Path]:
    """A step's Python modules by file name: those on top and those in its support/ package."""
    return {path.name: path for path in [*(REPO / step).glob("*.py"), *(REPO / step / "support").glob("*.py")]}


def module_path(step: str, name: str) -> Path:
    """Where step_N keeps the module `name` (e.g. "training.py"): on top, or in support/."""
    return modules(step)[name]


def without_local_imports(path: Path) -> tuple[str, set[tuple[str, str]]]:
    """A module's text without its imports of the step's own modules, and what those imported (module, name): a
    module that moved between the top and support/ changes how the others import it, not what they import."""
    text, local = path.read_text(), set(STEP_MODULES) | {"support"}
    lines, imported = text.splitlines(), set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            module = getattr(node, "module", None) or ""
            parts = [*module.split("."), *(alias.name for alias in node.names)]
            if parts[0] in local or (not module and parts[-1] in local):
                for alias in node.names:
                    imported.add((module.removeprefix("support").strip(".") or alias.name, alias.name))
                lines[node.lineno - 1 : node.end_lineno] = [""] * (node.end_lineno - node.lineno + 1)
    return "\n".join(lines), imported


STEP_MODULES = {path.stem for step in STEPS for path in modules(step).values()}


def test_helper_modules_are_copied_unchanged_from_the_previous_step():
    """A module in step N that step N-1 also has is a copy of it, on top or in support/ (the imports of the step's own
    modules may say where they now are), unless REWRITTEN says why not."""
    compared = 0
    for previous, step in zip(STEPS, STEPS[1:], strict=False):
        before_modules = modules(previous)
        for name, module in sorted(modules(step).items()):
            before = before_modules.get(name)
            if name in LESSONS or before is None or (step, name) in REWRITTEN:
                continue
            assert without_local_imports(module) == without_local_imports(before), (
                f"{module.relative_to(REPO)} differs from {before.relative_to(REPO)}: copy it, or fix both, or list "
                "it in REWRITTEN with the reason the step's idea changes it"
            )
            compared += 1
    assert compared >= 6  # pets and download_data from step 2 on, runs and provenance from step 3 on


HOOKED = {  # what of step 2's training core training.py changes, and why (step 3's README names the same)
    "Settings": "not step 2's dataclass but what the training reads from it: any object with those attributes serves",
    "train_phase": "a `report` callback after every epoch, for a search's pruner (step 4); the precision",
    "fit": "the `report` callback, a weight decay per phase (step 4 searches both), the warm-up on cached features",
    "train_and_evaluate": "its loaders built by `make_loaders`, which a trial without test images uses too",
    "PetClassifier": "its forward also takes the backbone's features, which the warm-up trains the head on",
    "train_one_epoch": "mixed precision on a CUDA GPU (autocast, a gradient scaler for fp16, channels_last)",
    "predict": "mixed precision",
    "log_outputs": "the model logged in its plain memory layout (channels_last on a GPU with mixed precision)",
}


def top_level_sources(path: Path) -> dict[str, str]:
    """The source of every top-level function and class of a Python file, by name."""
    text = path.read_text()
    return {
        node.name: ast.get_source_segment(text, node)
        for node in ast.parse(text).body
        if isinstance(node, ast.FunctionDef | ast.ClassDef)
    }


@pytest.mark.parametrize("step", [s for s in STEPS if "training.py" in modules(s)])
def test_training_py_is_step_2s_training_core_moved_unchanged(step):
    """Every function and class of step 2's training core is in training.py as it was, but the hooked ones."""
    before, after = top_level_sources(REPO / "step_2" / "train.py"), top_level_sources(module_path(step, "training.py"))
    shared = sorted(set(before) & set(after))
    changed = [name for name in shared if before[name] != after[name] and name not in HOOKED]
    assert not changed, f"{step}/training.py changed step 2's {changed}: keep them as step 2 has them"
    assert set(HOOKED) <= set(shared) and len(shared) >= 12, shared  # the core is there, hooks and all


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


def training_core(step: str):
    """The module with the step's training core: train.py in steps 1 and 2, training.py from step 3 on."""
    return load_step_module(step, "training" if "training.py" in modules(step) else "train")


def quick_settings(step: str) -> object:
    """The quick settings with one warm-up epoch and no fine-tuning. From step 5 on they come from the quick config
    file, each hyper-parameter at the low end of its range."""
    train = load_step_module(step, "train")
    if hasattr(train, "QUICK"):
        return dataclasses.replace(train.QUICK, warmup_epochs=1, finetune_epochs=0)
    config_io = load_step_module(step, "config_io")  # it loads the config file; its `settings` holds the classes
    config, _ = config_io.load(train.QUICK_CONFIG, ["training.warmup_epochs=1", "training.finetune_epochs=0"])
    config = config_io.settings.resolve(config, lambda _, hp: hp.choices[0] if hasattr(hp, "choices") else hp.low)
    return config_io.settings.as_settings(config)


@pytest.mark.parametrize("step", STEPS)
def test_warm_up_keeps_the_frozen_backbone_still(step, tmp_path, monkeypatch):
    """One warm-up epoch through `fit`: the head learns, the backbone's weights and BatchNorm statistics do not
    move (a frozen backbone left in train mode would update its running means)."""
    train = training_core(step)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    settings = quick_settings(step)
    torch.manual_seed(0)
    model = train.build_model(settings)
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
SHARED_FLAGS = {  # the flags that common.py's helpers add to a script's parser
    "add_device_flags(": ("--device", "--num-workers"),
    "add_seed_flags(": ("--seed", "--deterministic", "--num-threads"),
}


def has_flag(script: Path, flag: str) -> bool:
    """Whether the script defines the flag, itself or through common.py's helpers."""
    text = script.read_text()
    return f'"{flag}"' in text or any(adder in text and flag in flags for adder, flags in SHARED_FLAGS.items())


CASES = [
    pytest.param(step, *case, id=f"{step}-{case[0]}{case[1]}={case[2]}")
    for step in STEPS
    for case in BAD_FLAGS
    if (REPO / step / case[0]).exists() and has_flag(REPO / step / case[0], case[1])
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


# ----------------------------------------------------------------------------------------------------------
# pets.py (byte-identical in every step): the image checks kept in the dataset folder, the decoded images in memory
def counting_decodes(pets, monkeypatch) -> list[Path]:
    """Record every file pets.is_decodable decodes."""
    decoded, check = [], pets.is_decodable
    monkeypatch.setattr(pets, "is_decodable", lambda path, size: decoded.append(path) or check(path, size))
    return decoded


def test_the_image_checks_are_kept_and_a_changed_file_is_checked_again(make_standin, tmp_path, monkeypatch):
    pets = load_step_module("step_1", "pets")
    folder = tmp_path / "oxford-iiit-pet"
    shutil.copytree(make_standin(240) / "oxford-iiit-pet", folder)
    (folder / pets.CHECKS_FILE).unlink(missing_ok=True)  # kept there by any test that ran a script on it before
    paths, labels = pets.read_annotations(folder)
    decoded = counting_decodes(pets, monkeypatch)
    first = pets.drop_undecodable(paths, labels, 64)
    assert len(decoded) == len(paths) and (folder / pets.CHECKS_FILE).is_file() and len(first[0]) == len(paths) - 1
    decoded.clear()
    again = pets.drop_undecodable(paths, labels, 64)
    assert decoded == [] and again[0] == first[0]  # nothing decoded: all of it read from the checks file
    good = first[0][0]
    good.write_bytes(good.read_bytes()[:2000])  # truncated after the checks were kept
    assert pets.drop_undecodable(paths, labels, 64)[0] == first[0][1:] and decoded == [good]
    decoded.clear()
    pets.drop_undecodable(paths, labels, 96)  # another size: checked anew
    assert len(decoded) == len(paths)
    decoded.clear()
    (folder / pets.CHECKS_FILE).write_text("{torn")  # unreadable: checked in full, and written again
    assert pets.drop_undecodable(paths, labels, 64)[0] == first[0][1:] and len(decoded) == len(paths)
    decoded.clear()
    (folder / pets.CHECKS_FILE).unlink()
    (folder / f"{pets.CHECKS_FILE}.{os.getpid()}.tmp").mkdir()  # cannot be written (as in a read-only folder)
    assert pets.drop_undecodable(paths, labels, 64)[0] == first[0][1:] and len(decoded) == len(paths)
    assert not (folder / pets.CHECKS_FILE).exists()


def test_decoded_images_are_the_decoded_bytes_once_per_process(make_standin, tmp_path, monkeypatch):
    pets = load_step_module("step_1", "pets")
    images = tmp_path / "images"
    shutil.copytree(make_standin(240) / "oxford-iiit-pet" / "images", images)
    paths = sorted(images.glob("*_1.jpg"))[:6]
    loads, load = [], pets.load_image
    monkeypatch.setattr(pets, "load_image", lambda path, size: loads.append(path) or load(path, size))
    monkeypatch.setattr(pets, "_decoded", {})
    decoded = pets.DecodedImages(paths, 64)
    assert len(loads) == len(paths) and all(torch.equal(decoded[i], load(p, 64)) for i, p in enumerate(paths))
    loads.clear()
    assert pets.DecodedImages(paths, 64)[0] is decoded[0] and loads == []  # another dataset: the same tensor
    paths[0].write_bytes(paths[1].read_bytes())  # the file changed (size and modification time)
    assert torch.equal(pets.DecodedImages(paths, 64)[0], load(paths[1], 64)) and loads == [paths[0]]
    loads.clear()
    used = sum(image.numel() for image in pets._decoded.values())  # uint8: one byte each
    monkeypatch.setattr(pets, "DECODED_LIMIT", used + 3 * 32 * 32)  # room for one more image at 32 px
    capped = pets.DecodedImages(paths[2:5], 32)  # three new ones: one kept, two decoded whenever they are read
    assert [image is None for image in capped.images] == [False, True, True] and len(loads) == 1
    assert torch.equal(capped[2], load(paths[4], 32)) and len(loads) == 2


def decompression_bomb(width: int, height: int) -> bytes:
    """A PNG of under 100 bytes whose header says width × height RGB pixels (its data: a few zero bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits per channel, RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def too_large(path: Path, width: int, height: int) -> str:
    """The sentence that refuses an image over Pillow's pixel limit."""
    return (
        f"{path} is {width} x {height} pixels, more than Pillow decodes safely ({Image.MAX_IMAGE_PIXELS:,} pixels): "
        "a decompression bomb, or a photo to scale down first."
    )


@pytest.mark.parametrize("step", STEPS)
def test_an_image_over_pillows_pixel_limit_is_dropped_in_one_sentence_not_decoded(step, tmp_path, capsys):
    """20000 x 20000 (Pillow raises DecompressionBombError) and 10000 x 10000 (Pillow only warns: between its limit
    and twice that) are both excluded before any split, each with the sentence saying why; nothing is raised."""
    pets = load_step_module(step, "pets")
    images = tmp_path / "oxford-iiit-pet" / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (80, 60), (200, 100, 50)).save(images / "good_1.jpg")
    sizes = {"bomb_1.jpg": (20000, 20000), "large_1.jpg": (10000, 10000)}
    for name, (width, height) in sizes.items():
        (images / name).write_bytes(decompression_bomb(width, height))
    paths = sorted(images.iterdir())
    for _ in range(2):  # the second time from the checks kept in the dataset folder
        kept, labels = pets.drop_undecodable(paths, np.array([0, 1, 0]), 64)
        assert kept == [images / "good_1.jpg"] and list(labels) == [1]
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "Excluded 2 undecodable file(s): bomb_1.jpg, large_1.jpg"
        assert [line.strip() for line in lines[1:]] == [too_large(images / name, *sizes[name]) for name in sizes]


@pytest.mark.parametrize(("cores", "expected"), [(16, 8), (4, 3), (2, 1), (1, 1)])
def test_the_worker_default_is_0_on_a_cpu_and_follows_the_cores_on_a_gpu(cores, expected, monkeypatch):
    """--num-workers not given: 0 on a CPU, and on a GPU one per core but one, at most 8 (common.py, every step);
    given, it is kept. No GPU is needed: pick_device only names the device."""
    common = load_step_module("step_3", "common")
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device, workers in (("cpu", 0), ("cuda", expected)):
        args = argparse.Namespace(device=device, num_workers=None)
        assert common.pick_device(args).type == device and args.num_workers == workers
    args = argparse.Namespace(device="cuda", num_workers=5)
    assert common.pick_device(args).type == "cuda" and args.num_workers == 5


@pytest.mark.parametrize("step", STEPS[1:])
def test_augmenting_a_sample_seeds_the_cpu_generator_only_and_restores_it(step, make_standin, monkeypatch):
    """With --num-workers 0 the training process augments the samples itself. torch.manual_seed there would also
    reseed the GPU's generator, which dropout draws from, once per sample, so a GPU run would differ with the worker
    count (workers are other processes). Seeding the CPU's generator alone is also 100 times cheaper: without CUDA,
    torch.manual_seed formats the call stack for each device it would seed later. No GPU is needed to check it."""
    train = load_step_module(step, "train" if step == "step_2" else "training")
    seeded = []
    for device, name in ((torch.cuda, "manual_seed_all"), (torch.cuda, "manual_seed"), (torch.mps, "manual_seed")):
        monkeypatch.setattr(device, name, lambda seed, name=name: seeded.append(name))
    paths = sorted((make_standin(240) / "oxford-iiit-pet" / "images").glob("*_1.jpg"))[:4]
    data = train.PetImages(paths, np.zeros(len(paths)), 64, augment=True, seed=0)
    state = torch.get_rng_state()
    first = data[2][0]
    assert seeded == [] and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(data[2][0], first)  # the same draws: a function of (seed, epoch, index)
    data.epoch = 1
    assert not torch.equal(data[2][0], first)
