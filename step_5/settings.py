"""What a configuration is, and the one way a config file, `--set` overrides or a logged JSON config become one.

A configuration (`Config`) has five sections: data, model, training, cross-validation and search. A setting of the
model or training section may hold a hyper-parameter instead of a value (`Categorical`, `Float`, `Int`: Optuna's
`suggest_*` calls, declared where the value would go); `resolve` replaces each by the value a trial draws, in the
order they are declared, and leaves fixed values alone. Everything is checked when it is loaded, before any run
exists: a wrong key, a value of the wrong type or outside what train.py can use (ALLOWED), an infinite or NaN
number, a hyper-parameter that could draw such a value, an empty or inverted range, a hyper-parameter name that is
duplicated, that the fold runs already log (RESERVED_NAMES) or that MLflow refuses as a param key, a sampler or pruner
that cannot be built, or a sampler that cannot draw the config's hyper-parameters is one sentence naming the file (or
the --set), the key, the value and what is allowed.
"""

from __future__ import annotations

import ast
import json
import math
import os
import runpy
import sys
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import optuna
import torchvision
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, path_not_unique, validate_param_and_metric_name

from pets import IMAGENET_MEAN, IMAGENET_STD

THIS = sys.modules[__name__]  # this module, whatever name it was imported under (config files import `settings`)
# How a photo becomes the model's input, as pets.load_image and training.PetImages (unaugmented) make it; the size is
# data.image_size of the resolved config. Logged with every root run: the registered model reads it from the run.
PREPROCESSING = {"colour": "RGB", "resize": "bilinear", "divide_by": 255, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


# ----------------------------------------------------------------------------------------------------------
# Hyper-parameters: what a search may choose, declared where the value would go
@dataclass(frozen=True)
class Categorical:
    """One of `choices` (Optuna's suggest_categorical)."""

    choices: list | tuple
    name: str | None = None  # the Optuna parameter's name; default: the setting's own name

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.choices))

    def __str__(self) -> str:  # where a value would be shown (a run's name): "resnet18|resnet34"
        return "|".join(str(choice) for choice in self.choices)

    def problem(self) -> str | None:
        return None if len(self.choices) > 0 else "at least one choice"


@dataclass(frozen=True)
class Float:
    """A float from low to high (Optuna's suggest_float): on a log scale, or in steps of `step`."""

    low: float
    high: float
    log: bool = False
    step: float | None = None
    name: str | None = None

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    def problem(self) -> str | None:
        return range_problem(self)


@dataclass(frozen=True)
class Int:
    """An integer from low to high (Optuna's suggest_int): on a log scale, or in steps of `step`."""

    low: int
    high: int
    log: bool = False
    step: int = 1
    name: str | None = None

    def suggest(self, trial: optuna.Trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log, step=self.step)

    def problem(self) -> str | None:
        return range_problem(self)


Hyperparameter = Categorical | Float | Int
SUGGEST = {"suggest_categorical": Categorical, "suggest_float": Float, "suggest_int": Int}  # their JSON names


def range_problem(hp: Float | Int) -> str | None:
    """What is wrong with a range, or None: low below high, a positive low on a log scale, not both log and step."""
    if not hp.low < hp.high:
        return f"low below high (got low={hp.low}, high={hp.high})"
    if hp.log and hp.low <= 0:
        return f"a low above 0 on a log scale (got low={hp.low})"
    if hp.log and hp.step not in (None, 1):
        return "log=True or a step, not both (Optuna allows one of them)"
    if hp.step is not None and hp.step <= 0:
        return f"a step above 0 (got {hp.step})"
    return None


# ----------------------------------------------------------------------------------------------------------
# The sections of a configuration. No defaults here: a config file states every value (config.py).
@dataclass(frozen=True)
class Data:
    data_dir: str  # dataset root (images and annotations below it)
    split_file: str | None  # from make_dataset_splits.py; None: DATA_DIR/dataset_splits.json
    image_size: int  # images are resized to image_size × image_size
    max_images: int | None  # stratified cap on the images of a fold (None: all of them)
    shares: dict  # with max_images: each part's share of the cap, {"train": ..., "dev": ..., "test": ...}


