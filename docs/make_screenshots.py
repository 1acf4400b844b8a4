"""Make the README's screenshots of the MLflow UI (docs/img/*.png) from a real quick run on the stand-in.

Run from the repository root (needs headless Chromium; on Debian/Ubuntu, as root: `apt-get install -y chromium`):

    .venv/bin/python docs/make_screenshots.py          # ~15 min on 2 idle cores; rewrites docs/img/*.png
    .venv/bin/python docs/make_screenshots.py --keep   # also keep /tmp/reproai (the checkout, data, mlflow.db, mlruns/)
    .venv/bin/python docs/make_screenshots.py --reuse /tmp/reproai   # photograph a kept folder again, no training
    .venv/bin/python docs/make_screenshots.py --steps 4     # only step 4's runs and pictures (3 and 5 alike)

The runs record their command line and paths, so they are made where a learner would make them: in a fresh
folder with a neutral name (/tmp/reproai, or --work-dir; it must be new or empty) that is a checkout of this
repository, a local `git clone` of HEAD (its remote removed) with the working tree's files copied over it (git's
tracked and untracked-not-ignored files: the code as it is now; if that differs from HEAD, the runs record
git_dirty=true). There, with the checkout as working directory and the steps' README commands word for word,
relative paths and the default data/oxfordiii, it builds the default stand-in (`python step_1/download_data.py
--synthetic`) and the default split file, runs steps 2 to 5 at --quick size, registers step 5's best fold
(`python step_5/register.py`), and runs step 5 again with `--from-run` and one setting changed (MLflow's
default store, ./mlflow.db and ./mlruns/, lands there; MLFLOW_* variables are dropped), starts `mlflow ui` on a
free port and photographs these pages at 1600 x 1000 CSS pixels:

    step2_runs.png         the step_2 experiment's runs table: the root run expanded to its warmup/finetune runs
    step2_run.png          the step-2 root run's overview page (parameters, tags)
    step2_metrics.png      the metric charts of the step-2 finetune phase run (its model-metrics tab)
    step3_folds.png        the step_3 experiment's runs table: root run → fold runs, the first fold → phase runs
    step3_forest_plot.png  the step-3 root run's artifacts view with figures/forest_plot.png selected
    step4_trials.png       the step_4 experiment's runs table: root run → fold runs, the first fold → trials, refit
    step4_parallel.png     the first fold's trial runs compared: the parallel coordinates plot of their parameters
    step4_chosen.png       the step-4 root run's artifacts view with figures/chosen_hyperparameters.png selected
    step5_verdict.png      the step_5 experiment's runs table: the root run and its rerun, with overrides and verdict
    step5_report.png       the step-5 root run's artifacts view with analysis/reproducibility_report.md selected
    step5_model_version.png  the version of pets-cat-vs-dog that step_5/register.py made, with its lineage tags

Every UI link ends in `?workflowType=machine_learning`: without it MLflow 3.17 opens its GenAI view.
The two widest runs tables (step4_trials, step5_verdict) fold the sidebar away and set column widths, so that
every chosen column fits in the 1600 pixels.

Why not `chromium --headless --screenshot`: under its virtual time the metric charts never load, and the runs
table expands a parent run only from state kept in the browser's localStorage. So the script drives Chromium
through the DevTools protocol over a pipe (`--remote-debugging-pipe`, standard library only): it seeds
localStorage before each page loads (parent runs expanded, chosen columns, the MLflow Assistant panel closed),
waits until the page shows what it should (names of the runs read back through MLflow's client, drawn charts,
the loaded image) and the DOM stops changing, then captures the viewport.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WORK_DIR = Path("/tmp/reproai")  # a neutral name: MLflow shows the artifact location's absolute path
RETRIES = 3  # the training scripts may be mid-edit by someone else: wait and retry a failed command
RETRY_WAIT_S = 60
UI_START_TIMEOUT_S = 180  # `mlflow ui` imports a lot and migrates a new database on its first start
PAGE_TIMEOUT_S = 90  # per page, until it shows what it should; generous for a loaded 2-core machine
SETTLE_S = 1.0  # the DOM must stay unchanged this long (three samples) before the capture
WIDTH, HEIGHT = 1600, 1000  # viewport in CSS pixels: wide enough for the runs table's columns
METRIC_COLUMN_PX = 150  # a metric column this wide shows a float64 in full; the default width cuts it off
MAX_PNG_BYTES = 400_000  # above this, re-save with a 256-colour palette
ML_VIEW = "workflowType=machine_learning"  # else MLflow 3.17 opens the experiment's GenAI view
MODEL = "pets-cat-vs-dog"  # step_5/register.py's registered model

# localStorage that every page starts with: the MLflow Assistant panel would otherwise open on the first visit
# and cover a third of the page (keys of the UI's useLocalStorage hook: "<key>_v<version>", JSON values).
BASE_STORAGE = {"mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true", "mlflow.assistant.panelOpen_v1": "false"}
COLLAPSE_SIDEBAR = "document.querySelector('[aria-label=\"Toggle sidebar\"]').click()"  # room for a wide table
HIDE_CHART_TOOLBARS = (  # plotly's toolbars, which headless Chromium shows over every chart as if hovered
    "addEventListener('DOMContentLoaded', () => { const s = document.createElement('style');"
    " s.textContent = '.modebar-container { display: none !important; }'; document.head.appendChild(s); });"
)


def find_chromium() -> str:
    """Path of a Chromium/Chrome executable, or exit with how to install one."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    sys.exit("make_screenshots.py needs headless Chromium: install it with `apt-get install -y chromium` (as root).")


