"""What the scripts of every step share, byte-identical in every step: the command-line flags that say where and
how to run (device, workers, seed, threads), whole-number flags that reject a bad value in one sentence, an
ImageNet backbone whose weights, offline, are one clear sentence instead of a traceback, and a quick exit."""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: scripts/make_standin.py takes int_in without it
    import torch
    from torch import nn

# Every script imports this module. When a script ends, Python collects its garbage once more over every object
# torch, MLflow and scikit-learn made: 1.5 to 2 s per script on 2 cores, for nothing, since the process ends anyway.
# Frozen objects are not collected, so the exit skips that. Nothing is lost: the scripts close their files and runs
# themselves (with-blocks; MLflow ends its runs in its own exit handler), and freezing stops no exit handler.
atexit.register(gc.freeze)

STEP_DIR = Path(__file__).resolve().parents[1]  # this step's folder: support/ is inside it


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first line of the script's docstring, showing every default."""
    return argparse.ArgumentParser(
        description=doc.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from low to high, so a bad value is one sentence that names the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{value} is out of range: give a whole number from {low}"
                + (f" to {high}" if high is not None else " up")
            )
        return value

    return parse


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """--device and --num-workers: where the model runs and how many processes feed it images."""
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        default="auto",
        help="auto: CUDA, then MPS, then CPU",
    )
    parser.add_argument(
        "--num-workers",
        type=int_in(0),
        help="DataLoader worker processes; when not given, 0 on a CPU (workers would compete with the model for "
        "the cores) and on a GPU one per core but one, at most 8 (it needs images faster than one process "
        "augments them)",
    )


def add_amp_flag(parser: argparse.ArgumentParser) -> None:
    """--amp/--no-amp: mixed precision on a CUDA GPU (bf16, or fp16 where the GPU has no bf16); fp32 elsewhere."""
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mixed precision on a CUDA GPU: faster there, with other last bits than fp32; no effect on a CPU",
    )


def add_portable_flag(parser: argparse.ArgumentParser) -> None:
    """--portable/--no-portable: the CPU code paths every x86-64 CPU has, for the same bits on any of them."""
    parser.add_argument(
        "--portable",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pin MKL, oneDNN and torch's own kernels to code paths every x86-64 CPU has (AVX2, MKL's COMPATIBLE "
        "branch), so another CPU gives the same bits; slower on a CPU with AVX-512 (default: on with --quick)",
    )


def add_seed_flags(parser: argparse.ArgumentParser, seed: int, when_not_given: str = "") -> None:
    """--seed, --deterministic and --num-threads: what, besides the code and data, decides every bit of a result.

    Their defaults are `seed`, on and every core. With `when_not_given` (a text with "{default}" in it) they default
    to None, the script fills them in, and each flag's help says how."""
    defaults = {"--seed": seed, "--deterministic": "on", "--num-threads": f"{os.cpu_count()} (the cores)"}
    note = {flag: when_not_given.format(default=value) for flag, value in defaults.items()}
    parser.add_argument(
        "--seed",
        type=int_in(0, 2**32 - 1),
        default=None if when_not_given else seed,
        help="the seed of every random choice: split, weights, shuffling, augmentation, search" + note["--seed"],
    )
    parser.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=None if when_not_given else True,
        help="deterministic algorithms only (bit-for-bit reruns; on a GPU somewhat slower)" + note["--deterministic"],
    )
    parser.add_argument(
        "--num-threads",
        type=int_in(1),
        default=None if when_not_given else os.cpu_count(),
        help="torch CPU threads (another count, other bits)" + note["--num-threads"],
    )


def pick_device(args: argparse.Namespace) -> torch.device:
    """The device --device asks for (`auto`: CUDA, then Apple MPS, then the CPU); fills in --num-workers."""
    import torch

    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = args.device
    if name == "auto":
        name = next(kind for kind in ("cuda", "mps", "cpu") if available[kind])
    if not available[name]:
        raise SystemExit(
            f"--device {name} was asked for, but this machine has no {name.upper()} device: "
            "use --device auto or --device cpu."
        )
    if args.num_workers is None:
        args.num_workers = 0 if name == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))
    return torch.device(name)


def check_writable(folder: Path) -> None:
    """Stop in one sentence, before any work, if the outputs could not be written to folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".write_check").touch()
        (folder / ".write_check").unlink()
    except OSError as error:
        raise SystemExit(
            f"Cannot write to {folder} ({error.strerror}): make it writable or run from another folder; nothing was "
            "trained."
        ) from None


def load_backbone(name: str, pretrained: bool) -> nn.Module:
    """A torchvision classification model, with its ImageNet weights when `pretrained` (downloaded once)."""
    import torch
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (urllib.error.URLError, OSError) as error:
        raise SystemExit(
            f"Could not download the ImageNet weights of {name} ({error}): offline, run with --quick (no "
            f"pretrained weights), or copy {Path(weights.url).name} into {Path(torch.hub.get_dir()) / 'checkpoints'} "
            "and run again."
        ) from None
