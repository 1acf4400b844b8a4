"""Provenance: what a run needs on record so that someone else can redo it and trust it.

The code (git commit, dirty flag, uncommitted diff, a digest of the step's Python files), the command line, the
software (Python, torch, CUDA, MKL, oneDNN, every installed distribution), the hardware (device, the CPU's vendor,
family, model, stepping and instruction sets, threads), the CPU code paths in force (`pin_code_paths` sets them) and
the data (a SHA-256 digest of the image and annotation files actually used). `log_provenance` puts all of it on the
active MLflow run; `log_image_lists` records which images each part of a training actually read, and
`nondeterminism_reported` records the ops that had no deterministic kernel (such a run is not bit-for-bit
reproducible)."""

from __future__ import annotations

import ctypes
import hashlib
import os
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

# The code paths that decide a CPU's bits. torch computes matrix products in Intel MKL, convolutions in oneDNN and
# the rest in its own ATen kernels; each picks the widest instruction set the CPU has (AVX-512 or AVX2, with other
# blocking and so other sums) when it first computes, and each reads a variable that caps or pins that choice.
# MKL_CBWR=AUTO is MKL's reproducible mode on its own choice of path (MKL_DYNAMIC=FALSE: a fixed thread count).
# Portable mode pins all three to what every x86-64 CPU of the last decade has: AVX2 for oneDNN and ATen, and
# MKL's COMPATIBLE branch, the one MKL honours on Intel and AMD alike (it runs its AVX2 branch on Intel CPUs only,
# and AUTO elsewhere). benchmarks/README.md measures what it costs and which CPUs agree under it.
NATIVE_CODE_PATHS = {"MKL_CBWR": "AUTO", "MKL_DYNAMIC": "FALSE"}
PORTABLE_CODE_PATHS = {
    **NATIVE_CODE_PATHS,
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}
# Variables that select a code path or a thread behaviour: always on record ("unset" when not set), with any other
# variable of these libraries (their *_VERBOSE switches print, and change no bit: left out)
CODE_PATH_VARIABLES = (
    "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DYNAMIC", "MKL_NUM_THREADS", "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OMP_PROC_BIND",
)  # fmt: skip
CODE_PATH_PREFIXES = ("MKL_", "ONEDNN_", "DNNL_", "ATEN_", "OMP_", "GOMP_", "KMP_")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
# oneMKL's named constants for CNR control: the branch's number, and its name
MKL_BRANCHES = dict(enumerate(("OFF", "OFF", "AUTO", "COMPATIBLE", "SSE2", "SSE3", "SSSE3", "SSE4_1", "SSE4_2", "AVX",
                               "AVX2", "AVX512_MIC", "AVX512", "AVX512_MIC_E1", "AVX512_E1")))  # fmt: skip