def default_store_env() -> dict[str, str]:
    """This environment without MLFLOW_* variables: MLflow then uses its default store in the working directory."""
    return {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}


def git_in(where: Path, *args: str) -> str:
    """Output of a git command run in `where`, or exit with git's message."""
    try:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=True).stdout
    except OSError as error:
        sys.exit(f"make_screenshots.py needs git, to make the checkout the runs are made in: {error}")
    except subprocess.CalledProcessError as error:
        sys.exit(f"`git {' '.join(args)}` failed in {where}: {error.stderr.strip()}")


def make_checkout(work: Path) -> None:
    """Make `work` a learner's checkout of this repository with the code as it is now: a clone of HEAD with the
    working tree copied over it."""
    git_in(REPO, "clone", "--quiet", "--no-hardlinks", str(REPO), str(work))
    git_in(work, "remote", "remove", "origin")  # else MLflow records this machine's path as the repository URL
    copy_working_tree(work)
    if changed := git_in(work, "status", "--porcelain").splitlines():
        print(
            f"  the working tree differs from HEAD in {len(changed)} file(s): the runs record git_dirty=true"
            " (commit first for screenshots of a clean checkout)",
            flush=True,
        )


def copy_working_tree(work: Path) -> None:
    """Copy this checkout's tracked and untracked-not-ignored files into the checkout `work`, and delete there the
    tracked files that are gone here."""
    files = {name for name in git_in(REPO, "ls-files", "-z", "-co", "--exclude-standard").split("\0") if name}
    present = {name for name in files if (REPO / name).is_file()}
    for name in set(git_in(work, "ls-files", "-z").split("\0")) - present - {""}:
        (work / name).unlink(missing_ok=True)
    for name in sorted(present):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, work / name)


def run_script(script: str, args: list[str], cwd: Path) -> None:
    """Run one of the repository's scripts as its README does, `python step_N/x.py ...` in the checkout `cwd`
    (this Python, the script's path relative: train.py records sys.argv); retry a failure (a concurrent edit)."""
    command = [sys.executable, script, *args]
    for attempt in range(1, RETRIES + 1):
        print(f"$ python {script} {' '.join(args)}".rstrip(), flush=True)
        started = time.perf_counter()
        result = subprocess.run(command, cwd=cwd, env=default_store_env(), capture_output=True, text=True)
        if result.returncode == 0:
            print(f"  ok in {time.perf_counter() - started:.0f} s", flush=True)
            return
        print(result.stdout[-2000:] + result.stderr[-3000:], file=sys.stderr)
        if attempt < RETRIES:
            print(
                f"  failed (exit {result.returncode}); retrying in {RETRY_WAIT_S} s with the code as it is then",
                flush=True,
            )
            time.sleep(RETRY_WAIT_S)
            copy_working_tree(cwd)  # the failure may have been someone's edit in progress here
    sys.exit(f"{script} failed {RETRIES} times (exit {result.returncode}); see its output above.")


