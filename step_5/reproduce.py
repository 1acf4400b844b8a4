"""Reproduce a logged step-5 run from what MLflow recorded, and say whether the result came back.

`fetch` reads a complete root run's record: its resolved config (JSON: data only, never code), its seed,
determinism and thread count, and the split file it logged, checked against the recorded digest.
`environment_differences` lists what is not as it was (code, packages, hardware, the CPU's code paths, data).
`environment` is what a rerun is keyed by besides the code and the config, so `already_reproduced` reports an
earlier rerun only when none of them changed (`--fresh-rerun` reruns anyway). `judge` compares the new run's folds
with the original's and gives each fold, and the whole, a verdict, with the cause the record names:

- identical: every fold's metrics and chosen hyper-parameters are equal bit for bit;
- within noise: a metric moved, but by less than it varies between the original's folds (the standard deviation
  of dev and test ROC AUC across folds), so the change is smaller than what choosing other folds does;
- different: some fold moved by more than that (or the original has one fold: no spread to judge noise by).

A verdict other than identical names its cause when the record has one (the CPU's code path, the code, the packages,
the threads) and says so when it has none: nothing in the record then explains the difference.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # two small files: no bars

from support.provenance import code_digest, git_state, installed_distributions, software_and_hardware
from support.resume import completed_folds, held_folds

FOLD_METRICS = ("dev_roc_auc", "test_roc_auc", "threshold")  # all must be equal for "identical"
NOISE_METRICS = ("dev_roc_auc", "test_roc_auc")  # judged against their spread between the original's folds


@dataclass
class Original:
    """What a logged root run recorded: enough to run it again."""

    run: mlflow.entities.Run
    config: dict  # the resolved config, as JSON
    split_file: Path  # the logged copy, digest checked
    seed: int
    deterministic: bool
    num_threads: int
    portable: bool  # the CPU code paths every x86-64 CPU has (a record without it ran the native ones)
    folds: list[tuple[int, int]]  # every fold it holds: what a rerun reruns (unless --set cv.… picks some)
    fresh: bool = False  # --fresh-rerun: rerun even if this rerun was made before


def fetch(run_id: str, experiment: str) -> Original:
    """The record of a complete root run of `experiment`; one sentence when the run is not one."""
    if not run_id.strip():
        raise SystemExit("--from-run was given an empty run id (an unset shell variable?): give a root run's id.")
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise SystemExit(f"--from-run {run_id}: no such run in {mlflow.get_tracking_uri()}.") from None
    name = client.get_experiment(run.info.experiment_id).name
    tags, params = run.data.tags, run.data.params
    if name != experiment or tags.get("run_level") != "root":
        raise SystemExit(
            f"--from-run {run_id}: a {tags.get('run_level', 'non-step')} run of experiment {name!r}; give the id of a "
            f"root run of {experiment!r} (the top run in the UI)."
        )
    if tags.get("run_complete") != "true":  # a killed, failed or still running root has folds missing
        raise SystemExit(
            f"--from-run {run_id}: this root run is {run.info.status} and not complete (no run_complete tag), so "
            "there is no whole result to compare with: finish it with its own command first, or give a complete run."
        )
    folder = Path(tempfile.mkdtemp(prefix=f"reproduce-{run_id[:8]}-"))  # the new run logs its own copy
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    try:
        text = Path(client.download_artifacts(run_id, "config/resolved_config.json", str(folder))).read_text()
        split_files = list(Path(client.download_artifacts(run_id, "splits", str(folder))).glob("*.json"))
    except (MlflowException, OSError) as error:
        raise SystemExit(f"--from-run {run_id}: its config or split file is not in its artifacts ({error}).") from None
    try:
        config = json.loads(text)
    except ValueError as error:
        raise SystemExit(
            f"--from-run {run_id}: its config/resolved_config.json is not readable JSON ({error})."
        ) from None
    if len(split_files) != 1:
        raise SystemExit(
            f"--from-run {run_id}: its splits/ artifact folder holds {len(split_files)} JSON files, not the one split "
            "file the run logged; it cannot be reproduced from this record."
        )
    (split_file,) = split_files
    if hashlib.sha256(split_file.read_bytes()).hexdigest() != tags.get("split_file_digest"):
        raise SystemExit(
            f"--from-run {run_id}: the logged split file's digest is not the recorded split_file_digest: the "
            "artifact was changed after the run; it cannot be reproduced from this record."
        )
    if not ("seed" in params and "deterministic" in params and "env.torch_threads" in tags):
        raise SystemExit(
            f"--from-run {run_id}: its record has no seed, deterministic or env.torch_threads to rerun with."
        )
    return Original(
        run,
        config,
        split_file,
        int(params["seed"]),
        params["deterministic"] == "True",
        int(tags["env.torch_threads"]),
        params.get("portable") == "True",
        sorted(held_folds(client, run)),
    )


def environment(device: torch.device) -> dict[str, str]:
    """What a rerun's verdict depends on besides the code and the config: the software and hardware (thread count
    included) and every installed distribution (as a digest). Part of a rerun's run key."""
    packages = hashlib.sha256(installed_distributions().encode()).hexdigest()
    return {**software_and_hardware(device), "installed_distributions": packages}


