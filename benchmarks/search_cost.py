"""What does step 4's search cost, and what does pruning save? Image-forward passes and wall time, side by side.

Runs `step_4/train.py --quick` in-process (its `main`), once with pruning (the default) and once with
`--no-pruning`, each in its own temporary working directory (own MLflow store and Optuna journal), variants
interleaved when repeated. It counts every image that goes through the model's forward pass (training, dev and
test predictions, the trials and the refit) by wrapping `PetClassifier.forward`, and times `main()` (imports paid
before the first run and not counted). Without pruning every trial trains as long as the refit, so "no pruning"
divided by (trials + 1) is about what one training of step 3 costs per fold.

    python benchmarks/search_cost.py                       # the quickstart's 2 x 2 folds, 3 trials each
    python benchmarks/search_cost.py --folds 1 1 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow

from step_module import load_train

REPO = Path(__file__).resolve().parents[1]


def run(train: object, argv: list[str]) -> tuple[float, int, str]:
    """Run train.main(argv) in a fresh temporary directory; return seconds, images forwarded, and its output."""
    counted = {"images": 0}
    model_class = sys.modules["support.training"].PetClassifier  # step 4's training core, which train.py imported
    forward = model_class.forward

    def counting_forward(self: object, images: object) -> object:
        if isinstance(images.shape[0], int):  # not torch.export tracing the model for log_model (a symbolic size)
            counted["images"] += images.shape[0]
        return forward(self, images)

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp), contextlib.redirect_stdout(out):
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        model_class.forward = counting_forward
        started = time.perf_counter()
        try:
            train.main(argv)
        finally:
            seconds = time.perf_counter() - started
            model_class.forward = forward
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
    return seconds, counted["images"], out.getvalue()


def main(argv: list[str] | None = None) -> None:
    """Measure step 4 with and without pruning; print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", type=int, nargs=2, default=(2, 2), metavar=("ROOT", "NESTED"), help="default 2 2")
    parser.add_argument("--n-trials", type=int, default=3, help="trials per fold (default 3)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant (default 1)")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data/oxfordiii", help="dataset root")
    args = parser.parse_args(argv)
    split_file = args.data_dir.resolve() / "dataset_splits.json"
    if not split_file.is_file():
        raise SystemExit(f"No split file at {split_file}: run python step_4/make_dataset_splits.py first.")

    common = ["--quick", "--data-dir", str(args.data_dir.resolve()), "--num-workers", "0"]
    common += ["--n-root-splits", str(args.folds[0]), "--n-nested-splits", str(args.folds[1])]
    train = load_train("step_4")
    variants = {
        "pruning": [*common, "--n-trials", str(args.n_trials)],
        "no pruning": [*common, "--n-trials", str(args.n_trials), "--no-pruning"],
    }
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
    pruned: dict[str, list[int]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, variant_argv in variants.items():
            seconds, images, output = run(train, variant_argv)
            results[name].append((seconds, images))
            pruned[name].append(output.count(" pruned: "))
    mlflow.set_tracking_uri(None)

    n_folds = args.folds[0] * args.folds[1]
    print(f"{n_folds} fold(s), {args.n_trials} trials each, {os.cpu_count()} cores, {args.repeats} repeat(s)")
    print(f"{'variant':20s} {'seconds':>9s} {'images forwarded':>17s} {'pruned trials':>14s}")
    for name, values in results.items():
        seconds = statistics.median(s for s, _ in values)
        images = statistics.median(i for _, i in values)
        print(f"{name:20s} {seconds:9.1f} {images:17,.0f} {statistics.median(pruned[name]):14.0f}")
    on = [statistics.median(x) for x in zip(*results["pruning"], strict=True)]
    off = [statistics.median(x) for x in zip(*results["no pruning"], strict=True)]
    print(f"pruning / no pruning: wall time {on[0] / off[0]:.2f}x, images forwarded {on[1] / off[1]:.2f}x")
    trainings = args.n_trials + 1
    print(
        f"with pruning, a fold's search and refit cost about {trainings * on[1] / off[1]:.1f} trainings' worth of "
        f"forward passes ({trainings} without pruning)"
    )


if __name__ == "__main__":
    main()
