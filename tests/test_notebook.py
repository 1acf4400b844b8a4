"""run_on_colab.ipynb: runs the tutorial headless outside Colab (quick mode, a small stand-in, a few steps) and
installs nothing there, stops when a script fails, builds the right Colab-only commands, and is committed clean."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
import tempfile
import types
import urllib.error
import urllib.request
from pathlib import Path

import click
import mlflow
import nbformat
import pytest
from conftest import REPO
from mlflow.cli import cli as mlflow_cli
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK = REPO / "run_on_colab.ipynb"
# The steps the headless run asks for; those whose folder exists run (about 10-30 s each on 2 busy cores). The cells
# of steps 3 to 5 are run with recorded commands (test_colab_cells_build_the_right_commands).
NOTEBOOK_STEPS = "1,2"
N_IMAGES = 120  # stand-in size for the headless runs
REPO_URL = "https://github.com/reproai/reproai.git"  # what the notebook clones on Colab (and the badge points to)
PY = sys.executable  # the kernel runs this interpreter, so the notebook's commands start with it


def copy_checkout(dest: Path) -> Path:
    """What a fresh clone holds (step folders, scripts, requirements, the notebook): no data, runs or results."""
    for folder in [*sorted(REPO.glob("step_*")), REPO / "scripts"]:
        shutil.copytree(folder, dest / folder.name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("requirements.txt", "requirements-dev.txt", "requirements.lock", NOTEBOOK.name):
        shutil.copy2(REPO / name, dest / name)
    return dest


def cell(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    """The one code cell with this tag."""
    (found,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return found


def stream_text(nb: nbformat.NotebookNode) -> str:
    """Everything the executed cells printed."""
    return "".join(out.get("text", "") for c in nb.cells if c.cell_type == "code" for out in c.outputs)


@pytest.fixture
def headless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run a notebook in a fresh kernel of this interpreter, with the REPROAI_* choices set in its environment."""
    kernel_dir = tmp_path / "jupyter" / "kernels" / "python3"  # shadows any other "python3" kernel spec
    kernel_dir.mkdir(parents=True)
    argv = [PY, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kernel_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the runs belong in the copy's mlflow.db

    def execute(nb: nbformat.NotebookNode, checkout: Path, steps: str) -> None:
        monkeypatch.setenv("REPROAI_MODE", "quick")
        monkeypatch.setenv("REPROAI_STEPS", steps)
        monkeypatch.setenv("REPROAI_N_IMAGES", str(N_IMAGES))
        client = NotebookClient(nb, kernel_name="python3", timeout=900, resources={"metadata": {"path": str(checkout)}})
        client.execute()

    return execute


def test_notebook_runs_the_quickstart_commands_headless(tmp_path, headless):
    checkout = copy_checkout(tmp_path / "reproai")
    nb = nbformat.read(checkout / NOTEBOOK.name, as_version=4)
    headless(nb, checkout, NOTEBOOK_STEPS)

    text = stream_text(nb)
    assert "Not on Colab: using the checkout in" in text and "installing nothing" in text
    chosen = [int(step) for step in NOTEBOOK_STEPS.split(",")]
    present = [step for step in chosen if (checkout / f"step_{step}").is_dir()]
    expected = [f"$ {PY} step_1/download_data.py --synthetic --n-images {N_IMAGES}"]
    for step in present:  # the quickstart's commands (scripts/tutorial.sh), with the kernel's interpreter
        if (checkout / f"step_{step}" / "make_dataset_splits.py").is_file():
            expected.append(f"$ {PY} step_{step}/make_dataset_splits.py")
        expected += [f"$ {PY} step_{step}/train.py --quick", f"$ {PY} step_{step}/analyze_predictions.py"]
    assert [line for line in re.split(r"[\r\n]", text) if line.startswith("$ ")] == expected  # no git, no pip
    for step in set(chosen) - set(present):
        assert f"step_{step}/ is not in this version of the repository" in text
    print("\n".join(line for line in text.splitlines() if re.match(r"(Step \d done|Data ready) in", line)))

    if 1 in present:
        assert (checkout / "results/step_1/test_predictions.csv").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{checkout}/mlflow.db")
    for step in (step for step in present if step >= 2):
        experiment = client.get_experiment_by_name(f"step_{step}")
        assert experiment is not None, f"no MLflow experiment step_{step} in {checkout}/mlflow.db"
        runs = client.search_runs([experiment.experiment_id])
        assert runs and all(run.info.status == "FINISHED" for run in runs)
    assert "mlflow ui" in text and "http://127.0.0.1:5000" in text  # the command to run, not a server


def test_a_failing_script_stops_the_notebook(tmp_path, headless):
    checkout = copy_checkout(tmp_path / "reproai")
    (checkout / "step_1/download_data.py").write_text("import sys\nprint('failing on purpose')\nsys.exit(3)\n")
    nb = nbformat.read(checkout / NOTEBOOK.name, as_version=4)
    with pytest.raises(CellExecutionError, match="exit status 3"):
        headless(nb, checkout, "1")
    assert "failing on purpose" in stream_text(nb)  # its output was streamed before the error
    assert cell(nb, "data").execution_count is not None and cell(nb, "step-1").execution_count is None


@pytest.fixture
def colab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A fake Colab: google.colab is importable, commands are recorded instead of run, and `git clone` makes a
    copy of this checkout. The working directory is an empty folder, like Colab's /content."""
    seen: dict = {"commands": [], "requirements": [], "windows": []}
    output = types.ModuleType("google.colab.output")
    output.serve_kernel_port_as_window = lambda port, **kwargs: seen["windows"].append(port)
    colab_module = types.ModuleType("google.colab")
    colab_module.output = output
    monkeypatch.setitem(sys.modules, "google.colab", colab_module)
    monkeypatch.setitem(sys.modules, "google.colab.output", output)

    class RecordingPopen:
        def __init__(self, cmd: list[str], **kwargs) -> None:
            seen["commands"].append(list(cmd))
            if cmd[:2] == ["git", "clone"]:
                copy_checkout(Path(cmd[-1]))
            if "-r" in cmd:  # read the requirements file pip is given before the notebook could remove it
                seen["requirements"].append(Path(cmd[cmd.index("-r") + 1]).read_text())
            self.returncode, self.stdout = 0, io.BytesIO(b"")

        def __enter__(self) -> RecordingPopen:
            return self

        def __exit__(self, *exc_info) -> None:
            return None

        def poll(self) -> None:
            return None

    def urlopen(url: str, timeout: float = 0):
        """The MLflow UI answers once its command was started."""
        if any(cmd[2:4] == ["mlflow", "ui"] for cmd in seen["commands"]):
            return contextlib.nullcontext()
        raise urllib.error.URLError("connection refused")

    monkeypatch.setattr("subprocess.Popen", RecordingPopen)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    for name in ("REPROAI_MODE", "REPROAI_STEPS", "REPROAI_N_IMAGES"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the notebook's temporary files go here
    monkeypatch.chdir(tmp_path)
    return seen


def test_colab_cells_build_the_right_commands(tmp_path, colab, capsys):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    ns: dict = {}
    for tag in ("parameters", "helpers", "setup"):
        exec(cell(nb, tag).source, ns)
    assert (ns["MODE"], ns["STEPS"], ns["N_IMAGES"], ns["REPO_URL"]) == ("quick", [1, 2, 3, 4, 5], None, REPO_URL)
    assert ns["ON_COLAB"] and ns["PY"] == PY

    clone = tmp_path / "reproai"
    (git, pip) = colab["commands"]
    assert git == ["git", "clone", "--depth", "1", REPO_URL, str(clone)] and Path.cwd() == clone
    assert pip[:4] == [PY, "-m", "pip", "install"]
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    colab_own = [line for line in requirements if re.match(r"(torch|torchvision)\s*[=<>~!]", line)]
    assert len(colab_own) == 2  # the real file pins both, so the next line checks that they are dropped
    assert colab["requirements"] == ["".join(f"{line}\n" for line in requirements if line not in colab_own)]
    exec(cell(nb, "setup").source, ns)  # Run all again: the clone is reused
    assert [cmd[:4] for cmd in colab["commands"][2:]] == [[PY, "-m", "pip", "install"]] and Path.cwd() == clone

    colab["commands"].clear()
    ns["MODE"] = "full"
    exec(cell(nb, "data").source, ns)
    exec(cell(nb, "step-1").source, ns)
    (clone / "data/oxfordiii/oxford-iiit-pet").mkdir(parents=True)
    (clone / "data/oxfordiii/oxford-iiit-pet/SYNTHETIC.json").write_text("{}")  # a stand-in from quick mode
    exec(cell(nb, "data").source, ns)
    ns["MODE"] = "quick"
    exec(cell(nb, "data").source, ns)
    assert colab["commands"] == [
        [PY, "step_1/download_data.py"],
        [PY, "step_1/train.py"],
        [PY, "step_1/analyze_predictions.py"],
        [PY, "step_1/download_data.py", "--force"],
        [PY, "step_1/download_data.py", "--synthetic"],
    ]

    for step in (3, 4, 5):  # the headless run stops at step 2 (time); these cells run the README's commands
        colab["commands"].clear()
        ns["STEPS"] = [step]
        exec(cell(nb, f"step-{step}").source, ns)
        assert colab["commands"] == [
            [PY, f"step_{step}/make_dataset_splits.py"],
            [PY, f"step_{step}/train.py", "--quick"],
            [PY, f"step_{step}/analyze_predictions.py"],
        ]

    colab["commands"].clear()
    ns["STEPS"] = [1]
    exec(cell(nb, "step-2").source, ns)
    shutil.rmtree(clone / "step_1")
    exec(cell(nb, "step-1").source, ns)
    assert colab["commands"] == []
    out = capsys.readouterr().out
    assert "Step 2 is not in STEPS: skipped." in out and "step_1/ is not in this version of the repository" in out

    (clone / "mlflow.db").touch()
    exec(cell(nb, "mlflow-ui").source, ns)
    (ui,) = colab["commands"]
    assert ui[:4] == [PY, "-m", "mlflow", "ui"]
    options = dict(zip(ui[4::2], ui[5::2], strict=True))
    assert options == {
        "--backend-store-uri": "sqlite:///mlflow.db",
        "--port": "5000",
        "--allowed-hosts": "*",  # the proxy's Host header is not localhost
        "--cors-allowed-origins": "*",  # the page's Origin is the proxy's: without this MLflow 3 answers 403
        "--x-frame-options": "NONE",
    }
    server = mlflow_cli.get_command(click.Context(mlflow_cli), "ui")
    assert set(options) <= {opt for param in server.params for opt in param.opts}  # the installed MLflow has them
    assert colab["windows"] == [5000]


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    badge = "https://colab.research.google.com/github/reproai/reproai/blob/main/run_on_colab.ipynb"
    assert nb.cells[0].cell_type == "markdown" and badge in nb.cells[0].source