def already_reproduced(original: Original | None, experiment_id: str, key: str, folds: list) -> bool:
    """Whether a complete rerun with this run key (the same record, code, packages, hardware, code paths and
    threads) has every fold asked for: then its verdict is printed, and nothing is rerun (unless --fresh-rerun)."""
    if original is None or original.fresh:
        return False
    done = completed_folds(experiment_id, key)
    query = f"tags.run_level = 'root' AND tags.run_key = '{key}' AND tags.run_complete = 'true'"
    earlier = mlflow.MlflowClient().search_runs([experiment_id], query, order_by=["attributes.start_time DESC"])
    earlier = [run for run in earlier if "reproduction_verdict" in run.data.tags]
    if not earlier or not set(folds) <= done:
        return False
    run = earlier[0]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000))
    print(
        f"Already reproduced by run {run.info.run_id} on {when}, with this code, these packages, this hardware, its "
        f"code paths and thread count: verdict {run.data.tags['reproduction_verdict'].upper()} (its "
        "reproduction/verdict.json). Nothing was rerun; a change to any of them makes a new rerun, and --fresh-rerun "
        "reruns anyway."
    )
    return True


CODE_PATH_TAGS = ("env.cpu_", "env.mkl", "env.onednn", "env.code_paths", "env.var.")  # what decides the CPU's bits
WAIT_TAGS = ("env.var.OMP_WAIT_POLICY", "env.var.GOMP_SPINCOUNT")  # how idle threads wait: the same bits either way
WAITING = "how idle threads wait differs, which changes no bit (benchmarks/shared_cores.py): "


def environment_differences(original: Original, code_dir: Path, device: torch.device) -> list[str]:
    """What differs from the original's record: git commit and dirty state, packages, hardware, the CPU's code
    paths and every variable that selects one (each named "the CPU's code path differs"), data digest."""
    tags = original.run.data.tags
    state = git_state(code_dir)
    now = {
        "git_commit": state["commit"],
        "git_dirty": state["dirty"],
        "code_digest": code_digest(code_dir),
        **{f"env.{key}": value for key, value in software_and_hardware(device).items()},
    }
    if "env.code_paths" in tags:  # a record that lists its variables: one set then only, or now only, differs too
        variables = dict.fromkeys((key for key in (*tags, *now) if key.startswith("env.var.")), "unset")
        now, tags = {**variables, **now}, {**variables, **tags}
    differences = [
        (WAITING if key in WAIT_TAGS else "the CPU's code path differs: " if key.startswith(CODE_PATH_TAGS) else "")
        + f"{key.removeprefix('env.var.')}: {tags[key]} then, {value} now"
        for key, value in now.items()
        if key in tags and tags[key] != value
    ]
    try:
        then = set(
            mlflow.artifacts.load_text(
                f"{original.run.info.artifact_uri}/provenance/installed_distributions.txt"
            ).split()
        )
    except MlflowException:
        then = set()
    changed = sorted(set(installed_distributions().split()) ^ then)
    if then and changed:
        names = sorted({line.split("==")[0] for line in changed})
        differences.append(
            f"installed packages: {len(names)} differ ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"
        )
    return differences


def fold_runs(client: mlflow.MlflowClient, root: mlflow.entities.Run) -> dict[tuple[int, int], mlflow.entities.Run]:
    """The latest completed fold run of each fold with the root's run key."""
    query = f"tags.run_level = 'fold' AND tags.run_key = '{root.data.tags['run_key']}' AND tags.fold_complete = 'true'"
    latest: dict[tuple[int, int], mlflow.entities.Run] = {}
    for run in client.search_runs([root.info.experiment_id], query, order_by=["attributes.start_time ASC"]):
        latest[(int(run.data.tags["root_split_id"]), int(run.data.tags["nested_split_id"]))] = run
    return latest