# The variables that pin a run's code paths: what an analysis or a served model sets again to compute as it did
PINNED = ("MKL_CBWR", "MKL_DYNAMIC", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
          "ATEN_CPU_CAPABILITY")  # fmt: skip


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
    """SHA-256 over the names and bytes of the Python files in code_dir and its support/: the code that runs,
    committed or not (a commit that changes only the docs keeps it; an edit that is not committed changes it)."""
    digest = hashlib.sha256()
    for path in sorted([*code_dir.glob("*.py"), *code_dir.glob("support/*.py")]):
        digest.update(path.relative_to(code_dir).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cpu_facts() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (Linux); empty elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return {}
    fields = {}
    for line in cpuinfo.read_text().split("\n\n")[0].splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo), else what platform knows."""
    return cpu_facts().get("model name") or platform.processor() or platform.machine()


def cpu_identity() -> dict[str, str]:
    """What tells two CPUs apart where their brand strings agree ("AMD EPYC"): vendor, family, model and stepping,
    and the instruction sets among CPU_FLAGS that it has (the ones MKL, oneDNN and ATen choose their paths by)."""
    facts = cpu_facts()
    flags = set(facts.get("flags", "").split())
    return {
        "cpu_vendor": facts.get("vendor_id", platform.machine()),
        "cpu_family": facts.get("cpu family", "unknown"),
        "cpu_model_number": facts.get("model", "unknown"),
        "cpu_stepping": facts.get("stepping", "unknown"),
        "cpu_flags": " ".join(flag for flag in CPU_FLAGS if flag in flags) if facts else "unknown",
    }


def mkl_branch() -> str:
    """The branch MKL computes on in this process (it reads MKL_CBWR at its first call, and this may be it):
    AUTO, COMPATIBLE, ... with ",STRICT", or OFF; "none" without MKL (e.g. on an ARM Mac)."""
    folder = Path(torch.__file__).parent / "lib"
    try:
        library = ctypes.CDLL(str(next(iter(sorted(folder.glob("libtorch_cpu.*"))))))
        value = library.mkl_serv_cbwr_get(0xFFFFFFFF)  # MKL_CBWR_ALL: the branch and the STRICT bit
    except (StopIteration, OSError, AttributeError):
        return "none"
    return MKL_BRANCHES.get(value & 0xFFFF, str(value & 0xFFFF)) + (",STRICT" if value & 0x10000 else "")


def library_versions() -> dict[str, str]:
    """The MKL and oneDNN versions built into torch, as its build configuration names them."""
    versions = {"mkl": "none", "onednn": "none"}
    for line in torch.__config__.show().splitlines():
        if "Math Kernel Library Version" in line:
            versions["mkl"] = line.split("Version", 1)[1].split("for")[0].strip()
        elif "MKL-DNN v" in line or "oneDNN v" in line:
            versions["onednn"] = line.split(" v", 1)[1].split()[0]
    return versions


def code_path_variables() -> dict[str, str]:
    """Every variable in force that selects a code path or a thread behaviour, "unset" for CODE_PATH_VARIABLES
    that are not set."""
    found = {name: os.environ.get(name, "unset") for name in CODE_PATH_VARIABLES}
    found |= {
        name: value
        for name, value in os.environ.items()
        if name.startswith(CODE_PATH_PREFIXES) and not name.endswith("_VERBOSE")
    }
    return dict(sorted(found.items()))


def code_paths() -> dict[str, str]:
    """The CPU code paths in force in this process, as MKL and ATen report them (oneDNN has no call that says: its
    cap is the variable it read), and whether they are the portable ones."""
    paths = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": mkl_branch(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "native")),
    }
    pinned = tuple(
        PORTABLE_CODE_PATHS[name].upper() for name in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
    )
    portable = (paths["cpu_capability"], paths["mkl_cbwr"], paths["onednn_max_cpu_isa"].upper()) == pinned
    return {**paths, "code_paths": "portable" if portable else "native"}


def pin_code_paths(portable: bool) -> dict[str, str]:
    """Set the CPU code paths for this process, before its first computation (the libraries read the variables
    once), and return them as code_paths() reports them. A variable the user set is kept, with a warning, and the
    run records it; a process whose libraries had already chosen other paths cannot be pinned: one sentence."""
    wanted = PORTABLE_CODE_PATHS if portable else NATIVE_CODE_PATHS
    kept = [
        f"{name}={os.environ[name]}" for name, value in wanted.items() if os.environ.setdefault(name, value) != value
    ]
    if kept:
        print(
            f"WARNING {', '.join(kept)} set in the environment, and kept: this run's code paths are not the "
            f"{'portable' if portable else 'usual'} ones ({', '.join(f'{k}={v}' for k, v in wanted.items())}), "
            "which changes its bits; its record says so.",
            file=sys.stderr,
        )
    paths = code_paths()
    if (
        portable
        and not kept
        and platform.machine().lower() in ("x86_64", "amd64")
        and paths["code_paths"] != "portable"
    ):
        raise SystemExit(
            f"The portable code paths are not in force in this process (MKL {paths['mkl_cbwr']}, torch "
            f"{paths['cpu_capability']}): it computed before they were set. Run the script in a fresh process, or "
            "pass --no-portable."
        )
    return paths


def recorded_code_paths(tags: dict[str, str]) -> dict[str, str]:
    """The variables that pinned a run's code paths, as its record holds them ("unset" for one it did not set); a
    record from before they were recorded ran in MKL's reproducible mode on the native paths."""
    if "env.code_paths" not in tags:
        return {name: NATIVE_CODE_PATHS.get(name, "unset") for name in PINNED}
    return {name: tags.get(f"env.var.{name}", "unset") for name in PINNED}


def follow_code_paths(tags: dict[str, str]) -> str | None:
    """Set this process's code paths to those of the run whose tags these are, before its first computation (as
    pin_code_paths does); None when they are then in force as recorded, else a sentence saying what is not."""
    for name, value in recorded_code_paths(tags).items():
        if value == "unset":
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    now = code_paths()
    differ = [
        f"{key} {tags[f'env.{key}']} then, {now[key]} now"
        for key in now
        if tags.get(f"env.{key}", now[key]) != now[key]
    ]
    return "; ".join(differ) or None


def software_and_hardware(device: torch.device) -> dict[str, str]:
    """Versions and machine facts that change results bit for bit: the software, the CPU, its code paths in force
    and every variable that selects one (tags `env.var.NAME`), the threads and the device."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        **library_versions(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        **cpu_identity(),
        **code_paths(),
        **{f"var.{name}": value for name, value in code_path_variables().items()},
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