def make_runs(work: Path, steps: list[int]) -> None:
    """Build the stand-in and run the steps at --quick size in the checkout `work`, with the READMEs' commands."""
    run_script("step_1/download_data.py", ["--synthetic"], work)  # the default stand-in in data/oxfordiii
    if 2 in steps:
        run_script("step_2/train.py", ["--quick"], work)
        run_script("step_2/analyze_predictions.py", [], work)
    if any(step >= 3 for step in steps):
        run_script("step_3/make_dataset_splits.py", [], work)  # 10 x 10 folds; --quick runs the first 2 x 2
    for step in (step for step in steps if step >= 3):
        run_script(f"step_{step}/train.py", ["--quick"], work)
        run_script(f"step_{step}/analyze_predictions.py", [], work)
    if 5 in steps:  # register its best fold's model; run the root run again with one setting changed (a verdict)
        run_script("step_5/register.py", [], work)
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
        _, root, _ = root_and_folds(client, 5)
        change = ["--set", "cv.root_split=0", "--set", "cv.nested_split=0", "--set", "training.finetune_epochs=1"]
        run_script("step_5/train.py", ["--from-run", root.info.run_id, *change], work)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(work: Path, port: int) -> subprocess.Popen:
    """Start `mlflow ui` on the store in `work` and wait until it answers."""
    with (work / "mlflow_ui.log").open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port)],
            cwd=work,
            env=default_store_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so that stop_ui also stops its workers
        )
    deadline = time.monotonic() + UI_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"`mlflow ui` exited with {server.returncode}; see {work / 'mlflow_ui.log'} (run with --keep).")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    stop_ui(server)
    sys.exit(f"`mlflow ui` did not answer in {UI_START_TIMEOUT_S} s; see {work / 'mlflow_ui.log'} (run with --keep).")


def stop_ui(server: subprocess.Popen) -> None:
    """Stop the `mlflow ui` process group that start_ui started."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def newest(client: mlflow.MlflowClient, experiment_id: str, filter_string: str, what: str) -> mlflow.entities.Run:
    """The newest run matching `filter_string`, or exit naming what was missing."""
    runs = client.search_runs([experiment_id], filter_string, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        sys.exit(f"found no {what} in the temporary MLflow store; did the training scripts change their run tree?")
    return runs[0]


def experiment_id(client: mlflow.MlflowClient, step: int) -> str:
    """The id of a step's experiment, or exit saying it is missing."""
    experiment = client.get_experiment_by_name(f"step_{step}")
    if experiment is None:
        sys.exit(f"found no experiment 'step_{step}' in the temporary MLflow store.")
    return experiment.experiment_id


