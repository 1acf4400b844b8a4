"""A configuration in and out: a config file loaded, `--set` overrides applied, the config logged as JSON and read
back from a run's record (--from-run). Every way in is checked (config_checks.py). Step 5 added it.
"""

from __future__ import annotations

import ast
import json
import os
import runpy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import mlflow

import settings
from settings import Categorical, Config, Float, Hyperparameter, Int, search_space
from support import studies
from support.config_checks import check, check_setting, hints_of, matches, refuse
from support.photo_model import PREPROCESSING

SUGGEST = {"suggest_categorical": Categorical, "suggest_float": Float, "suggest_int": Int}  # their JSON names
# How the folds to run are named to the user (splits.choose_folds): by their keys in the config's cv section
CONFIG_KEYS = {"root": "cv.root_split", "nested": "cv.nested_split", "n_root": "cv.n_root_splits",
               "n_nested": "cv.n_nested_splits", "all": "None"}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Loading: a config file, then the --set overrides
@contextmanager
def importable(folder: Path) -> Iterator[list[Path]]:
    """While a config file runs: it can import settings.py (as `settings`, the very classes checked here) and the
    config files beside it (config_quick.py imports config.py), each read afresh; yields the files it imported."""
    saved_path, saved_settings = list(sys.path), sys.modules.get("settings")
    before, here = set(sys.modules), Path(settings.__file__).resolve().parent
    sys.path[:0] = [str(folder), str(here)]
    sys.modules["settings"] = settings  # the module whose classes check() checks, whatever name it was imported as
    imported: list[Path] = []
    try:
        yield imported
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - before:  # the config modules it imported: not cached for the next load
            file = Path(getattr(sys.modules[name], "__file__", None) or "/").resolve()
            if file.parent in (folder, here):
                imported.append(file)
                del sys.modules[name]
        if saved_settings is None:
            sys.modules.pop("settings", None)
        else:
            sys.modules["settings"] = saved_settings


def shown(path: Path) -> str:
    """A path as a message shows it: relative to the working directory when it is below it."""
    return os.path.relpath(path) if path.is_absolute() and Path.cwd() in path.parents else str(path)


def load_file(path: Path) -> tuple[Config, list[Path]]:
    """Run a config file (Python); return its `config`, checked, and the files read (it, and those it imported)."""
    source = shown(path)
    if not path.is_file():
        raise SystemExit(f"No config file at {source}: give --config an existing file (e.g. step_5/config.py).")
    try:
        with importable(path.resolve().parent) as imported:
            namespace = runpy.run_path(source, run_name="__config__")
    except SyntaxError as error:
        raise SystemExit(f"{source}, line {error.lineno}: this is not valid Python ({error.msg}).") from None
    except Exception as error:  # the file is code: any error in it is the file's, say which
        raise SystemExit(f"{source} stopped with {type(error).__name__}: {error}.") from None
    except (SystemExit, KeyboardInterrupt) as error:  # not Exceptions, so caught apart: uncaught, `raise SystemExit(0)`
        # in a config file would end train.py silently with status 0, as if the experiment had run
        raise SystemExit(f"{source} did not load: running it raised {error!r} before it defined `config`.") from None
    if "config" not in namespace:
        raise SystemExit(f"{source} defines no `config`: it should end with `config = Config(...)`.")
    check(namespace["config"], source)
    return namespace["config"], [path, *imported]


def parse_value(text: str) -> Any:
    """A --set value: a Python literal (3, 1e-4, None, True, [1, 2]), a hyper-parameter (Float(0.1, 0.5)), or else
    the text itself. Only literals and these three calls are read: nothing on a command line is executed."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return text
    if (
        isinstance(tree, ast.Call)
        and isinstance(tree.func, ast.Name)
        and tree.func.id in ("Categorical", "Float", "Int")
    ):
        try:
            args = [ast.literal_eval(a) for a in tree.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in tree.keywords}
            return {"Categorical": Categorical, "Float": Float, "Int": Int}[tree.func.id](*args, **kwargs)
        except (ValueError, TypeError) as error:
            raise SystemExit(f"--set {text}: not a hyper-parameter declaration ({error}).") from None
    try:
        return ast.literal_eval(tree)
    except ValueError:
        return text


def override(config: Config, assignment: str, source: str, whole: bool = True) -> Config:
    """The config with one `section.key=value` applied (--set): the setting checked, and with `whole` the whole
    config (apply_overrides checks the whole once, after the last override)."""
    key, sep, text = assignment.partition("=")
    if not sep or "." not in key:
        raise SystemExit(f"--set {assignment}: give SECTION.KEY=VALUE, e.g. --set training.batch_size=16.")
    section_name, name = key.strip().split(".", 1)
    sections = [f.name for f in fields(Config)]
    if section_name not in sections:
        raise SystemExit(f"--set {assignment}: unknown section {section_name!r} (sections: {', '.join(sections)}).")
    section = getattr(config, section_name)
    names = [f.name for f in fields(section)]
    if name not in names:
        raise SystemExit(f"--set {assignment}: unknown key {key} (the keys of {section_name}: {', '.join(names)}).")
    value, hint = parse_value(text), hints_of(type(section))[name]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not matches(value, hint) and not isinstance(value, Hyperparameter) and matches(text, hint):
        value = text  # a text setting that looks like a number or a name (a folder called 2024): the text
    check_setting(f"{section_name}.{name}", value, hint, f"{source} with --set {assignment}")  # names its --set
    changed = replace(config, **{section_name: replace(section, **{name: value})})
    if whole:
        check(changed, f"{source} with --set {assignment}")
    return changed


def apply_overrides(config: Config, assignments: list[str], source: str) -> Config:
    """The config with the --set overrides applied in order, each setting checked as it is set, the whole config
    once after the last: settings that must fit together (a pruner and its options) can be set in either order."""
    for assignment in assignments:
        config = override(config, assignment, source, whole=False)
    if assignments:
        check(config, f"{source} with --set {' --set '.join(assignments)}")
    return config


def load(path: Path, assignments: list[str]) -> tuple[Config, list[Path]]:
    """The config file's config with the --set overrides applied (apply_overrides); the config files read."""
    config, files = load_file(path)
    return apply_overrides(config, assignments, shown(path)), files


