"""Is step 2 bit for bit, every time? The same small training many times in one process, compared at the finest grain.

Each training is step 2's own `train_and_evaluate` (quick settings: ResNet-18 from scratch at 64 px, warm-up and
fine-tuning with AutoAugment, early stopping, threshold on dev) on a small stand-in, inside an MLflow run on a
throw-away sqlite store; only the model logging is left out (it costs seconds and decides nothing). Hooks record,
for every training:

- batches: a digest of every batch that reaches the model (training steps, then the dev and test passes), in order;
- losses: every training step's loss, as logged;
- first-step weights: a digest of every tensor of the model after the first optimizer step;
- final weights: a digest of every tensor of the kept model;
- predictions: the dev and test scores, bit for bit.

The matrix: `--workers` (DataLoader worker processes) x `--threads` (torch CPU threads), `--repeats` trainings per
cell, cells interleaved (one training of every cell, then the next round), optionally all of it again with
`--load` busy-loop processes beside it (the one failure ever seen came during a loaded CI run). Step 2 promises
that the thread count may change the bits and the worker count may not: every training is compared with the
first training of its thread count (0 workers, no load). For each cell the table shows identical k of N and, for
a divergence, where it first appears: the batch (its index), else the step whose loss differs, else the tensor
whose first-step weights differ, else the final weights or the predictions. Exits 0.

    python benchmarks/determinism.py                       # 20 repeats, workers 0 1 2, threads 1 2, no load
    python benchmarks/determinism.py --repeats 50 --load 2 # and again beside 2 busy-loop processes
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the steps' progress bars would drown the table

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

from step_module import REPO, load_train  # noqa: E402


def digest(tensor: torch.Tensor) -> str:
    """A short digest of a tensor's bytes (its dtype and shape included)."""
    data = tensor.detach().cpu().contiguous()
    head = f"{data.dtype}{tuple(data.shape)}".encode()
    return hashlib.blake2b(head + data.reshape(-1).view(torch.uint8).numpy().tobytes(), digest_size=8).hexdigest()


@dataclass
class Record:
    """Everything one training produced, at the finest grain the comparison uses."""

    batches: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    first_step: dict[str, str] = field(default_factory=dict)
    final: dict[str, str] = field(default_factory=dict)
    predictions: dict[str, bytes] = field(default_factory=dict)
    seconds: float = 0.0


def first_divergence(reference: Record, other: Record) -> str | None:
    """Where `other` first differs from `reference`, in the order training produces things; None if identical."""
    for i, (a, b) in enumerate(zip(reference.batches, other.batches, strict=False)):
        if a != b:
            return f"batch {i}"
    if len(reference.batches) != len(other.batches):
        return f"batch count {len(other.batches)} vs {len(reference.batches)}"
    for i, (a, b) in enumerate(zip(reference.losses, other.losses, strict=False)):
        if a != b:
            return f"loss of step {i}"
    if len(reference.losses) != len(other.losses):
        return f"step count {len(other.losses)} vs {len(reference.losses)}"
    differing = [name for name, value in reference.first_step.items() if other.first_step.get(name) != value]
    if differing:
        return f"first-step weights: {differing[0]} (+{len(differing) - 1} more)"
    differing = [name for name, value in reference.final.items() if other.final.get(name) != value]
    if differing:
        return f"final weights: {differing[0]} (+{len(differing) - 1} more)"
    for name, value in reference.predictions.items():
        if other.predictions.get(name) != value:
            return f"{name} predictions"
    return None