@dataclass(frozen=True)
class Model:
    backbone: str  # a torchvision classification model name
    pretrained: bool  # start from ImageNet weights
    head_hidden: int  # width of the new head's hidden layer
    dropout: float


@dataclass(frozen=True)
class Training:
    batch_size: int
    warmup_epochs: int  # head only, backbone frozen
    warmup_lr: float
    warmup_weight_decay: float
    finetune_epochs: int  # all layers
    finetune_lr: float
    finetune_weight_decay: float
    patience: int  # fine-tuning stops after this many epochs without a better dev ROC AUC


@dataclass(frozen=True)
class CrossValidation:
    n_root_splits: int | None  # run the first N outer folds (None: every one)
    n_nested_splits: int | None  # and in each, the first N inner folds (None: every one)
    root_split: int | None  # run only this outer fold (with nested_split)
    nested_split: int | None  # run only this inner fold (with root_split)


@dataclass(frozen=True)
class Search:
    n_trials: int  # finished (complete or pruned) trials in each fold's search
    sampler: str  # a class of optuna.samplers, seeded per trial
    pruner: str  # a class of optuna.pruners ("NopPruner": no pruning)
    pruner_options: dict  # its keyword arguments
    storage: str  # where the studies are kept: a journal file or a storage URL


@dataclass(frozen=True)
class Config:
    data: Data
    model: Model
    training: Training
    cv: CrossValidation
    search: Search


# ----------------------------------------------------------------------------------------------------------
# What each setting may be. A value of the right type can still be one that train.py cannot use (a batch of 0
# images, a negative learning rate): it would stop the run with a traceback after its MLflow runs exist. The
# bounds below are checked when a config is loaded, for a fixed value and for every value a hyper-parameter can
# draw (a range at both ends, each choice).
@dataclass(frozen=True)
class Bounds:
    """Numbers from `low` (or only above it, with `above`) up to, not including, `below` (None: no upper limit)."""

    low: float
    above: bool = False
    below: float | None = None
    why: str = ""  # said with a refusal, where the bound is not obvious

    def allows(self, value: float) -> bool:
        return (
            finite(value)
            and (value > self.low if self.above else value >= self.low)
            and (self.below is None or value < self.below)
        )

    def __str__(self) -> str:
        words = f"{'above' if self.above else 'at least'} {self.low}"
        words += "" if self.below is None else f" and below {self.below}"
        return f"{words} ({self.why})" if self.why else words


@dataclass(frozen=True)
class Names:
    """One of `names`; a refusal shows the few in `shown`."""

    names: tuple[str, ...]
    shown: tuple[str, ...]
    why: str

    def allows(self, value: str) -> bool:
        return value in self.names

    def __str__(self) -> str:
        return f"one of {', '.join(self.shown)} or {len(self.names) - len(self.shown)} more ({self.why})"


# train.py's build_model puts the new head in place of the backbone's `classifier` (DenseNet) or `fc` (the others)
# and reads that layer's `.in_features`: only a last layer that is one nn.Linear can be replaced so. Of torchvision's
# classification models these families have one (a test builds each); AlexNet, VGG, SqueezeNet, MobileNet, MNASNet,
# EfficientNet, ConvNeXt and MaxViT end in an nn.Sequential, ViT and Swin in `heads` / `head`. GoogLeNet and
# Inception v3 end in an `fc` too, but in training they also return auxiliary outputs, which the head cannot take.
BACKBONE_FAMILIES = ("resnet", "resnext", "wide_resnet", "densenet", "regnet_", "shufflenet_v2_")
BACKBONES = tuple(
    name for name in torchvision.models.list_models(module=torchvision.models) if name.startswith(BACKBONE_FAMILIES)
)
BACKBONE_EXAMPLES = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "regnet_y_400mf")

