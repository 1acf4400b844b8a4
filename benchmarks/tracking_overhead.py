"""What do step 2's tracking and determinism cost? The training loop's throughput, measured side by side.

Runs step 2's own `train_one_epoch` (quick settings: resnet18 at 64 px, batch 32, AutoAugment, real stand-in
JPEGs, in-process loading) inside an MLflow run on a fresh sqlite store, in four variants, repeats interleaved
(A B C D A B C D ...):

- tracking off: step 2's `log_step_losses` replaced by a no-op (the same loop, nothing recorded),
- batched: as step 2 ships it — every step's loss, written in one `log_batch` per epoch,
- per step: every step's loss written with its own synchronous `mlflow.log_metric` call (what tutorials do),
- not deterministic: batched, with `torch.use_deterministic_algorithms(False)`.

It prints images/s per variant (median and min–max over the repeats) and the ratios to "tracking off".
Target: batched ≥ 0.97× tracking off.

    python benchmarks/tracking_overhead.py [--repeats 5] [--images 320] [--data-dir data/oxfordiii]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from step_module import load_train

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    """Measure the four variants, interleaved, and print throughputs and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="epochs per variant (default 5)")
    parser.add_argument("--images", type=int, default=320, help="training images per epoch (default 320)")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data/oxfordiii", help="dataset root")
    args = parser.parse_args(argv)

    train = load_train("step_2")
    settings, device = train.QUICK, torch.device("cpu")
    train.pin_code_paths(False)  # MKL's reproducible mode on the native code paths, as the steps without --quick
    train.seed_everything(0, True, os.cpu_count())
    paths, labels = train.read_annotations(train.dataset_folder(args.data_dir))
    keep = train.stratified_subset(labels, args.images, 0)
    dataset = train.PetImages([paths[i] for i in keep], labels[keep], settings.image_size, True, 0)
    loader = train.make_loader(dataset, settings.batch_size, True, 0, device)
    model = train.build_model(settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.finetune_lr)
    batched = train.runs.log_step_losses

    def no_op(losses: list[float], first_step: int) -> None:
        return None

    def per_step(losses: list[float], first_step: int) -> None:
        for i, loss in enumerate(losses):
            mlflow.log_metric("train_loss", loss, step=first_step + i)

    variants = {  # name: (how the step losses are logged, deterministic)
        "tracking off": (no_op, True),
        "batched (step 2)": (batched, True),
        "per step": (per_step, True),
        "not deterministic": (batched, False),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        mlflow.set_experiment("tracking_overhead")
        with mlflow.start_run():
            train.train_one_epoch(model, loader, optimizer, device, freeze_backbone=False, epoch=1)  # warm up
            for repeat in range(args.repeats):
                for name, (log_step_losses, deterministic) in variants.items():
                    torch.use_deterministic_algorithms(deterministic, warn_only=True)
                    train.runs.log_step_losses = log_step_losses
                    started = time.perf_counter()
                    train.train_one_epoch(model, loader, optimizer, device, freeze_backbone=False, epoch=repeat + 2)
                    rates[name].append(len(dataset) / (time.perf_counter() - started))
            train.runs.log_step_losses = batched

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(dataset)} images per epoch")
    print(f"{'variant':20s} {'median img/s':>12s} {'min–max':>15s} {'ratio':>7s}")
    base = statistics.median(rates["tracking off"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:20s} {median:12.1f} {min(values):7.1f}–{max(values):<7.1f} {median / base:7.3f}")
    ratios = [a / b for a, b in zip(rates["batched (step 2)"], rates["tracking off"], strict=True)]
    print(f"batched / off per repeat: median {statistics.median(ratios):.3f} (target ≥ 0.97)")
    cost = [a / b for a, b in zip(rates["batched (step 2)"], rates["not deterministic"], strict=True)]
    print(f"deterministic / not deterministic per repeat: median {statistics.median(cost):.3f}")


if __name__ == "__main__":
    main()
