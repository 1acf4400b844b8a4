"""The environment files agree: exact pins, the lock holds them all, conda installs it, scripts import only pins."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)(\s*;.*)?$")


def pins(path: Path) -> dict[str, str]:
    """Package name (normalised) → exact version of every requirement line in a pip requirements file."""
    result = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: '{line}' is not an exact pin (name==version)"
        result[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return result


def test_every_top_level_pin_is_in_the_lock_with_the_same_version():
    lock = pins(REPO / "requirements.lock")
    for name in ("requirements.txt", "requirements-dev.txt"):
        for package, version in pins(REPO / name).items():
            assert lock.get(package) == version, f"{name} pins {package}=={version}, the lock has {lock.get(package)}"


def test_the_lock_matches_this_environment():
    """The suite runs in the locked environment, so a stale lock shows up here."""
    from importlib.metadata import version

    lock = pins(REPO / "requirements.lock")
    for package in ("torch", "torchvision", "mlflow", "optuna", "numpy", "scikit-learn"):
        assert version(package) == lock[package], f"installed {package} {version(package)} != lock {lock[package]}"


SUPPORTED = ("3.11", "3.12", "3.13")


def test_every_place_names_the_same_supported_pythons():
    """setup_env.sh picks among them, conda's range admits exactly them, the lock says it was checked on them, and
    the README's prerequisites name them."""
    assert f'supported="{" ".join(SUPPORTED)}"' in (REPO / "scripts/setup_env.sh").read_text()
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert env["name"] == "reproai"
    assert "python>=3.11,<3.14" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section == ["-r requirements.lock"]
    assert f"(Python {', '.join(SUPPORTED)}, Linux" in (REPO / "requirements.lock").read_text().splitlines()[0]
    assert "**Python 3.11, 3.12 or 3.13**" in (REPO / "README.md").read_text()


@pytest.mark.parametrize("version", ["3.10", "3.14"])
def test_a_python_outside_the_range_is_refused_in_one_sentence(version, tmp_path):
    """PYTHON= naming a Python the lock was not checked on: one sentence naming the versions and how to get one,
    and no .venv made."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts/setup_env.sh", tmp_path / "scripts")
    shutil.copy(REPO / "requirements.lock", tmp_path)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\necho {version}\n")  # answers as setup_env.sh asks a Python for its version
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python)}
    done = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 1 and not (tmp_path / ".venv").exists()
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"is {version}: reproai needs Python 3.11, 3.12 or 3.13" in done.stderr and "PYTHON=" in done.stderr


def test_scripts_import_only_pinned_packages():
    pinned = set(pins(REPO / "requirements.txt"))
    distributions = packages_distributions()
    for script in sorted([*REPO.glob("step_*/*.py"), *REPO.glob("step_*/support/*.py")]):
        tree = ast.parse(script.read_text())
        modules = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        modules |= {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
        }
        step = script.parent.parent if script.parent.name == "support" else script.parent
        local = {p.stem for p in [*step.glob("*.py"), *step.glob("support/*.py")]} | {"support"}
        for module in sorted(modules - set(sys.stdlib_module_names) - local):
            dists = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(module, [])}
            assert dists & pinned, f"{script.relative_to(REPO)} imports {module}, which requirements.txt does not pin"


def test_check_python_refuses_a_version_or_an_interpreter_it_cannot_check_before_cloning(tmp_path):
    """scripts/check_python.sh: a version outside the range, or PYTHON= naming another version, is one sentence,
    before anything is cloned or installed."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 3.12\n")
    python.chmod(0o755)
    cases = {
        ("3.10", None): "reproai supports Python 3.11, 3.12 and 3.13, not 3.10.",
        ("3.13", python): f"PYTHON={python} is 3.12, not Python 3.13.",
    }
    for (version, interpreter), said in cases.items():
        env = {**os.environ, "KEEP": str(tmp_path / "clone")}
        env.pop("PYTHON", None)
        if interpreter:
            env["PYTHON"] = str(interpreter)
        done = subprocess.run(
            ["bash", "scripts/check_python.sh", version], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert done.returncode == 1 and done.stderr == said + "\n", done.stderr
        assert not (tmp_path / "clone").exists()