ALLOWED: dict[str, Bounds | Names] = {
    # Below 29 px DenseNet's pooling runs out of pixels; below 33 px (61 for DenseNet) the last feature map is one
    # pixel and BatchNorm stops on a training batch of one image, which an epoch's last batch can be. 64 suits all.
    "data.image_size": Bounds(64, why="below it, BatchNorm stops on a training batch of one image"),
    # A capped fold is shared 0.70 / 0.15 / 0.15 (data.shares) and each part drawn stratified, which takes at least
    # 2 images: one of each class. round(0.15 * 10) = 2; check_shares checks it for other shares.
    "data.max_images": Bounds(10, why="dev and test each get 15% of it, and each needs an image of each class"),
    "model.backbone": Names(
        BACKBONES,
        BACKBONE_EXAMPLES,
        "a torchvision model whose last layer is one nn.Linear, which build_model replaces",
    ),
    "model.head_hidden": Bounds(1),
    "model.dropout": Bounds(0, below=1),  # a probability; at 1 every feature would be dropped
    "training.batch_size": Bounds(1),
    # fine-tuning starts from the warm-up's best state: a warm-up of no epochs has none (train_phase stops)
    "training.warmup_epochs": Bounds(1, why="fine-tuning starts from the best state of the warm-up"),
    "training.warmup_lr": Bounds(0, above=True),  # at 0 nothing would train; below 0 AdamW refuses
    "training.warmup_weight_decay": Bounds(0),
    "training.finetune_epochs": Bounds(0),  # 0: the warm-up's head alone is the model
    "training.finetune_lr": Bounds(0, above=True),
    "training.finetune_weight_decay": Bounds(0),
    "training.patience": Bounds(1),  # epochs without a better dev ROC AUC; 0 would stop at the first miss, as 1 does
    # None (every fold) passes the type check; whether the split file has that many folds is checked when it is read
    "cv.n_root_splits": Bounds(1),
    "cv.n_nested_splits": Bounds(1),
    "cv.root_split": Bounds(0),  # folds are numbered from 0
    "cv.nested_split": Bounds(0),
    "search.n_trials": Bounds(1),
}
# Names a hyper-parameter cannot have: train.py's run_fold logs these params on each fold run, then the chosen
# hyper-parameters on the same run under their own names, and MLflow refuses to change a param's value.
RESERVED_NAMES = ("seed", "num_threads", "num_workers", "n_train", "n_dev", "n_test")
# Where a hyper-parameter may stand: what a trial builds and trains. The data settings are used before any trial
# (the image check, each fold's parts), and the folds and the search itself are what the trials run in.
SEARCHED_SECTIONS = ("model", "training")


# ----------------------------------------------------------------------------------------------------------
# Resolution: hyper-parameters → values
def resolve(node: Any, choose: Callable[[str, Hyperparameter], Any], path: str = "") -> Any:
    """`node` with every hyper-parameter replaced by `choose(its dotted path, it)`, depth first in declaration
    order (the order Optuna sees the suggest calls in); fixed values stay as they are."""
    if isinstance(node, Hyperparameter):
        return choose(path, node)
    if is_dataclass(node):
        return replace(
            node, **{f.name: resolve(getattr(node, f.name), choose, f"{path}{f.name}.") for f in fields(node)}
        )
    if isinstance(node, dict):
        return {key: resolve(value, choose, f"{path}{key}.") for key, value in node.items()}
    return node


def param_name(path: str, hp: Hyperparameter) -> str:
    """The Optuna parameter's name: the one the declaration gives, else the setting's own name."""
    return hp.name or path.rstrip(".").rsplit(".", 1)[-1]


