"""Does a training give the same bits in a fresh process as in a process that has done other work? Steps 2 and 3.

The comparisons the bit-for-bit tests make, each repeated --repeats times, every training against one reference
(the first child process's first training of that step):

    step 2 fresh           `step_2/train.py --quick` (seed 0, no workers) as the first thing a new process does
    step 2 after others    the same in a process that has just trained another run (seed 1) and this one
    step 2, 2 workers      the same with --num-workers 2, in that process, after those
    step 3 fresh           fold 0/1 of `step_3/train.py --quick` alone, the first thing a new process does
    step 3 after fold 0/0  fold 0/1 trained right after fold 0/0 by one command, in a process that has trained before
    step 3, 2 workers      fold 0/1 alone with --num-workers 2, after those
    step 3 resumed         folds 0/0 and 0/1 as a command, SIGKILLed after fold 0/0, then resumed: fold 0/1 of the
                           resumed process (--kill-repeats times; two processes each)

Each in-process training runs the step's own main() (a child process per repeat and step, so each child's first
training is a fresh process's); an optimizer hook digests every step's gradients and weights, and MLflow holds every
step's loss. For a training that differs from the reference the table names where it first parted: the phase and
step, and whether the loss, the gradients or the weights of that step differ first. With --load, busy-loop
processes run beside everything. The stores of the reference and of the first training that parted are kept in
--evidence. Exits 0. Run from the repository root (~115 s a repeat and ~35 s a kill-and-resume on 2 cores):

    python benchmarks/cross_process.py --repeats 50 --kill-repeats 10 --minutes 90
    python benchmarks/cross_process.py --repeats 10 --load 2 --portable
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP2_CELLS, STEP3_CELLS = (
    ("step 2 fresh", "step 2 after others", "step 2, 2 workers"),
    (
        "step 3 fresh",
        "step 3 after fold 0/0",
        "step 3, 2 workers",
    ),
)


def blake(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def record_of(cwd: Path, step: str, hooked: dict[str, list] | None) -> dict:
    """What one training produced, read back from its store: metrics, predictions, and per phase and step the loss
    (MLflow) with the gradients' and weights' digests (the optimizer hook, in-process trainings only)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(step)
    query = "tags.run_level = 'root'" if step == "step_2" else "tags.run_level = 'fold' AND tags.nested_split_id = '1'"
    (run,) = client.search_runs([experiment.experiment_id], query + " AND attributes.status = 'FINISHED'")
    tables = [
        Path(client.download_artifacts(run.info.run_id, f"predictions/{name}_predictions.csv", str(cwd))).read_bytes()
        for name in ("dev", "test")
    ]
    phases = {}
    for phase in client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'", order_by=["start_time ASC"]
    ):
        losses = sorted(client.get_metric_history(phase.info.run_id, "train_loss"), key=lambda m: m.step)
        steps = (hooked or {}).get(phase.info.run_id, [])
        phases[phase.data.tags["phase"]] = [
            (loss.value, *(steps[i] if i < len(steps) else ("-", "-"))) for i, loss in enumerate(losses)
        ]
    metrics = {k: v for k, v in run.data.metrics.items() if not k.startswith("system/")}
    return {"metrics": metrics, "predictions": blake(b"".join(tables)), "phases": phases, "store": str(cwd)}


def parted(reference: dict, other: dict) -> str | None:
    """Where `other` first parts from `reference`: phase, step and what (loss, gradients, weights); None if equal."""
    for phase, steps in reference["phases"].items():
        theirs = other["phases"].get(phase, [])
        for index, (mine, their) in enumerate(zip(steps, theirs, strict=False)):
            for what, a, b in zip(("loss", "gradients", "weights"), mine, their, strict=True):
                if a != b and "-" not in (a, b):
                    return f"{phase} step {index}: {what}"
        if len(steps) != len(theirs):
            return f"{phase}: {len(theirs)} steps, not {len(steps)}"
    if other["metrics"] != reference["metrics"]:
        return "metrics (every step equal)"
    return "predictions" if other["predictions"] != reference["predictions"] else None