class Recorder:
    """Hooks into step 2's train.py that fill a Record while its own code trains."""

    def __init__(self, train: object) -> None:
        self.train, self.record = train, Record()
        self.build_model, self.log_step_losses = train.build_model, train.runs.log_step_losses
        train.build_model = self.hooked_build_model
        train.runs.log_step_losses = self.hooked_log_step_losses
        train.log_outputs = self.hooked_log_outputs  # the predictions and the final weights; no model logging
        register_optimizer_step_post_hook(self.after_step)

    def hooked_build_model(self, settings: object) -> torch.nn.Module:
        model = self.build_model(settings)
        model.register_forward_pre_hook(lambda _module, inputs: self.record.batches.append(digest(inputs[0])))
        self.model = model
        return model

    def hooked_log_step_losses(self, losses: list[float], first_step: int) -> None:
        self.record.losses.extend(losses)
        self.log_step_losses(losses, first_step)

    def after_step(self, _optimizer: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
        if not self.record.first_step:
            self.record.first_step = {name: digest(value) for name, value in self.model.state_dict().items()}

    def hooked_log_outputs(self, model: torch.nn.Module, _loaders: dict, scores: dict) -> None:
        self.record.final = {name: digest(value) for name, value in model.state_dict().items()}
        self.record.predictions = {name: np.asarray(value).tobytes() for name, value in scores.items()}


def busy_loop() -> None:
    """A process that only burns CPU, as other jobs on a shared machine do."""
    while True:
        pass


def main(argv: list[str] | None = None) -> None:
    """Run the matrix, interleaved, and print identical k of N per cell with the first divergence."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="trainings per cell (default 20)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers (0 1 2)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU threads (1 2)")
    parser.add_argument("--load", type=int, default=0, help="also run every cell beside this many busy loops (0)")
    parser.add_argument("--images", type=int, default=160, help="images of the stand-in it builds (default 160)")
    parser.add_argument("--seed", type=int, default=0, help="step 2's --seed (default 0)")
    parser.add_argument(
        "--spread-threads", type=int, default=10, help="then one training per thread count 1..N: how far the "
        "metrics move when only the thread count changes (default 10; 0 skips it)",
    )  # fmt: skip
    parser.add_argument(
        "--portable", action=argparse.BooleanOptionalAction, default=False,
        help="the portable code paths (provenance.pin_code_paths), as --quick runs them; default: the native ones",
    )  # fmt: skip
    args = parser.parse_args(argv)

    train = load_train("step_2")
    train.pin_code_paths(args.portable)  # before the first computation, as step 2's main() does
    recorder = Recorder(train)
    settings, device = train.QUICK, torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "oxfordiii"
        subprocess.run(
            [sys.executable, str(REPO / "scripts/make_standin.py"), "--n-images", str(args.images),
             "--data-dir", str(data_dir)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        folder = train.dataset_folder(data_dir)
        paths, labels = train.read_annotations(folder)
        paths, labels = train.drop_undecodable(paths, labels, settings.image_size)
        split = dict(zip(("train", "dev", "test"), train.split_train_dev_test(labels, args.seed), strict=True))
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        mlflow.set_experiment("determinism")

        def train_once(workers: int, threads: int) -> Record:
            recorder.record = Record()
            started = time.perf_counter()
            train.seed_everything(args.seed, True, threads)
            run_args = argparse.Namespace(seed=args.seed, num_workers=workers)
            with mlflow.start_run():
                train.train_and_evaluate(paths, labels, split, settings, run_args, device)
            recorder.record.seconds = time.perf_counter() - started
            return recorder.record

        loads = [0] + ([args.load] if args.load else [])
        cells = [(load, w, t) for load in loads for w in args.workers for t in args.threads]
        records: dict[tuple[int, int, int], list[Record]] = {cell: [] for cell in cells}
        references = {t: train_once(0, t) for t in args.threads}  # 0 workers, no load: what every cell must match
        print(
            f"torch {torch.__version__}, {os.cpu_count()} cores ({sys.modules['provenance'].cpu_model()}), "
            f"{len(split['train'])} train / {len(split['dev'])} dev / {len(split['test'])} test images, "
            f"{len(references[args.threads[0]].losses)} steps per training, "
            f"{references[args.threads[0]].seconds:.1f} s per training",
            flush=True,
        )
        for load in loads:
            busy = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(load)]
            for process in busy:
                process.start()
            try:
                for repeat in range(args.repeats):
                    for w in args.workers:
                        for t in args.threads:
                            records[(load, w, t)].append(train_once(w, t))
                    print(f"  load {load}: round {repeat + 1}/{args.repeats} done", flush=True)
            finally:
                for process in busy:
                    process.terminate()
        test_labels = labels[split["test"]]
        spread = {}  # thread count: (test ROC AUC, digest of the test predictions)
        for threads in range(1, args.spread_threads + 1):
            scores = train_once(0, threads).predictions["test"]
            auc = roc_auc_score(test_labels, np.frombuffer(scores, dtype=np.float32))
            spread[threads] = (auc, hashlib.blake2b(scores, digest_size=8).hexdigest())

    print(f"\n{'load':>4s} {'workers':>7s} {'threads':>7s} {'identical':>10s} {'s/training':>10s}  first divergence")
    for load, w, t in cells:
        found = [first_divergence(references[t], r) for r in records[(load, w, t)]]
        where = Counter(f for f in found if f is not None)
        same = sum(f is None for f in found)
        seconds = np.median([r.seconds for r in records[(load, w, t)]])
        summary = "; ".join(f"{k} ({n}x)" for k, n in where.most_common(3)) or "-"
        print(f"{load:4d} {w:7d} {t:7d} {same:>4d} of {len(found):<3d} {seconds:10.2f}  {summary}")
    if len(args.threads) > 1:
        a, b = (references[t] for t in args.threads[:2])
        print(f"threads {args.threads[0]} vs {args.threads[1]} (expected to differ): {first_divergence(a, b)}")
    if spread:
        aucs = np.array([auc for auc, _ in spread.values()])
        print(f"\nOnly the thread count changed (0 workers, threads 1..{args.spread_threads}), test ROC AUC:")
        print("  " + ", ".join(f"{t}: {auc:.3f}" for t, (auc, _) in spread.items()))
        print(
            f"  mean {aucs.mean():.3f}, sd {aucs.std(ddof=1):.3f}, range {aucs.min():.3f}-{aucs.max():.3f}; "
            f"distinct results: {len({d for _, d in spread.values()})} of {len(spread)}"
        )


if __name__ == "__main__":
    main()