def drawn_by(trial: optuna.Trial) -> Callable[[str, Hyperparameter], Any]:
    """For `resolve`: each hyper-parameter drawn by the trial's sampler."""
    return lambda path, hp: hp.suggest(trial, param_name(path, hp))


def taken_from(params: dict[str, Any]) -> Callable[[str, Hyperparameter], Any]:
    """For `resolve`: each hyper-parameter set to its value in params (a finished trial's, e.g. the best one's)."""
    return lambda path, hp: params[param_name(path, hp)]


def search_space(config: Config) -> dict[str, dict]:
    """Every hyper-parameter of the config by parameter name, as JSON (with the setting it sits in)."""
    found: dict[str, dict] = {}

    def collect(path: str, hp: Hyperparameter) -> None:
        found[param_name(path, hp)] = {"setting": path.rstrip("."), **to_json(hp)}

    resolve(config, collect)
    return found


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
        fail(source, path.rstrip(".") or "the file", f"a table of {', '.join(f.name for f in fields(cls))}", data)
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


# ----------------------------------------------------------------------------------------------------------
# Checking: every key, type and range, once, when a configuration is loaded
def hints_of(cls: type) -> dict[str, Any]:
    """A section's field types (the annotations are strings: evaluated here, where the classes are)."""
    return typing.get_type_hints(cls, globalns=globals())


def fail(source: str, key: str, expected: str, got: Any) -> typing.NoReturn:
    raise SystemExit(f"{source}: {key} should be {expected}, not {got!r}.")


def finite(value: Any) -> bool:
    """Whether a number is neither infinite nor NaN (1e999 parses to inf); an int always is."""
    return not isinstance(value, float) or math.isfinite(value)


def allowed(key: str, value: Any) -> str:
    """What ALLOWED says of a setting, in words; for an infinite or NaN value, that it must be a finite number."""
    return str(ALLOWED[key]) if finite(value) else f"a finite number {ALLOWED[key]}"


