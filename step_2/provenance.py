"""Provenance: what a run needs on record so that someone else can redo it and trust it.

The code (git commit, dirty flag, uncommitted diff, a digest of the step's Python files), the command line, the
software (Python, torch, CUDA, every installed distribution), the hardware (device, CPU model, threads) and the
data (a SHA-256 digest of the image and annotation files actually used). `log_provenance` puts all of it on the
active MLflow run; `log_image_lists` records which images each part of a training actually read, and
`nondeterminism_reported` records the ops that had no deterministic kernel (such a run is not bit-for-bit
reproducible)."""

from __future__ import annotations

import hashlib
import platform
import shlex
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import distributions
from pathlib import Path

import mlflow
import pandas as pd
import torch
import torchvision
from mlflow.data.sources import LocalArtifactDatasetSource

DIGEST_PREFIX = 32  # mlflow.log_input keeps at most 36 characters of a digest; the full one goes in a tag


def git(*args: str, cwd: Path) -> str | None:
    """Output of a git command run in cwd, or None outside a checkout (or without git)."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout


def git_state(code_dir: Path) -> dict[str, str]:
    """Commit, dirty flag and uncommitted diff (tracked files) of the checkout that holds code_dir."""
    commit = git("rev-parse", "HEAD", cwd=code_dir)
    if commit is None:
        return {"commit": "unknown (not a git checkout)", "dirty": "unknown", "diff": ""}
    diff = git("diff", "HEAD", "--no-color", cwd=code_dir) or ""
    untracked = git("ls-files", "--others", "--exclude-standard", cwd=code_dir) or ""
    return {
        "commit": commit.strip(),
        "dirty": str(bool(diff or untracked)).lower(),
        "diff": diff,
        "untracked": untracked,
    }


def code_digest(code_dir: Path) -> str:
    """SHA-256 over the names and bytes of the Python files in code_dir: the code that runs, committed or not (a
    commit that changes only the docs keeps it; an edit that is not committed changes it)."""
    digest = hashlib.sha256()
    for path in sorted(code_dir.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cpu_model() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def software_and_hardware(device: torch.device) -> dict[str, str]:
    """Versions and machine facts that change results bit for bit."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "torch_threads": str(torch.get_num_threads()),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def installed_distributions() -> str:
    """Every installed distribution as `name==version`, one per line (importlib.metadata: no pip needed)."""
    return "\n".join(sorted({f"{d.metadata['Name']}=={d.version}" for d in distributions()}, key=str.lower)) + "\n"


def dataset_digest(folder: Path, image_paths: list[Path]) -> str:
    """SHA-256 over the names and bytes of the annotation files and of the images used, in a fixed order."""
    files = sorted((folder / "annotations").glob("*.txt")) + sorted(image_paths)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def log_provenance(
    code_dir: Path,
    device: torch.device,
    folder: Path,
    image_paths: list[Path],
    is_standin: bool,
    digest: str | None = None,
) -> str:
    """Put code, command, software, hardware and data provenance on the active run; return the data digest.

    `digest`: the data digest when the caller has just computed it (from step 3 on, loading the split file does).
    """
    state = git_state(code_dir)
    digest = digest or dataset_digest(folder, image_paths)
    mlflow.set_tags(
        {
            "git_commit": state["commit"],
            "git_dirty": state["dirty"],
            "code_digest": code_digest(code_dir),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "dataset_digest": digest,
            "dataset_synthetic": str(is_standin).lower(),
            **{f"env.{key}": value for key, value in software_and_hardware(device).items()},
        }
    )
    if state["diff"]:
        mlflow.log_text(state["diff"], "provenance/uncommitted.diff")
    if state.get("untracked"):
        mlflow.log_text(state["untracked"], "provenance/untracked_files.txt")
    mlflow.log_text(installed_distributions(), "provenance/installed_distributions.txt")
    files = pd.DataFrame({"file": [p.relative_to(folder).as_posix() for p in image_paths]})
    source = "synthetic stand-in" if is_standin else "Oxford-IIIT Pet"
    mlflow.log_input(
        mlflow.data.from_pandas(
            files, source=LocalArtifactDatasetSource(str(folder.resolve())), name=source, digest=digest[:DIGEST_PREFIX]
        ),
        context="training",
    )
    return digest


def log_image_lists(parts: dict[str, list[Path]]) -> None:
    """The images each part (warm-up, train, dev, test) really read, as `data/images.json` and a digest tag each.

    Taken from the DataLoaders themselves, so a leak in the code that builds them shows up here."""
    names = {part: [f"{p.parent.name}/{p.name}" for p in paths] for part, paths in parts.items()}
    mlflow.log_dict(names, "data/images.json")
    mlflow.set_tags(
        {
            f"images_digest.{part}": hashlib.sha256("\n".join(files).encode()).hexdigest()
            for part, files in names.items()
        }
    )


@contextmanager
def nondeterminism_reported(device: torch.device) -> Iterator[None]:
    """Collect PyTorch's warnings about ops with no deterministic kernel; say which and tag the active run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=".*does not have a deterministic implementation.*")
        yield
    ops = sorted(
        {str(w.message).split(" does not")[0] for w in caught if "deterministic implementation" in str(w.message)}
    )
    if ops:
        print(
            f"Not bit-for-bit reproducible on {device}: no deterministic kernel for {', '.join(ops)}", file=sys.stderr
        )
        mlflow.set_tag("nondeterministic_ops", ", ".join(ops))
