"""Load a step's train.py as a module for the benchmarks (step folders are not packages)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_train(step: str) -> ModuleType:
    """Import <step>/train.py; its folder goes on sys.path for the step's own helper modules (provenance, ...)."""
    sys.path.insert(0, str(REPO / step))
    spec = importlib.util.spec_from_file_location(f"{step}_train", REPO / step / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (and worker pickling) look the module up by name
    spec.loader.exec_module(module)
    return module


def load_module(step: str, name: str) -> ModuleType:
    """Import <step>/<name>.py (or <step>/support/<name>.py) beside a step loaded by load_train: its imports of
    helper modules get that step's, and those that step's support/ lacks (say, step 2's provenance.py, which is on
    top there) come from <step>'s."""
    if "support" in sys.modules and str(REPO / step / "support") not in sys.modules["support"].__path__:
        sys.modules["support"].__path__.append(str(REPO / step / "support"))
    path = REPO / step / f"{name}.py"
    spec = importlib.util.spec_from_file_location(
        f"{step}_{name}", path if path.exists() else path.parent / "support" / path.name
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