# ----------------------------------------------------------------------------------------------------------
# JSON: how a configuration is logged, and read back (--from-run)
def to_json(node: Any) -> Any:
    """A configuration as plain JSON; a hyper-parameter as {"suggest_float": {"low": …, "high": …, …}}."""
    if isinstance(node, Hyperparameter):
        kind = next(name for name, cls in SUGGEST.items() if isinstance(node, cls))
        return {kind: {f.name: to_json(getattr(node, f.name)) for f in fields(node)}}
    if is_dataclass(node):
        return {f.name: to_json(getattr(node, f.name)) for f in fields(node)}
    if isinstance(node, dict):
        return {key: to_json(value) for key, value in node.items()}
    if isinstance(node, tuple | list):
        return [to_json(value) for value in node]
    return node


def from_json(data: dict, source: str) -> Config:
    """A Config from its JSON form (to_json), checked like a config file."""
    config = build(Config, data, source, "")
    check(config, source)
    return config


def build(cls: type, data: Any, source: str, path: str) -> Any:
    """A dataclass of type cls from a dict, recursively; a hyper-parameter from its one-key dict."""
    if not isinstance(data, dict):
        refuse(source, path.rstrip(".") or "the file", f"a table of {', '.join(f.name for f in fields(cls))}", data)
    names = [f.name for f in fields(cls)]
    unknown, missing = sorted(set(data) - set(names)), [n for n in names if n not in data]
    if unknown or missing:
        what = f"unknown key {path}{unknown[0]}" if unknown else f"no value for {path}{missing[0]}"
        raise SystemExit(f"{source}: {what} (the keys of {path.rstrip('.') or 'a config'} are: {', '.join(names)}).")
    hints = hints_of(cls)
    values = {}
    for name in names:
        value, hint = data[name], hints[name]
        if is_dataclass(hint):
            values[name] = build(hint, value, source, f"{path}{name}.")
        elif isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SUGGEST:
            kind, arguments = next(iter(value.items()))
            try:
                values[name] = SUGGEST[kind](**arguments)
            except TypeError as error:
                raise SystemExit(f"{source}: {path}{name}: {kind} {error}.") from None
        else:
            values[name] = value
    return cls(**values)


def dumps(config: Config) -> str:
    """The config as indented JSON (how it is logged)."""
    return json.dumps(to_json(config), indent=2)


def flat_settings(config: Config) -> dict[str, Any]:
    """Every fixed setting by its dotted key (data.image_size, ...); hyper-parameters are left out."""
    flat: dict[str, Any] = {}
    for section in fields(config):
        for f in fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), f.name)
            if not isinstance(value, Hyperparameter):
                flat[f"{section.name}.{f.name}"] = json.dumps(value) if isinstance(value, dict) else value
    return flat


def recipe(config: Config) -> Any:
    """What of the config decides the results, as JSON: all of it but where its files are, which folds run, the
    trial budget and where the studies are kept (a run key holds it)."""
    return to_json(
        replace(
            config,
            data=replace(config.data, data_dir="", split_file=None),
            cv=None,
            search=replace(config.search, n_trials=0, storage=""),
        )
    )


def log_config(config: Config, files: list[Path], overrides: list[str]) -> None:
    """Log the config on the active run: its files as written (and those they build on), the resolved config as
    JSON (what --from-run reads back), the search space and setup, and the --set overrides as a tag."""
    for path in files:
        mlflow.log_artifact(str(path), "config")
    mlflow.log_text(dumps(config), "config/resolved_config.json")
    mlflow.log_dict(search_space(config), "config/search_space.json")
    mlflow.log_dict(PREPROCESSING, "config/preprocessing.json")  # what a model of this run expects (predict.py)
    mlflow.set_tag("config_overrides", " ".join(overrides) or "none")
    search, pruner = config.search, {config.search.pruner: config.search.pruner_options}
    studies.log_setup(search_space(config), search.sampler, pruner, search.n_trials, search.storage)


def load_experiment(
    args: object, original: object | None, config_file: Path, quick_config: Path
) -> tuple[Config, list[Path]]:
    """The experiment's config and the config files read: a logged run's record with the --set overrides (a rerun,
    `original`: reproduce.original_of), else the config file (--config, --quick: quick_config, else config_file)."""
    if original is not None:
        source = f"run {args.from_run}'s config/resolved_config.json"
        config = from_json(original.config, source)  # JSON is data: nothing fetched from a server is executed
        config = apply_overrides(config, args.set, source)
        return replace(config, data=replace(config.data, split_file=str(original.split_file))), []
    if args.quick and args.config:
        raise SystemExit(
            f"--quick means --config {quick_config.parent.name}/{quick_config.name}: give one of them, not both."
        )
    return load(args.config or (quick_config if args.quick else config_file), args.set)
