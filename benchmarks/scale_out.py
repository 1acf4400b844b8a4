"""How much faster is step 4 with 1, 2 and 3 workers, on PostgreSQL with a tracking server and on the local files?

Starts W identical `step_4/train.py --quick` processes at once, as docs/scaling_out.md does, and times them until
the last one exits: W = 1, 2, 3, each on two set-ups, interleaved when repeated:

- **postgres**: Optuna studies in a fresh PostgreSQL database, runs in an `mlflow server` on 127.0.0.1 backed by
  another fresh database (the scale-out set-up; PostgreSQL from `bash scripts/local_services.sh postgres`);
- **files**: the defaults, an Optuna journal file and MLflow's sqlite store in the working directory.

On this one machine the tracking server (and PostgreSQL) share the two cores with the workers, so it also prints
the CPU seconds the tracking server used during each postgres run; on a cluster they run elsewhere.

Every worker uses `--num-threads 1`: the same bits whatever the number of workers, and one worker per core.
One worker therefore leaves the second core idle, so on this 2-core machine 2 workers can be at most about
2x faster, and 3 workers no faster than 2. The workload is a stand-in of `--n-images` images and the first outer
fold's first `--n-nested` inner folds, `--n-trials` trials each. Speed-ups are medians of same-repeat ratios.

    python benchmarks/scale_out.py                          # 240 images, folds 0/0 and 0/1, 3 trials, 1 repeat
    python benchmarks/scale_out.py --repeats 2 --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
import psycopg

REPO = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get("REPROAI_POSTGRES_URL", "postgresql://reproai:reproai@127.0.0.1:5432/postgres")


def new_database(admin: psycopg.Connection) -> str:
    """A fresh, empty PostgreSQL database: its URL."""
    name = f"reproai_bench_{uuid.uuid4().hex[:10]}"
    admin.execute(f"CREATE DATABASE {name}")
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def start_server(backend: str, folder: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on a free port of 127.0.0.1: the process and its URL, once it answers (its database
    migrations, some seconds on a fresh database, happen before: the file set-up pays sqlite's inside its time)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend,
        "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "2",
    ]  # fmt: skip
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            mlflow.MlflowClient(url).search_experiments()  # every server process has made its tables and answers
            time.sleep(5)  # and has settled: its start-up is not part of the workers' time
            return proc, url
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise SystemExit(f"mlflow server did not start; see {folder / 'server.log'}")


def cpu_seconds(group: int) -> float:
    """CPU time (user + system) used so far by the live processes of a process group (Linux /proc)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == group:  # pgrp
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def run_workers(n: int, args: list[str], cwd: Path, env: dict) -> float:
    """Start n workers at once; seconds until the last one exits (each must succeed)."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "step_4/train.py"), *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for _ in range(n)
    ]
    outputs = [proc.communicate()[0] for proc in procs]
    seconds = time.perf_counter() - started
    for proc, output in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise SystemExit(f"a worker failed:\n{output[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    """Time W workers on both set-ups; print the table and the speed-ups."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3], help="worker counts to time")
    parser.add_argument("--repeats", type=int, default=1, help="measurements of each (set-up, workers)")
    parser.add_argument("--n-images", type=int, default=240, help="stand-in size")
    parser.add_argument("--n-nested", type=int, default=2, help="inner folds of outer fold 0 to run")
    parser.add_argument("--n-trials", type=int, default=3, help="trials per fold")
    options = parser.parse_args(argv)
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError:
        raise SystemExit(
            "PostgreSQL does not answer: start it with `bash scripts/local_services.sh postgres`."
        ) from None

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir, split_file = root / "data", root / "dataset_splits.json"
        quiet = {"check": True, "capture_output": True}
        subprocess.run([sys.executable, str(REPO / "step_1/download_data.py"), "--synthetic", "--n-images",
                        str(options.n_images), "--data-dir", str(data_dir)], **quiet)  # fmt: skip
        subprocess.run([sys.executable, str(REPO / "step_4/make_dataset_splits.py"), "--data-dir", str(data_dir),
                        "--k-nested", str(max(3, options.n_nested)), "--output", str(split_file)], **quiet)  # fmt: skip
        args = [
            "--quick", "--data-dir", str(data_dir), "--split-file", str(split_file), "--num-workers", "0",
            "--num-threads", "1", "--n-root-splits", "1", "--n-nested-splits", str(options.n_nested),
            "--n-trials", str(options.n_trials),
        ]  # fmt: skip
        base_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        seconds: dict[tuple[str, int], list[float]] = {}
        server_cpu: dict[int, list[float]] = {}  # CPU seconds the tracking server used during the workers' run
        for repeat in range(options.repeats):
            for setup in ("postgres", "files"):
                for n in options.workers:
                    cwd = root / f"{setup}-{n}-{repeat}"
                    cwd.mkdir()
                    if setup == "files":
                        took = run_workers(n, args, cwd, base_env)
                    else:
                        server, url = start_server(new_database(admin), cwd)
                        try:
                            env = {**base_env, "MLFLOW_TRACKING_URI": url}
                            before = cpu_seconds(server.pid)
                            took = run_workers(n, [*args, "--storage", new_database(admin)], cwd, env)
                            server_cpu.setdefault(n, []).append(cpu_seconds(server.pid) - before)
                        finally:
                            os.killpg(server.pid, signal.SIGTERM)
                            server.wait()
                    seconds.setdefault((setup, n), []).append(took)
                    print(f"repeat {repeat}: {setup:8s} {n} worker(s) {took:6.1f} s", flush=True)

    print(
        f"\nstep 4 --quick, {options.n_images} images, folds 0/0..0/{options.n_nested - 1}, {options.n_trials} trials "
        f"each, --num-threads 1 per worker, {os.cpu_count()} cores: median seconds (speed-up against 1 worker)"
    )
    print(f"{'set-up':10s}" + "".join(f"{f'{n} worker(s)':>22s}" for n in options.workers))
    for setup in ("postgres", "files"):
        cells = []
        for n in options.workers:
            speedups = [one / many for one, many in zip(seconds[(setup, 1)], seconds[(setup, n)], strict=True)]
            cells.append(f"{statistics.median(seconds[(setup, n)]):7.1f} s ({statistics.median(speedups):.2f}x)")
        print(f"{setup:10s}" + "".join(f"{cell:>22s}" for cell in cells))
    for n in options.workers:
        print(
            f"tracking server CPU during the postgres run with {n} worker(s): {statistics.median(server_cpu[n]):.1f} s"
        )
    ratios = [f / p for f, p in zip(seconds[("files", 1)], seconds[("postgres", 1)], strict=True)]
    print(f"one worker, files / postgres time: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