def verdict_of(old: dict[str, float], new: dict[str, float], same_choice: bool, spread: dict[str, float]) -> str:
    """One fold's verdict from its metrics before and after, whether it chose the same values, and the spread.

    identical: the same choice and every metric equal bit for bit; within noise: every NOISE_METRICS change
    smaller than that metric's spread between the original's folds; different: otherwise."""
    if same_choice and all(new[m] == old[m] for m in FOLD_METRICS):
        return "identical"
    return "within noise" if all(abs(new[m] - old[m]) < spread[m] for m in NOISE_METRICS) else "different"


def cause_of(differences: list[str], overrides: list[str]) -> str:
    """What the record says a difference comes from: the CPU's code path first, else whatever else differs, else
    nothing (the same code, packages, CPU, code paths, threads and config)."""
    paths = [d.removeprefix("the CPU's code path differs: ") for d in differences if d.startswith("the CPU's code")]
    if paths:
        return f"the CPU's code path differs ({'; '.join(paths)})"
    differences = [d for d in differences if not d.startswith(WAITING)]
    if differences or overrides:
        return "not as in the original: " + "; ".join(differences + [f"--set {' '.join(overrides)}"] * bool(overrides))
    return (
        "nothing in the record explains it: the same code, packages, CPU, code paths, threads and config; a change "
        "the record does not hold (e.g. the machine's load, a library's choice at run time) is the suspect"
    )


def judge(
    original: Original | None, new_root_id: str, searched: list[str], overrides: list[str], differences: list[str]
) -> None:
    """Each fold's verdict and the overall one with its cause, printed, tagged on the fold runs and the new root,
    and logged (nothing when this is not a rerun)."""
    if original is None:
        return
    client = mlflow.MlflowClient()
    before, after = fold_runs(client, original.run), fold_runs(client, client.get_run(new_root_id))
    spread = {
        metric: float(np.std([run.data.metrics[metric] for run in before.values()], ddof=1)) if len(before) > 1 else 0.0
        for metric in NOISE_METRICS
    }
    folds = {}
    for fold, new in after.items():
        if fold not in before:
            continue
        old = before[fold]
        changes = {m: new.data.metrics[m] - old.data.metrics[m] for m in FOLD_METRICS}
        same_choice = all(new.data.params.get(p) == old.data.params.get(p) for p in searched)
        verdict = verdict_of(old.data.metrics, new.data.metrics, same_choice, spread)
        if verdict == "identical":
            detail = "every metric and chosen value equal bit for bit"
        else:
            # the metric that moved most, relative to how much it varies between folds
            worst = max(NOISE_METRICS, key=lambda m: abs(changes[m]) / (spread[m] or 1e-12))
            detail = (
                f"{worst} {old.data.metrics[worst]:.4f} -> {new.data.metrics[worst]:.4f} ({changes[worst]:+.4f}; "
                f"spread between folds {spread[worst]:.4f})"
                + ("" if same_choice else "; other hyper-parameters chosen")
            )
        folds[f"{fold[0]}/{fold[1]}"] = {"verdict": verdict, "detail": detail, "changes": changes}
        client.set_tag(new.info.run_id, "reproduction_verdict", verdict)
    verdicts = [f["verdict"] for f in folds.values()]
    overall = (
        next((v for v in ("different", "within noise") if v in verdicts), "identical") if verdicts else "no common fold"
    )
    result = {
        "reproduces": original.run.info.run_id,
        "overall": overall,
        "spread_between_folds": spread,
        "folds": folds,
    }
    if len(before) < 2 and overall != "identical":
        result["note"] = "the original has one fold: there is no spread between folds to judge noise by"
    if folds and len(folds) < len(before):  # --set cv.… picked some: the verdict is theirs alone
        unchecked = ", ".join(f"{r}/{n}" for r, n in sorted(before) if f"{r}/{n}" not in folds)
        result["note"] = f"only {len(folds)} of the original's {len(before)} folds were rerun; not checked: {unchecked}"
    if overall not in ("identical", "no common fold"):
        result["cause"] = cause_of(differences, overrides)
    changed = f" with --set {' '.join(overrides)}" if overrides else ""
    print(f"\nReproduction of run {original.run.info.run_id}{changed}, fold by fold:")
    for name, fold in folds.items():
        print(f"  fold {name}: {fold['verdict']}: {fold['detail']}")
    print(f"Overall: {overall.upper()}" + (f" ({result['note']})" if "note" in result else ""))
    if "cause" in result:
        print(f"Cause: {result['cause']}")
    mlflow.log_dict(result, "reproduction/verdict.json")
    mlflow.set_tag("reproduction_verdict", overall)


