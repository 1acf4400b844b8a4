"""Shared fixtures: small synthetic stand-ins built once per test run, helpers to run the scripts and to start a
tracking server."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SIDE_BY_SIDE = {"OMP_WAIT_POLICY": "PASSIVE"}
"""For processes a test starts at the same moment: their idle OpenMP threads sleep instead of spinning on the cores
the others need (docs/scaling_out.md, section 7; the same bits)."""
# The steps pin the CPU's code paths before their first computation (provenance.pin_code_paths: with --quick, the
# portable ones); MKL, oneDNN and torch read the variables once, at their first call. Tests that run a step's main()
# in this process run --quick, so this process takes the portable paths before anything imports torch, whatever
# runs here first (a test checks that this is provenance.PORTABLE_CODE_PATHS). Scripts run as subprocesses get
# none of them, as from a user's shell: they must pin their paths themselves.
QUICK_CODE_PATHS = {
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}
for _name, _value in QUICK_CODE_PATHS.items():
    os.environ[_name] = _value


def run_script(
    script: str, *args: str, cwd: Path, check: bool = True, env: dict | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run `python <script> <args>` from `cwd` as the README does; fail the test with its output if it fails."""
    inherited = {  # each test has its own store; a user's shell has none of the code paths this process pins
        k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and k not in QUICK_CODE_PATHS
    }
    merged = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env = {k: v for k, v in merged.items() if v is not None}  # env={"NAME": None} removes NAME
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{script} {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


def main_in_process(train: object, argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.main(argv) in this process, from `cwd` with its default stores; MLflow's and the signals' state
    (the active experiment, the tracking URI, the stop handlers) are put back afterwards."""
    monkeypatch.chdir(cwd)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)  # set_experiment sets it
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        train.main(argv)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # set_experiment also sets it for subprocesses


@contextlib.contextmanager
def torch_settings_kept() -> Iterator[None]:
    """main() sets torch's thread count and deterministic mode for the whole process: put them back after it."""
    import torch  # here, not at the top: this module sets the MKL variables before anything imports torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def main_captured(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python <script> <args>` from `cwd` as run_script runs it, but as main(argv) in this process (a new load of the
    step's modules, torch's settings put back afterwards), with its printout captured: a new process pays about 6 s
    of imports. For the shared runs whose tests read results and printout back; an exit status, a clean stop or a
    fresh process's environment is tested through run_script."""
    step, name = script.removesuffix(".py").split("/")
    module, out, err = load_step_module(step, name), io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, torch_settings_kept():
        patch.setattr(sys, "argv", [str(REPO / script), *args])  # the command the runs record, as run_script's
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main_in_process(module, list(args), cwd, patch)
        except (Exception, SystemExit) as error:
            pytest.fail(
                f"{script} {' '.join(args)} raised {error!r}\n"
                f"--- stdout ---\n{out.getvalue()[-4000:]}\n--- stderr ---\n{err.getvalue()[-4000:]}"
            )
    return subprocess.CompletedProcess([script, *args], 0, out.getvalue(), err.getvalue())


def user_error(script: str, argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """What `script` says when it stops on bad input, run as main(argv) in this process from `cwd`. It must stop
    with SystemExit and a message: Python prints that message alone and exits 1, never a traceback. Any other
    exception fails the test. (Real command lines that stop so are still run as processes: step 1's offline
    weights, step 2's unknown run id, step 5's bad images.)"""
    step, name = script.removesuffix(".py").split("/")
    with pytest.raises(SystemExit) as stopped, torch_settings_kept():
        main_in_process(load_step_module(step, name), argv, cwd, monkeypatch)
    assert isinstance(stopped.value.code, str), stopped.value.code
    return stopped.value.code


def client_in(cwd: Path) -> mlflow.MlflowClient:
    """A client on the default MLflow store that the scripts made in `cwd`."""
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")


def command_from_record(client: mlflow.MlflowClient, fold_run: mlflow.entities.Run, folder: Path) -> list[str]:
    """The train.py flags that rerun one fold of steps 3 and 4, from what MLflow recorded alone: the root run's
    params (seed, quick, device, data folder, deterministic, amp, portable; trials and pruning in step 4) and logged
    split file (downloaded into `folder`), the fold run's params (threads, workers) and tags (which fold). Nothing
    else."""
    root = client.get_run(fold_run.data.tags["mlflow.parentRunId"])
    params, fold = root.data.params, fold_run.data.params
    (logged,) = client.list_artifacts(root.info.run_id, "splits")
    flags = [
        "--seed", params["seed"], "--device", params["device"], "--data-dir", params["data_dir"],
        "--split-file", client.download_artifacts(root.info.run_id, logged.path, str(folder)),
        "--num-threads", fold["num_threads"], "--num-workers", fold["num_workers"],
        "--root-split", fold_run.data.tags["root_split_id"], "--nested-split", fold_run.data.tags["nested_split_id"],
        *(["--quick"] if params["quick"] == "True" else []),
        "--deterministic" if params["deterministic"] == "True" else "--no-deterministic",
        "--amp" if params["amp"] == "True" else "--no-amp",
        "--portable" if params["portable"] == "True" else "--no-portable",
    ]  # fmt: skip
    if "n_trials" in params:  # step 4: the search's budget and pruning (its storage is this folder's own)
        flags += ["--n-trials", params["n_trials"], "--pruning" if params["pruning"] == "True" else "--no-pruning"]
    return flags


# Where a failed bit-for-bit comparison keeps both runs' stores, so that a rare failure can be read afterwards
EVIDENCE = Path(os.environ.get("REPROAI_EVIDENCE_DIR", tempfile.gettempdir())) / "reproai-bit-for-bit-evidence"


def phase_losses(client: mlflow.MlflowClient, run_id: str) -> dict[str, list[float]]:
    """Every phase run's logged train_loss, step by step, under run_id (any depth: a fold's trials and refit too),
    keyed by where it lies, e.g. "refit/warmup", in the order the runs started."""
    run = client.get_run(run_id)
    found, todo = {}, [(run, "")]
    while todo:
        parent, path = todo.pop(0)
        children = client.search_runs(
            [parent.info.experiment_id],
            f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
            order_by=["attributes.start_time ASC"],
        )
        for child in children:
            tags = child.data.tags
            name = tags.get("phase") or f"{tags.get('run_level', 'run')}{tags.get('trial_number', '')}"
            where = f"{path}/{name}".lstrip("/")
            if "phase" in tags:
                history = client.get_metric_history(child.info.run_id, "train_loss")
                found[where] = [m.value for m in sorted(history, key=lambda m: m.step)]
            else:
                todo.append((child, where))
    return found


def first_parting(before: dict[str, list[float]], after: dict[str, list[float]]) -> str:
    """Where two runs' logged losses first differ, phase by phase: the phase, the step and both values."""
    for phase in before.keys() | after.keys():
        if phase not in before or phase not in after:
            return f"phase {phase} is in one run only"
    for phase, losses in before.items():
        for step, (a, b) in enumerate(zip(losses, after[phase], strict=False)):
            if a != b:
                return f"phase {phase}, step {step}: train_loss {a!r} vs {b!r} (equal before that)"
        if len(losses) != len(after[phase]):
            return f"phase {phase}: {len(losses)} vs {len(after[phase])} steps, equal as far as both go"
    return "every logged loss equal: they parted after the last training step (evaluation, threshold, predictions)"


def store_of(client: mlflow.MlflowClient) -> Path:
    """The folder of a client's sqlite store (mlflow.db and mlruns/ lie there)."""
    return Path(client.tracking_uri.removeprefix("sqlite:///")).parent


def assert_bit_identical(
    test: str, a: tuple[mlflow.MlflowClient, str], b: tuple[mlflow.MlflowClient, str], folder: Path
) -> None:
    """Two runs (client, run id) have the same metrics and prediction tables, bit for bit. When not, the failure
    says where they parted (their logged losses, phase by phase) and names a folder that keeps both runs' stores."""
    (client_a, id_a), (client_b, id_b) = a, b
    metrics = [
        {k: v for k, v in client.get_run(run_id).data.metrics.items() if not k.startswith(("analysis_", "system/"))}
        for client, run_id in (a, b)
    ]
    same = metrics[0] == metrics[1] and logged_predictions(client_a, id_a, folder / "a") == logged_predictions(
        client_b, id_b, folder / "b"
    )
    if same:
        return
    parted = first_parting(phase_losses(client_a, id_a), phase_losses(client_b, id_b))
    kept = EVIDENCE / f"{test}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for name, client in (("a", client_a), ("b", client_b)):
        shutil.copytree(store_of(client), kept / name, ignore=shutil.ignore_patterns("*.journal*"))
    pytest.fail(
        f"Not bit for bit: run {id_a} (a) and run {id_b} (b) differ. Where they parted: {parted}. "
        f"Metrics a {metrics[0]} vs b {metrics[1]}. Both stores kept in {kept} (mlflow ui --backend-store-uri "
        f"sqlite:///{kept}/a/mlflow.db)."
    )


def logged_predictions(client: mlflow.MlflowClient, run_id: str, folder: Path) -> dict[str, bytes]:
    """The dev and test prediction tables a run logged, as bytes (every bit of every score)."""
    (folder := folder / run_id).mkdir(parents=True, exist_ok=True)
    return {
        name: Path(client.download_artifacts(run_id, f"predictions/{name}_predictions.csv", str(folder))).read_bytes()
        for name in ("dev", "test")
    }


def scramble_test_split(train: object, root: int, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The leak guard of steps 3 to 5: in `train` (a step's train module), every test label of outer fold `root`
    is flipped, and every test image its training reads is decoded from one noise image (written in folder). A
    decision that reads nothing of the test split (trials, pruning, the best trial, the refit's early stopping, the
    threshold) stays bit for bit the same; only the test metrics move."""
    noise = folder / "noise.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(noise)
    # the namespace of the module that decodes the images training.py reads: its pets.py (DecodedImages)
    reader = train.train_and_evaluate.__globals__["DecodedImages"].__init__.__globals__
    real_load_splits, real_load_image, test_files = train.load_splits, reader["load_image"], set()

    def flipped(*args: object, **kwargs: object) -> dict:
        splits = real_load_splits(*args, **kwargs)
        test = splits["root_splits"][root]["test"]
        splits["labels"] = splits["labels"].copy()
        splits["labels"][test] = 1 - splits["labels"][test]
        test_files.update(splits["files"][i] for i in test)
        return splits

    def noisy(path: Path, *args: object, **kwargs: object) -> object:
        return real_load_image(noise if path in test_files else path, *args, **kwargs)

    monkeypatch.setattr(train, "load_splits", flipped)
    monkeypatch.setitem(reader, "load_image", noisy)
    monkeypatch.setitem(reader, "_decoded", {})  # no image decoded before in this process is reused
    monkeypatch.setitem(train.train_and_evaluate.__globals__, "FEATURES", {})  # nor features of images (training.py)


STEP_LOCAL = tuple(sorted({path.stem for path in REPO.glob("step_*/*.py")}))  # every step's top-level module name


def step_local(name: str) -> bool:
    """Is `name` one of a step folder's own modules (a top-level one, or its support package and what is in it)?"""
    return name in STEP_LOCAL or name == "support" or name.startswith("support.")


def load_step_module(step: str, name: str):
    """Import step_N/<name>.py (or, when there is none, step_N/support/<name>.py) as the module `step_N_<name>`,
    with that step's own copies of its other modules.

    The step folders are not packages and their modules share names (every step has its own `support/pets.py`),
    so each load imports them afresh from the step's folder and leaves sys.path and sys.modules as they were.
    """
    saved_path, saved = list(sys.path), {m: sys.modules.pop(m) for m in list(sys.modules) if step_local(m)}
    sys.path.insert(0, str(REPO / step))
    try:
        if (REPO / step / f"{name}.py").exists():
            spec = importlib.util.spec_from_file_location(f"{step}_{name}", REPO / step / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses and pickle look the module up by name
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(f"support.{name}")
    finally:
        for local in [m for m in sys.modules if step_local(m)]:
            sys.modules.setdefault(f"{step}_{local}", sys.modules.pop(local))
        sys.modules.update(saved)
        sys.path[:] = saved_path
    return module


@pytest.fixture(scope="session")
def make_standin(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build a synthetic stand-in with `download_data.py --synthetic` once per (n_images, seed); return its data dir.

    The returned folder is shared between tests: treat it as read-only (copy it to change it).
    """
    built: dict[tuple[int, int], Path] = {}

    def build(n_images: int = 240, seed: int = 0) -> Path:
        key = (n_images, seed)
        if key not in built:
            data_dir = tmp_path_factory.mktemp(f"standin_{n_images}_{seed}") / "oxfordiii"
            run_script(
                "step_1/download_data.py",
                "--synthetic",
                "--n-images",
                str(n_images),
                "--seed",
                str(seed),
                "--data-dir",
                str(data_dir),
                cwd=REPO,
            )
            built[key] = data_dir
        return built[key]

    return build


@pytest.fixture(scope="session")
def split_file(make_standin, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The 240-image stand-in and a 3 x 3 split file for it (in a temp folder, not in the shared data): read-only."""
    data_dir = make_standin(240)
    path = tmp_path_factory.mktemp("splits") / "dataset_splits.json"
    main_captured(
        "step_3/make_dataset_splits.py", "--data-dir", str(data_dir), "--k-root", "3", "--k-nested", "3",
        "--output", str(path), cwd=REPO,
    )  # fmt: skip
    return data_dir, path


@pytest.fixture(scope="session")
def step4_search(split_file, tmp_path_factory) -> dict:
    """Step 4 quick on folds 0/0 and 0/1 of the split file, three trials each, uninterrupted; then the analysis.

    Shared by step 4's tests and by step 5's, which must choose and measure exactly the same."""
    data_dir, path = split_file
    cwd = tmp_path_factory.mktemp("step4")
    args = ["--quick", "--data-dir", str(data_dir), "--split-file", str(path), "--num-workers", "0"]
    first = run_script("step_4/train.py", *args, "--n-root-splits", "1", cwd=cwd)
    analysis = run_script("step_4/analyze_predictions.py", cwd=cwd)
    return {"cwd": cwd, "first": first, "analysis": analysis}


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(
    command: list[str], cwd: Path, log: Path, answers: Callable[[], object], env: dict | None = None
) -> Iterator[None]:
    """Start `command` in its own process group, its output in `log`; once `answers()` returns without raising,
    yield; afterwards (also when the test fails) stop the whole group and wait for it."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answers()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        else:
            pytest.fail(f"{Path(command[0]).name} {command[1]} did not start: {log.read_text()[-3000:]}")
        yield
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the process group `proc` leads; wait until none of its processes is left (a server's workers
    outlive their parent for a moment), SIGKILL after `timeout` seconds."""
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()  # reap the leader, else it stays as a zombie in the group
        try:
            os.killpg(proc.pid, signal.SIGKILL if time.monotonic() > deadline else 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, folder: Path, workers: int = 1) -> Iterator[str]:
    """`mlflow server` on a free port of 127.0.0.1, its artifacts in folder/artifacts and its log in
    folder/server.log: its URL once every server process answers; stopped afterwards."""
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    # MLflow 3's server starts a job runner for its GenAI features (8 more processes, each importing MLflow: about
    # 30 CPU seconds on 2 cores while the runs it should record are training); runs and artifacts need none of it
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def answers() -> None:  # the port first: the client itself would retry for long with back-off
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        mlflow.MlflowClient(url).search_experiments()  # the server has made its tables and answers

    with serving(command, folder, folder / "server.log", answers, env=env):
        yield url
