"""Where a training epoch's time goes, before and after the decoded-image cache: model, loader, end to end; and
what steps 3 to 5's training.py changes: the warm-up on cached features, mixed precision on a GPU.

Step 2's training core on a CUDA GPU when there is one, else on the CPU; --quick takes step 2's quick settings
(ResNet-18, 64 px), the default its full ones (DenseNet-121 at 224 px, batch 32, weights=None: the same compute, no
download). In one run, interleaved --repeats times (median, min–max):

    model            images/s of training steps (forward, backward, AdamW; all layers) on batches already in memory
    model amp        the same with step 3's mixed precision (only on a CUDA GPU: on a CPU it is fp32, the same)
    inference        images/s of the model in eval mode without gradients on batches in memory (as `predict`)
    loader before    images/s of one pass over the fine-tuning DataLoader (AutoAugment on), every image decoded
                     from its file every epoch: the code before pets.DecodedImages
    loader after     the same with PetImages as it is now: decoded once per process, kept in memory
    finetune before  images/s of `train_one_epoch` over the real fine-tuning loader, before
    finetune after   the same, after
    warmup after     images/s of a warm-up epoch: `train_one_epoch` with the backbone frozen over unaugmented images
    warmup step 2    images/s of a whole warm-up (step 2: that epoch, warmup_epochs times)
    warmup step 3    images/s of a whole warm-up in step 3's training.py: the frozen backbone's features computed
                     once (training.frozen_features), then warmup_epochs epochs of the head on them

On a GPU it also samples nvidia-smi once a second during each end-to-end measurement: the median of "GPU busy".
finetune/model = 1.0 means the model never waits for data; a whole warm-up / one inference pass says how many
passes of the frozen backbone the warm-up costs. Run from the repository root:

    python benchmarks/gpu_throughput.py --quick --workers 0        # the CPU, small: ~1 min on 2 cores
    python benchmarks/gpu_throughput.py --workers 4 8 --images 1024 --repeats 3   # a GPU, the full settings
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shutil
import statistics
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
from data_pipeline import cpu_model, rate, spread

from step_module import load_module, load_train


class DecodedEveryTime:
    """What PetImages read before the cache: each image decoded from its file whenever it is read."""

    def __init__(self, load: Callable, paths: list[Path], size: int) -> None:
        self.load, self.paths, self.size = load, paths, size

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.load(self.paths[index], self.size)


class GpuBusy:
    """nvidia-smi's utilisation.gpu once a second while the block runs (nothing without a GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.on = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.samples: list[float] = []

    def __enter__(self) -> GpuBusy:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        if self.on:
            self.thread.start()
        return self

    def sample(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
        while not self.stop.wait(1.0):
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()
            if out.isdigit():
                self.samples.append(float(out))

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.on:
            self.thread.join()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/oxfordiii"), help="dataset root")
    parser.add_argument("--quick", action="store_true", help="step 2's quick settings (ResNet-18, 64 px)")
    parser.add_argument("--images", type=int, default=256, help="training images per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="num_workers values to compare")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if any")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measure, interleaved, and print the medians, the paired ratios and the GPU busy medians."""
    args = parse_args(argv)
    train = load_train("step_2")
    train.runs.log_step_losses = lambda *_, **__: None  # no MLflow run here: the training alone is measured
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    pets = importlib.import_module("support.pets")  # step 2's, on sys.path since load_train
    training = load_module("step_3", "training")  # steps 3 to 5's core (its helpers: step 2's identical copies)
    settings = train.QUICK if args.quick else dataclasses.replace(train.FULL, pretrained=False)
    train.pin_code_paths(False)  # MKL's reproducible mode on the native code paths, as the steps without --quick
    train.seed_everything(0, True, torch.get_num_threads())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"{where} | torch {torch.__version__}, {torch.get_num_threads()} threads | {settings.backbone} at "
          f"{settings.image_size} px, batch {settings.batch_size}, {args.images} images")  # fmt: skip

    paths, labels = train.read_annotations(train.dataset_folder(args.data_dir))
    paths, labels = train.drop_undecodable(paths[: args.images + 16], labels[: args.images + 16], settings.image_size)
    paths, labels = paths[: args.images], labels[: args.images]
    model = training.build_model(settings).to(device)  # step 2's PetClassifier, whose forward also takes features
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.finetune_lr)

    def loader(after: bool, augment: bool, workers: int) -> torch.utils.data.DataLoader:
        data = train.PetImages(paths, labels, settings.image_size, augment, 0)
        if not after:
            data.images = DecodedEveryTime(pets.load_image, paths, settings.image_size)
        return train.make_loader(data, settings.batch_size, True, workers, device)

    @torch.no_grad()
    def inference() -> None:
        model.eval()
        for images, _ in in_memory:
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def epoch(batches: object, frozen: bool = False) -> None:
        model.backbone.requires_grad_(not frozen)
        train.train_one_epoch(model, batches, optimizer, device, 1, freeze_backbone=frozen)
        if device.type == "cuda":
            torch.cuda.synchronize()

    amp, fp32 = training.choose_precision(device, True), training.Precision(device.type, "fp32")

    def amp_epoch(batches: object) -> None:
        model.to(memory_format=amp.memory_format)
        training.train_one_epoch(model, batches, optimizer, device, 1, False, amp)
        model.to(memory_format=torch.contiguous_format)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def warmup_step_3(workers: int) -> None:
        training.FEATURES.clear()  # computed every time: what one trial pays, not what later trials pay
        model.backbone.requires_grad_(False)
        features = training.frozen_features(model.backbone, {"train": loader(True, False, workers)}, fp32)["train"]
        for _ in range(settings.warmup_epochs):
            training.train_one_epoch(model, features, optimizer, device, 1, True, fp32)
        if device.type == "cuda":
            torch.cuda.synchronize()

    in_memory = [(x.to(device), y.to(device)) for x, y in loader(True, True, 0)]
    epoch(in_memory[:1])  # first-call allocations and cuDNN set-up are not measured
    n = len(paths)
    todo: dict[str, Callable[[], float]] = {
        "model": lambda: rate(lambda: epoch(in_memory), n),
        "inference": lambda: rate(inference, n),
    }
    if amp.name != "fp32":
        todo[f"model amp {amp.name}"] = lambda: rate(lambda: amp_epoch(in_memory), n)
    for w in args.workers:
        for when, after in (("before", False), ("after", True)):
            todo[f"loader {when} w{w}"] = lambda a=after, w=w: rate(lambda: deque(loader(a, True, w), maxlen=0), n)
            todo[f"finetune {when} w{w}"] = lambda a=after, w=w: rate(lambda: epoch(loader(a, True, w)), n)
        todo[f"warmup after w{w}"] = lambda w=w: rate(lambda: epoch(loader(True, False, w), frozen=True), n)
        todo[f"warmup step 2 w{w}"] = lambda w=w: rate(
            lambda: [epoch(loader(True, False, w), frozen=True) for _ in range(settings.warmup_epochs)], n
        )
        todo[f"warmup step 3 w{w}"] = lambda w=w: rate(lambda: warmup_step_3(w), n)
    rates: dict[str, list[float]] = {label: [] for label in todo}
    busy: dict[str, list[float]] = {label: [] for label in todo}
    for repeat in range(args.repeats):
        for label, measure in todo.items():
            with GpuBusy(device) as gpu:
                rates[label].append(measure())
            busy[label] += gpu.samples
            print(f"  repeat {repeat + 1}/{args.repeats} {label:<18} {rates[label][-1]:8.1f} img/s", flush=True)

    print(f"\n{'measurement':<18} {'images/s: median (min–max)':>28} {'GPU busy median':>16}")
    for label, values in rates.items():
        gpu = f"{statistics.median(busy[label]):.0f} %" if busy[label] else "-"
        print(f"{label:<18} {spread(values, 1):>28} {gpu:>16}")
    print("\nWithin each repeat, median (min–max): finetune/model = 1.0: the model never waits for data")
    for w in args.workers:
        for when in ("before", "after"):
            ratio = [a / b for a, b in zip(rates[f"finetune {when} w{w}"], rates["model"], strict=True)]
            print(f"  finetune {when} / model, {w} workers: {spread(ratio, 2)}")
        speedup = [a / b for a, b in zip(rates[f"finetune after w{w}"], rates[f"finetune before w{w}"], strict=True)]
        print(f"  finetune after / before, {w} workers: {spread(speedup, 2)}")
    warm = [a / b for a, b in zip(rates[f"warmup after w{args.workers[0]}"], rates["inference"], strict=True)]
    print(f"  warmup epoch / one inference pass (images/s): {spread(warm, 2)}")
    for step in (2, 3):  # time of a whole warm-up over the time of one inference pass
        passes = [
            b / a for a, b in zip(rates[f"warmup step {step} w{args.workers[0]}"], rates["inference"], strict=True)
        ]
        print(
            f"  step {step}: a whole warm-up ({settings.warmup_epochs} epochs) / an inference pass: {spread(passes, 2)}"
        )
    if amp.name != "fp32":
        ratio = [a / b for a, b in zip(rates[f"model amp {amp.name}"], rates["model"], strict=True)]
        print(f"  model {amp.name} / fp32: {spread(ratio, 2)}")


if __name__ == "__main__":
    main()