def children(client: mlflow.MlflowClient, run: mlflow.entities.Run) -> list[mlflow.entities.Run]:
    """The child runs of `run`, oldest first."""
    return client.search_runs(
        [run.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )


def table_storage(
    experiment_id: str, expanded: list[str], columns: list[str], widths: dict[str, int] | None = None
) -> dict[str, str]:
    """localStorage that makes the runs table of `experiment_id` open with `expanded` runs and `columns` shown.

    The UI keeps this view state per experiment under MLflowLocalStorage-1.1-ExperimentPage-["<id>"]-...;
    column keys are "<attributes|metrics|params|tags>.`<name>`". Metric columns get room for full values, and
    `widths` (CSS pixels) sets others; the rest are 100 pixels wide.
    """
    widths = {column: METRIC_COLUMN_PX for column in columns if column.startswith("metrics.")} | (widths or {})
    state = {
        "runsExpanded": dict.fromkeys(expanded, True),
        "selectedColumns": columns,
        "columnOrder": ["duration", *columns],
        "columnWidths": widths,
    }
    return {f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState': json.dumps(state)}


def js_has_texts(texts: list[str]) -> str:
    """A JavaScript expression: the page's visible text contains every one of `texts`."""
    return f"{json.dumps(texts)}.every(t => document.body.innerText.includes(t))"


@dataclass
class Page:
    """One screenshot: file name, URL path after the hash, when it is ready, localStorage to start with."""

    name: str
    path: str
    ready: str  # a JavaScript expression that is true once the page shows what the screenshot is for
    storage: dict[str, str] = field(default_factory=dict)
    height: int = HEIGHT
    then: str = ""  # JavaScript to run once the page is ready, before it settles (COLLAPSE_SIDEBAR)


def plan_pages(client: mlflow.MlflowClient, steps: list[int]) -> list[Page]:
    """The pages of the chosen steps, with ids and run names read back through MLflow's client."""
    pages = {2: step2_pages, 3: step3_pages, 4: step4_pages, 5: step5_pages}
    return [page for step in steps for page in pages[step](client)]


def step2_pages(client: mlflow.MlflowClient) -> list[Page]:
    """Step 2's runs table, root run and metric charts."""
    exp = experiment_id(client, 2)
    root = newest(client, exp, "tags.run_level = 'root'", "step-2 root run")
    phases = children(client, root)
    finetune = next((run for run in phases if run.data.tags.get("phase") == "finetune"), None)
    if finetune is None:
        sys.exit("the step-2 root run has no child run tagged phase=finetune; did step_2/train.py change its runs?")
    columns = ["tags.`run_level`", "tags.`phase`", "metrics.`dev_roc_auc`", "metrics.`test_roc_auc`"]
    pages = [
        Page(
            "step2_runs.png",
            f"/experiments/{exp}/runs",
            js_has_texts([run.info.run_name for run in [root, *phases]]),
            table_storage(exp, [root.info.run_id], [*columns, "attributes.`Models`"]),
        ),
        Page(
            "step2_run.png",
            f"/experiments/{exp}/runs/{root.info.run_id}",
            js_has_texts([root.info.run_id, "run_level"]),
        ),
        Page(
            "step2_metrics.png",
            f"/experiments/{exp}/runs/{finetune.info.run_id}/model-metrics",
            "[...document.querySelectorAll('.js-plotly-plot')].filter(p => p.querySelector('.scatterlayer .trace'))"
            f".length >= {len(finetune.data.metrics)}",  # one drawn chart per metric
            height=1080,  # room for a second row of charts
        ),
    ]
    return pages


def root_and_folds(client: mlflow.MlflowClient, step: int) -> tuple[str, mlflow.entities.Run, list]:
    """A cross-validation step's experiment id, its newest root run and that run's fold runs."""
    exp = experiment_id(client, step)
    root = newest(client, exp, "tags.run_level = 'root'", f"step-{step} root run")
    folds = children(client, root)
    if not folds:
        sys.exit(f"the step-{step} root run has no child (fold) runs; did step_{step}/train.py change its run tree?")
    return exp, root, folds


def figure_page(name: str, exp: str, root: mlflow.entities.Run, figure: str) -> Page:
    """The root run's artifacts view with one of its figures selected."""
    return Page(
        name,
        f"/experiments/{exp}/runs/{root.info.run_id}/artifacts/figures/{figure}",
        "[...document.images].some(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0)"
        f" && document.body.innerText.includes('{figure}')",
    )


def folds_table_page(
    client: mlflow.MlflowClient,
    name: str,
    exp: str,
    root: mlflow.entities.Run,
    folds: list,
    columns: list[str],
    widths: dict[str, int] | None = None,
    then: str = "",
) -> Page:
    """The runs table with the root run and its first fold expanded (that fold's child runs shown)."""
    shown = [root, *folds, *children(client, folds[0])]
    return Page(
        name,
        f"/experiments/{exp}/runs",
        js_has_texts([run.info.run_name for run in shown]),
        table_storage(exp, [root.info.run_id, folds[0].info.run_id], columns, widths),
        then=then,
    )


def step3_pages(client: mlflow.MlflowClient) -> list[Page]:
    """Step 3's runs table with the folds, and the forest plot."""
    exp, root, folds = root_and_folds(client, 3)
    columns = ["tags.`run_level`", "tags.`root_split_id`", "tags.`nested_split_id`", "tags.`phase`"]
    columns += ["metrics.`dev_roc_auc`", "metrics.`test_roc_auc`", "attributes.`Models`"]
    return [
        folds_table_page(client, "step3_folds.png", exp, root, folds, columns),
        figure_page("step3_forest_plot.png", exp, root, "forest_plot.png"),
    ]


def step4_pages(client: mlflow.MlflowClient) -> list[Page]:
    """Step 4's runs table with a fold's trials, the trials' parallel coordinates, the chosen values."""
    exp, root, folds = root_and_folds(client, 4)
    trials = [run for run in children(client, folds[0]) if run.data.tags.get("run_level") == "trial"]
    # the fold runs' names say their split ids; the sidebar folds away: room for three searched values in full
    columns = ["tags.`run_level`", "tags.`trial_state`", "metrics.`dev_roc_auc`", "metrics.`test_roc_auc`"]
    columns += ["tags.`refit_check`", "params.`head_hidden`", "params.`dropout`", "params.`finetune_lr`"]
    widths = {"tags.`run_level`": 80, "tags.`trial_state`": 90, "tags.`refit_check`": 90}
    widths |= {"params.`head_hidden`": 90, "params.`dropout`": 160, "params.`finetune_lr`": 175}
    ids = json.dumps([run.info.run_id for run in trials], separators=(",", ":"))
    return [
        folds_table_page(client, "step4_trials.png", exp, root, folds, columns, widths, COLLAPSE_SIDEBAR),
        Page(
            "step4_parallel.png",
            f"/compare-runs?runs={ids}&experiments={json.dumps([exp])}",
            "[...document.querySelectorAll('.js-plotly-plot')].some(p => p.querySelector('.parcoords'))",
        ),
        figure_page("step4_chosen.png", exp, root, "chosen_hyperparameters.png"),
    ]


def step5_pages(client: mlflow.MlflowClient) -> list[Page]:
    """Step 5's runs table with the original root run and its rerun, and the reproducibility report."""
    exp = experiment_id(client, 5)
    rerun = newest(client, exp, "tags.run_level = 'root' AND tags.reproduces != ''", "step-5 rerun (--from-run)")
    original = client.get_run(rerun.data.tags["reproduces"])
    version = client.get_model_version_by_alias(MODEL, "candidate")  # register.py made it from the original
    columns = ["tags.`run_level`", "tags.`reproduces`", "tags.`config_overrides`", "tags.`reproduction_verdict`"]
    columns += ["metrics.`dev_roc_auc`", "metrics.`test_roc_auc`", "params.`training.finetune_epochs`"]
    widths = {"tags.`run_level`": 80, "tags.`reproduces`": 110, "tags.`config_overrides`": 210}
    widths |= {"tags.`reproduction_verdict`": 140, "params.`training.finetune_epochs`": 160}  # whole headers
    shown = [original, rerun, *children(client, original), *children(client, rerun)]
    return [
        Page(
            "step5_verdict.png",
            f"/experiments/{exp}/runs",
            js_has_texts([run.info.run_name for run in shown]),
            table_storage(exp, [original.info.run_id, rerun.info.run_id], columns, widths),
            then=COLLAPSE_SIDEBAR,
        ),
        Page(
            "step5_report.png",
            f"/experiments/{exp}/runs/{original.info.run_id}/artifacts/analysis/reproducibility_report.md",
            "document.body.innerText.includes('For a person to fill in')",
        ),
        Page(
            "step5_model_version.png",
            f"/models/{MODEL}/versions/{version.version}",
            js_has_texts(["root_run_id", "dataset_digest", version.tags["root_run_id"]]),
        ),
    ]


class Browser:
    """Headless Chromium driven through the DevTools protocol over a pipe: JSON messages ending in NUL bytes."""

    def __init__(self, chromium: str, log: Path) -> None:
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")  # a fresh profile: nothing remembered
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()

        def use_fds_3_and_4() -> None:  # --remote-debugging-pipe reads commands on fd 3 and writes on fd 4
            read, write = fcntl.fcntl(to_chrome, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome, fcntl.F_DUPFD, 10)
            os.dup2(read, 3)
            os.dup2(write, 4)

        with log.open("a") as log_file:
            self.process = subprocess.Popen(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={self.profile}",
                    f"--window-size={WIDTH},{HEIGHT}",
                    "--hide-scrollbars",
                    "--remote-debugging-pipe",
                    "about:blank",
                ],
                stdout=log_file,
                stderr=log_file,
                preexec_fn=use_fds_3_and_4,
                close_fds=False,  # keep fds 3 and 4; every other descriptor here is close-on-exec
            )
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._last_id, self.session = b"", 0, None
        try:
            targets = self.call("Target.getTargets")["targetInfos"]
            page = next((target for target in targets if target["type"] == "page"), None)
            if page is None:
                raise RuntimeError("chromium opened no page")
            self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        except BaseException:
            self.close()
            raise

    def call(self, method: str, timeout_s: float = 60, **params) -> dict:
        """Send one command (to the page once attached) and return its result; events are skipped."""
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\0" not in self._buffer:
                if not select.select([self._in], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"chromium did not answer {method} in {timeout_s} s")
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium exited")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"chromium: {method} failed: {reply['error'].get('message')}")
                return reply["result"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (None if it throws)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return None if "exceptionDetails" in result else result["result"].get("value")

    def photograph(self, url: str, out: Path, storage: dict[str, str], ready: str, height: int, then: str) -> bool:
        """Open `url` with `storage` in localStorage, wait until `ready` holds, run `then`, let the DOM settle and
        save a PNG.

        Returns whether the page became ready in PAGE_TIMEOUT_S (the PNG is written either way, to look at).
        """
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1, mobile=False)
        seed = "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in storage.items())
        self.call("Page.enable")
        self.call("Page.addScriptToEvaluateOnNewDocument", source=seed + HIDE_CHART_TOOLBARS)
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        while not (is_ready := bool(self.evaluate(ready))) and time.monotonic() < deadline:
            time.sleep(0.5)
        if is_ready and then:
            self.evaluate(then)
        samples: list[int] = []
        while is_ready and time.monotonic() < deadline and (len(samples) < 3 or len(set(samples[-3:])) > 1):
            time.sleep(SETTLE_S / 2)
            samples.append(self.evaluate("document.body.innerHTML.length"))
        png = self.call("Page.captureScreenshot", format="png")["data"]
        out.write_bytes(base64.b64decode(png))
        return is_ready

    def close(self) -> None:
        """Close Chromium and remove its profile."""
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.call("Browser.close", timeout_s=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._in)
        os.close(self._out)
        shutil.rmtree(self.profile, ignore_errors=True)


def shrink_png(path: Path) -> None:
    """Re-save `path` optimised, and with a 256-colour palette if it is still above MAX_PNG_BYTES."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    image.save(path, optimize=True)
    if path.stat().st_size > MAX_PNG_BYTES:
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
    """Run the quick steps in a fresh checkout, start `mlflow ui` there and photograph its pages."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "img", help="where the PNG files go")
    parser.add_argument(
        "--work-dir", type=Path, default=WORK_DIR, help="the new or empty folder the runs are made in (a checkout)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    parser.add_argument(
        "--reuse", type=Path, metavar="DIR", help="a work folder kept by --keep: skip the runs, photograph it again"
    )
    parser.add_argument("--steps", type=int, nargs="+", choices=[2, 3, 4, 5], default=[2, 3, 4, 5], help="which steps")
    args = parser.parse_args(argv)
    if args.reuse and not (args.reuse / "mlflow.db").is_file():
        sys.exit(f"--reuse {args.reuse}: no mlflow.db there; give a directory that --keep printed.")

    work = (args.reuse or args.work_dir).resolve()
    if not args.reuse and work.exists() and (not work.is_dir() or any(work.iterdir())):
        sys.exit(
            f"{work} already exists and is not empty: remove it, photograph it again with --reuse {work},"
            " or give another --work-dir."
        )

    chromium = find_chromium()
    started = time.perf_counter()
    print(f"Working in {work}", flush=True)
    server, written, not_ready = None, [], []
    try:
        if not args.reuse:
            make_checkout(work)
            make_runs(work, args.steps)
        pages = plan_pages(mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}"), args.steps)
        port = free_port()
        print(f"Starting mlflow ui on http://127.0.0.1:{port}", flush=True)
        server = start_ui(work, port)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for page in pages:
            url = f"http://127.0.0.1:{port}/#{page.path}{'&' if '?' in page.path else '?'}{ML_VIEW}"
            out = args.out_dir / page.name
            print(f"  {page.name} <- {url}", flush=True)
            try:
                browser = Browser(chromium, work / "chromium.log")
                try:
                    if not browser.photograph(
                        url, out, BASE_STORAGE | page.storage, page.ready, page.height, page.then
                    ):
                        not_ready.append(page.name)
                finally:
                    browser.close()
            except (OSError, RuntimeError, TimeoutError) as error:
                sys.exit(f"chromium failed on {page.name}: {error}; see {work / 'chromium.log'} (run with --keep).")
            shrink_png(out)
            written.append(out)
    finally:
        if server is not None:
            stop_ui(server)
        if args.keep or args.reuse:
            print(f"Kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"Done in {time.perf_counter() - started:.0f} s. Wrote:")
    for path in written:
        print(f"  {path.relative_to(REPO) if path.is_relative_to(REPO) else path}  ({path.stat().st_size // 1000} kB)")
    if not_ready:
        sys.exit(f"{', '.join(not_ready)} did not show what it should within {PAGE_TIMEOUT_S} s: look at the file(s).")


if __name__ == "__main__":
    main()