def matches(value: Any, hint: Any) -> bool:
    """Whether value fits the type annotation (int | None, float, str, dict, ...); an int fits float."""
    if isinstance(hint, types.UnionType):
        return any(matches(value, member) for member in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def type_name(hint: Any) -> str:
    """ "an int", "a float or None": the annotation in words."""
    names = " or ".join("None" if h is type(None) else h.__name__ for h in typing.get_args(hint) or (hint,))
    return f"{'an' if names[0] in 'aeiou' else 'a'} {names}"


def check(config: Any, source: str) -> None:
    """Every value's type and range, every hyper-parameter's, unique hyper-parameter names, the sampler and pruner."""
    if not isinstance(config, Config):
        fail(source, "config", "a settings.Config", config)
    for section, section_type in hints_of(Config).items():
        node = getattr(config, section)
        if not isinstance(node, section_type):
            fail(source, section, f"a settings.{section_type.__name__}", node)
        for name, hint in hints_of(section_type).items():
            check_setting(f"{section}.{name}", getattr(node, name), hint, source)
    names: dict[str, str] = {}

    def unique(at: str, hp: Hyperparameter) -> None:
        name = param_name(at, hp)
        if name in names:
            raise SystemExit(
                f"{source}: {names[name]} and {at.rstrip('.')} are both hyper-parameter {name!r}: give one of "
                "them another name (name=...)."
            )
        names[name] = at.rstrip(".")

    resolve(config, unique)
    check_shares(config.data, source)
    check_search(config, source)


def check_shares(data: Data, source: str) -> None:
    """data.shares: a share for each part of a fold, which add up to at most 1, and with data.max_images at least
    2 images for every part (one of each class)."""
    shares = data.shares
    numbers = all(isinstance(v, float | int) and not isinstance(v, bool) and v > 0 for v in shares.values())
    if set(shares) != {"train", "dev", "test"} or not numbers or sum(shares.values()) > 1 + 1e-9:
        expected = "a share above 0 for each of train, dev and test, finite numbers adding up to at most 1"
        fail(source, "data.shares", expected, shares)
    if data.max_images is not None and any(round(data.max_images * share) < 2 for share in shares.values()):
        fail(source, "data.max_images", "large enough that every part gets 2 images at data.shares", data.max_images)


def check_setting(key: str, value: Any, hint: Any, source: str) -> None:
    """One setting (key: section.name): its type and ALLOWED range; a hyper-parameter only where a trial draws it."""
    if isinstance(value, Hyperparameter):
        if key.split(".")[0] not in SEARCHED_SECTIONS:
            where = "a hyper-parameter can only stand in the model or training section, where each trial draws it"
            fail(source, key, f"{type_name(hint)} ({where})", value)
        check_hyperparameter(value, hint, source, key)
    elif not matches(value, hint):
        fail(source, key, type_name(hint), value)
    elif value is not None and key in ALLOWED and not ALLOWED[key].allows(value):
        fail(source, key, allowed(key, value), value)


def check_hyperparameter(hp: Hyperparameter, hint: Any, source: str, key: str) -> None:
    """A hyper-parameter fits its setting: its own fields of their types (whole numbers for an Int, finite numbers),
    a name that MLflow can log on a fold run, Float for a float, Int for an int, choices of the setting's type; a range
    that is not empty; every value it can draw in the setting's ALLOWED range (both ends of a range, each choice)."""
    kind = type(hp).__name__
    for name, field_hint in hints_of(type(hp)).items():  # before any comparison: Int("a", 3) is one sentence too
        value = getattr(hp, name)
        if not matches(value, field_hint):
            fail(source, f"{key} = {kind}(...) {name}", type_name(field_hint), value)
        if not finite(value):  # Float(0, nan) would read as an empty range, a step of inf as a range of one value
            fail(source, f"{key} = {kind}(...) {name}", "a finite number", value)
    param = param_name(key, hp)  # logged as a param of the trial, refit and fold runs
    if param in RESERVED_NAMES:
        reserved = f"a name other than {', '.join(RESERVED_NAMES)} (each fold run logs these params itself)"
        fail(source, f"{key} = {kind}(...) name", reserved, param)
    # MLflow's own checks of a param key (mlflow.utils.validation), which log_params would fail in a trial run
    if len(param) > MAX_ENTITY_KEY_LENGTH or not validate_param_and_metric_name(param) or path_not_unique(param):
        accepted = f"at most {MAX_ENTITY_KEY_LENGTH} letters, digits, spaces, _ - . or /, and no path such as a/../b"
        fail(source, f"{key} = {kind}(...) name", f"a name MLflow accepts as a param key ({accepted})", param)
    if isinstance(hp, Categorical):
        wrong = [choice for choice in hp.choices if not matches(choice, hint)]
        if wrong:
            fail(source, f"{key} choice", type_name(hint), wrong[0])
    elif not matches(1.5 if isinstance(hp, Float) else 1, hint):  # a Float draws floats, an Int whole numbers
        fail(source, key, f"{type_name(hint)} (or a hyper-parameter of that type)", hp)
    problem = hp.problem()
    if problem:
        raise SystemExit(f"{source}: {key} = {kind}(...) is empty: it needs {problem}.")
    if key in ALLOWED:  # a range is an interval: if both ends are allowed, so is every value between them
        if isinstance(hp, Categorical):
            drawn = [(f"{key} choice", choice) for choice in hp.choices]
        else:
            drawn = [(f"{key} = {kind}(...) low", hp.low), (f"{key} = {kind}(...) high", hp.high)]
        for label, value in drawn:
            if not ALLOWED[key].allows(value):
                fail(source, label, allowed(key, value), value)


def check_search(config: Config, source: str) -> None:
    """A sampler and a pruner that Optuna has, each built once here as the search builds them: the sampler from a
    seed alone (make_sampler), the pruner with its options (make_pruner); then the sampler draws the config's
    hyper-parameters once, in a scratch study in memory, as the first trial of a search would."""
    search = config.search
    for key, module, base in (("search.sampler", optuna.samplers, optuna.samplers.BaseSampler),
                              ("search.pruner", optuna.pruners, optuna.pruners.BasePruner)):  # fmt: skip
        name = getattr(search, key.split(".")[1])
        found = getattr(module, name, None)
        if not (isinstance(found, type) and issubclass(found, base)):
            example = "TPESampler" if "sampl" in key else "MedianPruner"
            fail(source, key, f"a class of {module.__name__} (e.g. {example})", name)
    # GridSampler needs a search space, PartialFixedSampler a base sampler, BaseSampler is abstract: a trial's
    # make_sampler(search, seed) would stop in the middle of the search
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an experimental sampler warns when it is built: it will in the search
        try:
            make_sampler(search, seed=0)
        except (TypeError, ValueError, ImportError) as error:
            built = f"a sampler that is built from a seed alone, e.g. TPESampler ({error})"
            fail(source, "search.sampler", built, search.sampler)
        try:
            make_pruner(search)
        except (TypeError, ValueError) as error:
            raise SystemExit(f"{source}: search.pruner_options do not suit {search.pruner}: {error}.") from None
        # A sampler may refuse a kind of hyper-parameter only when it draws one (BruteForceSampler a Float without a
        # step), or need a package only when it first learns from a finished trial (CmaEsSampler needs cmaes from its
        # second trial on): a trial of every fold would fail, after the root and fold runs exist
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # no "A new study created in memory" for a scratch study
        try:
            study = optuna.create_study(storage=None, sampler=make_sampler(search, seed=0))
            for _ in range(2):
                trial = study.ask()
                resolve(config, drawn_by(trial))
                study.tell(trial, 0.0)
        except (TypeError, ValueError, ImportError, NotImplementedError, RuntimeError) as error:
            reason = " ".join(str(error).split()).rstrip(".")  # Optuna's reason, on one line
            fail(source, "search.sampler", f"a sampler that can draw this config's hyper-parameters ({reason})",
                 search.sampler)  # fmt: skip
        finally:
            optuna.logging.set_verbosity(verbosity)


def make_pruner(search: Search) -> optuna.pruners.BasePruner:
    return getattr(optuna.pruners, search.pruner)(**search.pruner_options)


def make_sampler(search: Search, seed: int) -> optuna.samplers.BaseSampler:
    return getattr(optuna.samplers, search.sampler)(seed=seed)


# ----------------------------------------------------------------------------------------------------------
# Loading: a config file, then the --set overrides
@contextmanager
def importable(folder: Path) -> Iterator[list[Path]]:
    """While a config file runs: it can import this module (as `settings`, the very classes checked here) and the
    config files beside it (config_quick.py imports config.py), each read afresh; yields the files it imported."""
    saved_path, saved_settings = list(sys.path), sys.modules.get("settings")
    before, here = set(sys.modules), Path(__file__).resolve().parent
    sys.path[:0] = [str(folder), str(here)]
    sys.modules["settings"] = THIS
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


def as_settings(config: Config) -> SimpleNamespace:
    """The data, model and training sections of a resolved config as one object, every setting an attribute: what
    training.py reads (its `Settings`)."""
    sections = (config.data, config.model, config.training)
    return SimpleNamespace(**{f.name: getattr(section, f.name) for section in sections for f in fields(section)})


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
    JSON (what --from-run reads back), the search space, and the --set overrides as a tag."""
    for path in files:
        mlflow.log_artifact(str(path), "config")
    mlflow.log_text(dumps(config), "config/resolved_config.json")
    mlflow.log_dict(search_space(config), "config/search_space.json")
    mlflow.log_dict(PREPROCESSING, "config/preprocessing.json")  # what a model of this run expects (predict.py)
    mlflow.set_tag("config_overrides", " ".join(overrides) or "none")
