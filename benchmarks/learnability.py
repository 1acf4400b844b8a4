"""Does step 1's --quick learn, and how long does one quick training take? Seeded in-process runs of its main().

Step 1 is deliberately unseeded (its flaw 1), so one run says little. For each seed of --seeds this seeds Python's
`random`, NumPy's global RNG and torch (`torch.manual_seed`), then calls step 1's main(["--quick", "--data-dir",
..., "--num-workers", ...]) in-process, inside a fresh temporary working directory (step 1 writes results/step_1/
relative to it), and reads dev and test ROC AUC back from results/step_1/threshold.json. `seconds` is the wall
time of main(): the imports are paid once before the first run and not counted, but step 1's check that every
listed image decodes is (it is timed on its own as `check s`).

Targets the project set for --quick on the default stand-in: dev ROC AUC mean >= 0.75 with sd <= 0.1 over five
seeds, and about 10 s of compute per training on 2 cores. The stand-in's best reachable ROC AUC (auc_ceiling in
oxford-iiit-pet/SYNTHETIC.json) is printed beside the means. A benchmark reports: it exits 0 whether the targets
are met or not.

Run from the repository root (about 1–2 minutes on 2 cores):

    python benchmarks/learnability.py
    python benchmarks/learnability.py --seeds 0 1 2 3 4 5 6 7 8 9 --num-workers 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from step_module import load_train

REPO = Path(__file__).resolve().parents[1]
TARGET_DEV_AUC, TARGET_DEV_SD = 0.75, 0.1  # mean and sd of dev ROC AUC over the seeds
TARGET_SECONDS = 10.0  # "about 10 s": met when the mean is within 25 % above it
STANDIN_MARKER = "oxford-iiit-pet/SYNTHETIC.json"


def time_calls(module: ModuleType, name: str) -> list[float]:
    """Wrap module.<name> so that each call appends its duration in seconds to the list returned."""
    original, durations = getattr(module, name), []

    def timed(*args: object, **kwargs: object) -> object:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            durations.append(time.perf_counter() - started)

    setattr(module, name, timed)
    return durations


def quick_run(main: Callable[[list[str]], None], seed: int, argv: list[str]) -> tuple[dict, float]:
    """One seeded quick training in a temporary working directory: its threshold.json and its wall seconds."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="learnability_") as tmp, contextlib.chdir(tmp):
        started = time.perf_counter()
        main(argv)
        seconds = time.perf_counter() - started
        return json.loads(Path("results/step_1/threshold.json").read_text()), seconds


def mean_sd(values: list[float], digits: int) -> str:
    """'mean ± sd' (sample sd; nan for a single value)."""
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/oxfordiii"), help="dataset root")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one quick training per seed")
    parser.add_argument(
        "--num-workers", type=int, default=None, help="step 1's --num-workers (None: not passed, step 1's own default)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the seeded quick trainings and print one row per seed, the means and whether the targets are met."""
    args = parse_args(argv)
    data_dir = args.data_dir.resolve()  # the runs happen in other working directories
    train = load_train("step_1")
    check_seconds = time_calls(train, "drop_undecodable")
    step1_argv = ["--quick", "--data-dir", str(data_dir)]
    if args.num_workers is not None:
        step1_argv += ["--num-workers", str(args.num_workers)]
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}; step 1 {step1_argv}")
    rows = []
    for seed in args.seeds:
        summary, seconds = quick_run(train.main, seed, step1_argv)
        rows.append((seed, summary, seconds, check_seconds[-1]))

    print(f"\n{'seed':>4} {'dev ROC AUC':>11} {'test ROC AUC':>12} {'best':>12} {'seconds':>8} {'check s':>8}")
    for seed, summary, seconds, check in rows:
        best = f"{summary['best_phase']} {summary['best_epoch']}"
        aucs = f"{summary['dev_roc_auc']:>11.3f} {summary['test_roc_auc']:>12.3f}"
        print(f"{seed:>4} {aucs} {best:>12} {seconds:>8.1f} {check:>8.1f}")
    dev = [summary["dev_roc_auc"] for _, summary, _, _ in rows]
    test = [summary["test_roc_auc"] for _, summary, _, _ in rows]
    seconds = [row[2] for row in rows]
    without_check = [row[2] - row[3] for row in rows]
    marker = data_dir / STANDIN_MARKER
    ceiling = f"{json.loads(marker.read_text())['auc_ceiling']:.3f}" if marker.exists() else "n/a (not the stand-in)"

    print(f"\nover {len(rows)} seeds (mean ± sd):")
    print(f"  dev ROC AUC             {mean_sd(dev, 3)}   (stand-in's ceiling {ceiling})")
    print(f"  test ROC AUC            {mean_sd(test, 3)}")
    print(
        f"  seconds per training    {mean_sd(seconds, 1)}   (includes the image check: {mean_sd(check_seconds, 1)} s)"
    )
    print(f"  without the image check {mean_sd(without_check, 1)}")
    learns = statistics.fmean(dev) >= TARGET_DEV_AUC and len(dev) > 1 and statistics.stdev(dev) <= TARGET_DEV_SD
    fast = statistics.fmean(seconds) <= 1.25 * TARGET_SECONDS
    print(f"target dev ROC AUC mean >= {TARGET_DEV_AUC} with sd <= {TARGET_DEV_SD}: {'met' if learns else 'NOT met'}")
    limit = f"mean <= {1.25 * TARGET_SECONDS:.1f} s, image check included"
    print(f"target about {TARGET_SECONDS:.0f} s per training ({limit}): {'met' if fast else 'NOT met'}")


if __name__ == "__main__":
    main()
