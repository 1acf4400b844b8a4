"""Does step 1's data pipeline starve the model? Loader alone, model alone and both together, on the CPU.

Step 1's quick settings (ResNet-18, 64 px, batch 32) and full ones (DenseNet-121, 224 px, batch 32, weights=None:
same compute, no download), full-size images from --data-dir, step 1's own functions, for each --workers value:

    loader   images/s of one pass over the DataLoader of PetImages(..., augment=True), batches thrown away
    model    images/s of train_one_epoch (forward, backward, AdamW step, all layers) on batches already in memory
    end2end  images/s of train_one_epoch over the real DataLoader: loader and model share the cores

Each measurement iterates a fresh DataLoader (worker start-up counts, as in every epoch of step 1); all are
interleaved (A B C A B C ...) --repeats times: median (min–max). The ratios pair the measurements of each repeat:
loader/model > 1: the loader alone keeps up; end2end/model = 1.0: the model never waits for data.

Run from the repository root (about 2 minutes on an idle 2-core machine):

    python benchmarks/data_pipeline.py
    python benchmarks/data_pipeline.py --repeats 5 --threads 1 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from step_module import load_train

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1] for line in lines if line.startswith("model name")]
    return names[0].strip() if names else platform.processor()


def pick_images(train: ModuleType, data_dir: Path, n: int) -> tuple[list[Path], np.ndarray]:
    """n decodable images, a fixed stratified draw (a few spare ones replace undecodable files)."""
    paths, labels = train.read_annotations(train.dataset_folder(data_dir))
    np.random.seed(0)  # stratified_subset draws from NumPy's global RNG
    keep = train.stratified_subset(labels, n + 16)
    paths, labels = train.drop_undecodable([paths[i] for i in keep], labels[keep], 64)
    return paths[:n], labels[:n]


def rate(work: Callable[[], object], n_images: int) -> float:
    """Images/s of one call of `work`, which handles n_images images."""
    started = time.perf_counter()
    work()
    return n_images / (time.perf_counter() - started)


def measurements(
    train: ModuleType, name: str, settings: Any, paths: list[Path], labels: np.ndarray, args: argparse.Namespace
) -> dict[str, Callable[[], float]]:
    """The measurements of one setting (step 1's Settings), by label; builds the model, pre-loads its batches."""
    n_loader = args.batches * settings.batch_size
    n_model = (args.batches if name == "quick" else args.full_batches) * settings.batch_size

    def loader(n: int, workers: int) -> torch.utils.data.DataLoader:
        data = train.PetImages(paths[:n], labels[:n], settings.image_size, augment=True)
        return train.make_loader(data, settings.batch_size, True, workers, CPU)

    model = train.build_model(settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.finetune_lr, weight_decay=settings.weight_decay)

    def epoch(batches: Iterable) -> None:
        train.train_one_epoch(model, batches, optimizer, CPU, freeze_backbone=False)

    in_memory = list(loader(n_model, 0))
    epoch(in_memory[:1])  # warm-up: first-call allocations are not measured
    result = {f"{name} model": lambda: rate(lambda: epoch(in_memory), n_model)}
    for w in args.workers:  # a fresh iterator each time: worker start-up counts, as in every epoch of step 1
        result[f"{name} loader w{w}"] = lambda w=w: rate(lambda: deque(loader(n_loader, w), maxlen=0), n_loader)
        result[f"{name} end2end w{w}"] = lambda w=w: rate(lambda: epoch(loader(n_model, w)), n_model)
    return result


def spread(values: list[float], digits: int) -> str:
    """'median (min–max)' of the values."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/oxfordiii"), help="dataset root")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every measurement")
    parser.add_argument(
        "--batches", type=int, default=14, help="batches per quick or loader measurement (14: a quick epoch)"
    )
    parser.add_argument(
        "--full-batches", type=int, default=2, help="batches per DenseNet-121 model or end2end measurement"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values to compare")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's own choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measure, interleaved, and print the medians and the paired ratios."""
    args = parse_args(argv)
    train = load_train("step_1")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"CPU: {cpu_model()}, {cores} cores usable | torch {torch.__version__}, "
        f"torch.get_num_threads() = {torch.get_num_threads()} | Python {platform.python_version()}"
    )
    settings = {"quick": train.QUICK, "full": dataclasses.replace(train.FULL, pretrained=False)}
    n_images = max(args.batches, args.full_batches) * max(s.batch_size for s in settings.values())
    paths, labels = pick_images(train, args.data_dir, n_images)
    todo: dict[str, Callable[[], float]] = {}
    for name, setting in settings.items():
        todo |= measurements(train, name, setting, paths, labels, args)
    rates: dict[str, list[float]] = {label: [] for label in todo}
    for repeat in range(args.repeats):
        for label, measure in todo.items():
            rates[label].append(measure())
            print(f"  repeat {repeat + 1}/{args.repeats} {label:<20} {rates[label][-1]:8.1f} img/s", flush=True)

    print(f"\n{'measurement':<20} {'images/s: median (min–max)':>30}   over {args.repeats} interleaved repeats")
    for label, values in rates.items():
        print(f"{label:<20} {spread(values, 1):>30}")
    print("\nRatios within each repeat, median (min–max); end2end/model = 1.0: the model never waits for data")
    print(f"{'setting':<8} {'workers':>7} {'loader/model':>22} {'end2end/model':>22}")
    for name in settings:
        model = rates[f"{name} model"]
        for workers in args.workers:
            loader = [a / b for a, b in zip(rates[f"{name} loader w{workers}"], model, strict=True)]
            both = [a / b for a, b in zip(rates[f"{name} end2end w{workers}"], model, strict=True)]
            print(f"{name:<8} {workers:>7} {spread(loader, 2):>22} {spread(both, 2):>22}")


if __name__ == "__main__":
    main()