def child(step: str, data_dir: Path, split_file: Path, folder: Path, portable: bool) -> None:
    """One repeat's in-process trainings of `step`, each in its own store under `folder`; records to records.json."""
    import mlflow
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    sys.path.insert(0, str(REPO / "benchmarks"))
    from step_module import load_train

    train = load_train(step)
    hooked: dict[str, list] = {}

    def after_step(optimizer: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = b"".join(p.grad.detach().numpy().tobytes() for p in params if p.grad is not None)
        weights = b"".join(p.detach().numpy().tobytes() for p in params)
        hooked.setdefault(mlflow.active_run().info.run_id, []).append((blake(grads), blake(weights)))

    register_optimizer_step_post_hook(after_step)
    common = [
        "--quick",
        "--data-dir",
        str(data_dir),
        "--num-threads",
        "2",
        "--portable" if portable else "--no-portable",
    ]
    if step == "step_2":
        plan = [("step 2 fresh", ["--seed", "0", "--num-workers", "0"]), (None, ["--seed", "1", "--num-workers", "0"])]
        plan += [("step 2 after others", ["--seed", "0", "--num-workers", "0"])]
        plan += [("step 2, 2 workers", ["--seed", "0", "--num-workers", "2"])]
    else:
        one = ["--split-file", str(split_file), "--root-split", "0", "--nested-split", "1"]
        plan = [("step 3 fresh", [*one, "--num-workers", "0"])]
        plan += [("step 3 after fold 0/0", ["--split-file", str(split_file), "--n-root-splits", "1",
                                            "--n-nested-splits", "2", "--num-workers", "0"])]  # fmt: skip
        plan += [("step 3, 2 workers", [*one, "--num-workers", "2"])]
    records = {}
    for index, (cell, argv) in enumerate(plan):
        (cwd := folder / f"{index}").mkdir()
        os.chdir(cwd)
        mlflow.set_tracking_uri(None)
        mlflow.tracking.fluent._active_experiment_id = None
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        train.main([*common, *argv])
        if cell:
            records[cell] = record_of(cwd, step, hooked)
    (folder / "records.json").write_text(json.dumps(records))


def killed_and_resumed(data_dir: Path, split_file: Path, cwd: Path, portable: bool) -> dict:
    """Folds 0/0 and 0/1 as one command, SIGKILLed when fold 0/0 completes, then the same command again."""
    argv = [sys.executable, str(REPO / "step_3/train.py"), "--quick", "--data-dir", str(data_dir), "--split-file",
            str(split_file), "--n-root-splits", "1", "--n-nested-splits", "2", "--num-threads", "2", "--num-workers",
            "0", "--portable" if portable else "--no-portable"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    for line in proc.stdout:
        if line.startswith("fold 0/0 complete"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    subprocess.run(argv, cwd=cwd, env=env, check=True, capture_output=True)
    return record_of(cwd, "step_3", None)


def busy_loop() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="child processes per step (default 5)")
    parser.add_argument("--kill-repeats", type=int, default=2, help="kill-and-resume repeats (default 2)")
    parser.add_argument("--load", type=int, default=0, help="busy-loop processes beside everything (default 0)")
    parser.add_argument("--images", type=int, default=240, help="images of the stand-in (default 240, as the tests)")
    parser.add_argument("--portable", action=argparse.BooleanOptionalAction, default=True, help="code paths")
    parser.add_argument("--minutes", type=float, help="start no repeat after this many minutes: report what ran")
    parser.add_argument("--evidence", type=Path, default=Path(tempfile.gettempdir()) / "reproai-cross-process")
    parser.add_argument("--child", nargs=4, metavar=("STEP", "DATA", "SPLITS", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, data_dir, split_file, folder = args.child
        child(step, Path(data_dir), Path(split_file), Path(folder), args.portable)
        return
    os.environ["TQDM_DISABLE"] = "1"
    busy = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(args.load)]
    for process in busy:
        process.start()
    records: dict[str, list[dict]] = {cell: [] for cell in (*STEP2_CELLS, *STEP3_CELLS, "step 3 resumed")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir, split_file = tmp / "oxfordiii", tmp / "dataset_splits.json"
        for script, extra in (("step_1/download_data.py", ["--synthetic", "--n-images", str(args.images)]),
                              ("step_3/make_dataset_splits.py", ["--k-root", "3", "--k-nested", "3", "--output",
                                                                 str(split_file)])):  # fmt: skip
            subprocess.run([sys.executable, str(REPO / script), *extra, "--data-dir", str(data_dir)], check=True,
                           capture_output=True)  # fmt: skip
        flag = ["--portable" if args.portable else "--no-portable"]
        started = time.monotonic()
        for repeat in range(args.repeats):
            if args.minutes and time.monotonic() - started > 60 * args.minutes:
                print(f"  {args.minutes} minutes spent: {repeat} of {args.repeats} repeats ran", flush=True)
                break
            for step in ("step_2", "step_3"):
                (folder := tmp / f"{step}-{repeat}").mkdir()
                command = [
                    sys.executable,
                    __file__,
                    *flag,
                    "--child",
                    step,
                    str(data_dir),
                    str(split_file),
                    str(folder),
                ]
                subprocess.run(command, check=True, capture_output=True)
                for cell, record in json.loads((folder / "records.json").read_text()).items():
                    records[cell].append(record)
            print(f"  repeat {repeat + 1}/{args.repeats} done ({time.monotonic() - started:.0f} s)", flush=True)
        for repeat in range(args.kill_repeats):
            (cwd := tmp / f"killed-{repeat}").mkdir()
            records["step 3 resumed"].append(killed_and_resumed(data_dir, split_file, cwd, args.portable))
        for process in busy:
            process.terminate()
        report(records, args)


def report(records: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """Identical k of N per cell with where the others parted; the first parting's stores kept."""
    import torch

    sys.path.insert(0, str(REPO / "step_2"))
    from provenance import cpu_identity, cpu_model

    cpu = cpu_identity()
    print(f"\n{cpu_model()} ({cpu['cpu_vendor']} family {cpu['cpu_family']} model {cpu['cpu_model_number']}; "
          f"{cpu['cpu_flags']}), {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{'portable' if args.portable else 'native'} code paths, {args.load} busy loops")  # fmt: skip
    print(f"{'cell':24s} {'identical':>10s}  where the others first parted")
    kept = False
    for cell, found in records.items():
        reference = records["step 2 fresh" if cell.startswith("step 2") else "step 3 fresh"][0]
        partings = [parted(reference, record) for record in found]
        where = Counter(p for p in partings if p is not None)
        summary = "; ".join(f"{k} ({n}x)" for k, n in where.most_common(3)) or "-"
        print(f"{cell:24s} {sum(p is None for p in partings):>4d} of {len(found):<3d}  {summary}")
        first = next((record for record, p in zip(found, partings, strict=True) if p is not None), None)
        if first is not None and not kept:
            destination = args.evidence / f"{cell.replace(' ', '_').replace('/', '')}"
            shutil.copytree(reference["store"], destination / "reference", dirs_exist_ok=True)
            shutil.copytree(first["store"], destination / "parted", dirs_exist_ok=True)
            print(f"  kept the reference's and the first parted training's stores in {destination}")
            kept = True


if __name__ == "__main__":
    main()
