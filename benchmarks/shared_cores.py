"""Do several trainings at once on one machine share its cores, or collapse each other?

Starts N copies of `python step_2/train.py --quick` at the same moment (N = 1, 2, 4), each in a working directory
of its own (its own MLflow store) on one shared stand-in, and times them until the last one exits. Each way of
starting them is a setting:

- **default**: as a user starts them today: every copy with torch's default thread count (all the cores) and
  OpenMP's default wait policy, under which a thread that has finished its share of an operation spins on its core
  for a while before it sleeps, in case the next operation comes soon;
- **passive**: the same thread count, with `OMP_WAIT_POLICY=PASSIVE` in the copies' environment: an idle thread
  sleeps at once and leaves the core to whoever needs it (the same bits: only the waiting changes);
- **divided**: `OMP_WAIT_POLICY=PASSIVE`, and each copy gets `--num-threads` = cores // N (at least 1), so the copies'
  threads add up to the cores (other bits than the default thread count: the thread count is logged with the run).

Throughput is trainings per second, all copies together, relative to ONE copy of the default setting alone, its
fastest repeat (so 2 copies at 1.00 finish two trainings in the time one takes alone; at 0.50, twice that time).
One untimed copy runs first, so that no cell pays for cold file caches. Each copy's run is read
back from its MLflow store: its test ROC AUC and a digest of its logged predictions, which must be identical for
every copy with the same thread count, whatever the setting (the `bits` column). With --repeats > 1 the cells are
interleaved and the median of each cell is shown.

    python benchmarks/shared_cores.py                            # 240 images, 1 2 4 copies, 3 settings, 1 repeat
    python benchmarks/shared_cores.py --copies 1 2 --settings default passive --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from step_module import load_module

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("default", "passive", "divided")


def copy_environment(setting: str) -> dict[str, str]:
    """The environment a copy starts with under a setting: the caller's, less any OpenMP wait settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    if setting != "default":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def threads_for(setting: str, copies: int) -> int:
    cores = os.cpu_count() or 1
    return max(1, cores // copies) if setting == "divided" else cores


def run_copies(setting: str, copies: int, data_dir: Path, seed: int, work: Path) -> dict:
    """Start `copies` trainings at once; when all have exited: wall seconds, each copy's seconds, each run's result."""
    threads = threads_for(setting, copies)
    args = ["--quick", "--data-dir", str(data_dir), "--seed", str(seed), "--num-workers", "0"]
    args += ["--num-threads", str(threads)]
    folders = [Path(tempfile.mkdtemp(prefix=f"{setting}-{copies}-", dir=work)) for _ in range(copies)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "step_2/train.py"), *args],
            cwd=folder,
            env=copy_environment(setting),
            stdout=(folder / "train.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for folder in folders
    ]
    ended = {}
    while len(ended) < copies:
        for i, proc in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = time.perf_counter() - started
        time.sleep(0.05)
    wall = max(ended.values())
    for proc, folder in zip(procs, folders, strict=True):
        if proc.returncode != 0:
            sys.exit(f"{setting}, {copies} copies: a copy failed; its log: {folder / 'train.log'}")
    return {
        "wall": wall,
        "each": [ended[i] for i in range(copies)],
        "threads": threads,
        "results": [result_of(folder) for folder in folders],
    }


def result_of(folder: Path) -> tuple[str, str]:
    """The copy's run: test ROC AUC and a digest of its logged prediction tables (every bit of every score)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (run,) = [r for r in runs if "test_roc_auc" in r.data.metrics]  # the training's run (not its model check)
    tables = sorted(folder.glob(f"mlruns/**/{run.info.run_id}/artifacts/predictions/*.csv"))
    if not tables:
        sys.exit(f"no prediction tables for run {run.info.run_id} under {folder / 'mlruns'}")
    digest = hashlib.sha256(b"".join(t.read_bytes() for t in tables)).hexdigest()[:12]
    return f"{run.data.metrics['test_roc_auc']:.5f}", digest


def machine() -> str:
    """The CPU (brand, family, model: step 2's provenance reads them), the cores and Python."""
    facts = load_module("step_2", "provenance").cpu_facts()
    cpu = ", ".join(f"{k} {facts[k]}" for k in ("model name", "cpu family", "model") if k in facts) or "unknown CPU"
    return f"{cpu}; {os.cpu_count()} cores; Python {sys.version.split()[0]}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 2, 4], help="copies at once (1 2 4)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS), help="(all three)")
    parser.add_argument("--repeats", type=int, default=1, help="times each cell is run, interleaved (1)")
    parser.add_argument("--images", type=int, default=240, help="images of the stand-in it builds (240)")
    parser.add_argument("--seed", type=int, default=0, help="step 2's --seed (0)")
    args = parser.parse_args(argv)
    if 1 not in args.copies or "default" not in args.settings:
        parser.error("the yardstick is one copy of the default setting alone: keep 1 in --copies and default")

    cells = [(s, n) for s in args.settings for n in args.copies if not (s == "divided" and n == 1)]
    with tempfile.TemporaryDirectory(prefix="shared-cores-") as tmp:
        work = Path(tmp)
        data_dir = work / "data"
        subprocess.run(
            [sys.executable, str(REPO / "scripts/make_standin.py"), "--n-images", str(args.images),
             "--data-dir", str(data_dir)],
            check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"},
        )  # fmt: skip
        print(f"{machine()}; {args.images}-image stand-in; step_2/train.py --quick, seed {args.seed}", flush=True)
        run_copies("default", 1, data_dir, args.seed, work)  # untimed: the first process pays for cold file caches
        done: dict[tuple[str, int], list[dict]] = {cell: [] for cell in cells}
        for repeat in range(args.repeats):
            for setting, copies in cells:
                done[(setting, copies)].append(run_copies(setting, copies, data_dir, args.seed, work))
                last = done[(setting, copies)][-1]
                print(
                    f"  repeat {repeat + 1}: {setting:8} {copies} cop{'y' if copies == 1 else 'ies'} x "
                    f"{last['threads']} thread(s): {last['wall']:.1f} s",
                    flush=True,
                )

    alone = min(r["wall"] for r in done[("default", 1)])  # the best time alone: a slow run cannot flatter sharing
    reference: dict[int, tuple[str, str]] = {}  # thread count -> the first result seen with it
    print(f"\none copy of the default setting alone: {alone:.1f} s (the fastest of {args.repeats})\n")
    print(f"{'setting':9} {'copies':>6} {'threads':>7} {'wall s':>7} {'per copy s':>10} {'throughput':>10}  bits")
    for setting, copies in cells:
        runs = done[(setting, copies)]
        wall = statistics.median(r["wall"] for r in runs)
        each = statistics.median(s for r in runs for s in r["each"])
        threads = runs[0]["threads"]
        results = {result for r in runs for result in r["results"]}
        reference.setdefault(threads, next(iter(results)))
        same = results == {reference[threads]}
        auc = ", ".join(sorted({a for a, _ in results}))
        bits = f"identical (AUC {auc})" if same else f"DIFFERENT: {sorted(results)} vs {reference[threads]}"
        ratio = copies * alone / wall
        print(f"{setting:9} {copies:>6} {threads:>7} {wall:>7.1f} {each:>10.1f} {ratio:>9.2f}x  {bits}")


if __name__ == "__main__":
    main()