def add_rerun_flags(parser: argparse.ArgumentParser) -> None:
    """--from-run RUN_ID, and --fresh-rerun to rerun it even where the same rerun was made before."""
    parser.add_argument("--from-run", metavar="RUN_ID", help="rerun a logged root run; says if it came back")
    parser.add_argument(
        "--fresh-rerun", action="store_true", help="with --from-run: rerun even if this rerun was made before"
    )


def original_of(args: argparse.Namespace, experiment: str, seed: int) -> Original | None:
    """The logged run that --from-run names, from its record (None without --from-run). Fills in the seed,
    determinism, threads and code paths the command line left open: the original's, else the defaults."""
    original = None
    if args.fresh_rerun and args.from_run is None:
        raise SystemExit("--fresh-rerun reruns a logged run: give it with --from-run RUN_ID.")
    if args.from_run is not None:  # even "" (an unset shell variable): fetch refuses it
        if args.quick or args.config:
            raise SystemExit("--from-run takes the experiment from the run's record: give it without --quick/--config.")
        original = replace(fetch(args.from_run, experiment), fresh=args.fresh_rerun)
    recorded = {} if original is None else vars(original)
    defaults = (("seed", seed), ("deterministic", True), ("num_threads", os.cpu_count()), ("portable", args.quick))
    for name, default in defaults:
        if getattr(args, name) is None:
            setattr(args, name, recorded.get(name, default))
    return original


def split_file_words(original: Original | None) -> tuple[str, str] | None:
    """For splits.load_splits: a rerun's split file is the original run's, so data that do not fit it are not that
    run's data, and a new split file would reproduce nothing (None when this is not a rerun)."""
    if original is None:
        return None
    run_id = original.run.info.run_id
    return f"Run {run_id}'s split file", (
        f"these are not the images run {run_id} used, and a run can only be reproduced on its own data: put them "
        "back, or give their folder with --set data.data_dir=DIR"
    )


def folds_to_run(original: Original | None, overrides: list[str], folds: list[tuple[int, int]]) -> list:
    """The folds to run: a rerun reruns every fold the original holds (however many commands added them), unless
    --set cv.… picks folds; a new experiment runs the folds its config picks."""
    if original is None or any(assignment.strip().startswith("cv.") for assignment in overrides):
        return folds
    return original.folds


def rerun_of(original: Original | None, device: torch.device) -> tuple | None:
    """For a rerun's key: the run it reruns, and what its verdict depends on (the packages, the hardware, the code
    paths); with --fresh-rerun, the time too, so a new root reruns every fold."""
    if original is None:
        return None
    return (original.run.info.run_id, environment(device), time.time_ns() if original.fresh else None)


def precision_difference(original: Original, precision: str) -> list[str]:
    """The precision differs when the hardware or --amp does (a record without one ran in fp32), as the device may:
    a rerun runs how this machine and its flags say, and says so."""
    then = original.run.data.params.get("precision", "fp32")
    if then == precision:
        return []
    return [f"precision: {then} then, {precision} now (--amp, --no-amp and the GPU decide it)"]


def warn_differences(original: Original | None, code_dir: Path, device: torch.device, precision: str) -> list[str]:
    """For a rerun: print, and return, how this code, software, hardware and precision differ from the original's."""
    differences = [] if original is None else environment_differences(original, code_dir, device)
    differences += [] if original is None else precision_difference(original, precision)
    for difference in differences:
        print(f"WARNING not as in run {original.run.info.run_id}: {difference}", file=sys.stderr)
    return differences


def log_original(original: Original | None, differences: list[str]) -> None:
    """For a rerun, on its root run: the run it reproduces, and how its environment differs."""
    if original is not None:
        mlflow.set_tag("reproduces", original.run.info.run_id)
        mlflow.log_dict({"differences": differences}, "reproduction/environment.json")
