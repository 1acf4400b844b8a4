"""Checking a configuration when it is loaded, before any run exists: every key, type and range.

A value of the right type can still be one that train.py cannot use (a batch of 0 images, a negative learning rate,
1e999): it would stop the run with a traceback after its MLflow runs exist. So a wrong key, a value of the wrong type
or outside what train.py can use (ALLOWED), an infinite or NaN number, a hyper-parameter that could draw such a value,
an empty or inverted range, a hyper-parameter name that is duplicated, that the fold runs already log
(RESERVED_NAMES) or that MLflow refuses as a param key, a sampler or pruner that cannot be built, or a sampler that
cannot draw the config's hyper-parameters is one sentence naming the file (or the --set), the key, the value and what
is allowed. Step 5 added it (settings.py is the lesson; this is its guard).
"""

from __future__ import annotations

import math
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
import torchvision
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, path_not_unique, validate_param_and_metric_name

import settings
from settings import (
    Categorical,
    Config,
    Data,
    Float,
    Hyperparameter,
    Int,
    drawn_by,
    param_name,
    resolve,
)


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


# training.py's build_model puts the new head in place of the backbone's `classifier` (DenseNet) or `fc` (the others)
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
# Checking: every key, type and range, once, when a configuration is loaded
def hints_of(cls: type) -> dict[str, Any]:
    """A section's field types (the annotations are strings: evaluated in settings.py, where the classes are)."""
    return typing.get_type_hints(cls, globalns=vars(settings))


def refuse(source: str, key: str, expected: str, got: Any) -> typing.NoReturn:
    """Stop with one sentence: in `source`, `key` should be `expected`, not `got`."""
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
        refuse(source, "config", "a settings.Config", config)
    for section, section_type in hints_of(Config).items():
        node = getattr(config, section)
        if not isinstance(node, section_type):
            refuse(source, section, f"a settings.{section_type.__name__}", node)
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
        refuse(source, "data.shares", expected, shares)
    if data.max_images is not None and any(round(data.max_images * share) < 2 for share in shares.values()):
        refuse(source, "data.max_images", "large enough that every part gets 2 images at data.shares", data.max_images)


def check_setting(key: str, value: Any, hint: Any, source: str) -> None:
    """One setting (key: section.name): its type and ALLOWED range; a hyper-parameter only where a trial draws it."""
    if isinstance(value, Hyperparameter):
        if key.split(".")[0] not in SEARCHED_SECTIONS:
            where = "a hyper-parameter can only stand in the model or training section, where each trial draws it"
            refuse(source, key, f"{type_name(hint)} ({where})", value)
        check_hyperparameter(value, hint, source, key)
    elif not matches(value, hint):
        refuse(source, key, type_name(hint), value)
    elif value is not None and key in ALLOWED and not ALLOWED[key].allows(value):
        refuse(source, key, allowed(key, value), value)


def check_hyperparameter(hp: Hyperparameter, hint: Any, source: str, key: str) -> None:
    """A hyper-parameter fits its setting: its own fields of their types (whole numbers for an Int, finite numbers),
    a name that MLflow can log on a fold run, Float for a float, Int for an int, choices of the setting's type; a range
    that is not empty; every value it can draw in the setting's ALLOWED range (both ends of a range, each choice)."""
    kind = type(hp).__name__
    for name, field_hint in hints_of(type(hp)).items():  # before any comparison: Int("a", 3) is one sentence too
        value = getattr(hp, name)
        if not matches(value, field_hint):
            refuse(source, f"{key} = {kind}(...) {name}", type_name(field_hint), value)
        if not finite(value):  # Float(0, nan) would read as an empty range, a step of inf as a range of one value
            refuse(source, f"{key} = {kind}(...) {name}", "a finite number", value)
    param = param_name(key, hp)  # logged as a param of the trial, refit and fold runs
    if param in RESERVED_NAMES:
        reserved = f"a name other than {', '.join(RESERVED_NAMES)} (each fold run logs these params itself)"
        refuse(source, f"{key} = {kind}(...) name", reserved, param)
    # MLflow's own checks of a param key (mlflow.utils.validation), which log_params would fail in a trial run
    if len(param) > MAX_ENTITY_KEY_LENGTH or not validate_param_and_metric_name(param) or path_not_unique(param):
        accepted = f"at most {MAX_ENTITY_KEY_LENGTH} letters, digits, spaces, _ - . or /, and no path such as a/../b"
        refuse(source, f"{key} = {kind}(...) name", f"a name MLflow accepts as a param key ({accepted})", param)
    if isinstance(hp, Categorical):
        wrong = [choice for choice in hp.choices if not matches(choice, hint)]
        if wrong:
            refuse(source, f"{key} choice", type_name(hint), wrong[0])
    elif not matches(1.5 if isinstance(hp, Float) else 1, hint):  # a Float draws floats, an Int whole numbers
        refuse(source, key, f"{type_name(hint)} (or a hyper-parameter of that type)", hp)
    problem = empty(hp)
    if problem:
        raise SystemExit(f"{source}: {key} = {kind}(...) is empty: it needs {problem}.")
    if key in ALLOWED:  # a range is an interval: if both ends are allowed, so is every value between them
        if isinstance(hp, Categorical):
            drawn = [(f"{key} choice", choice) for choice in hp.choices]
        else:
            drawn = [(f"{key} = {kind}(...) low", hp.low), (f"{key} = {kind}(...) high", hp.high)]
        for label, value in drawn:
            if not ALLOWED[key].allows(value):
                refuse(source, label, allowed(key, value), value)


def check_search(config: Config, source: str) -> None:
    """A sampler and a pruner that Optuna has, each built once here as the search builds them: the sampler from a
    seed alone (Search.new_sampler), the pruner with its options (Search.new_pruner); then the sampler draws the
    config's hyper-parameters, in a scratch study in memory, as the first two trials of a search would."""
    search = config.search
    for key, module, base in (("search.sampler", optuna.samplers, optuna.samplers.BaseSampler),
                              ("search.pruner", optuna.pruners, optuna.pruners.BasePruner)):  # fmt: skip
        name = getattr(search, key.split(".")[1])
        found = getattr(module, name, None)
        if not (isinstance(found, type) and issubclass(found, base)):
            example = "TPESampler" if "sampl" in key else "MedianPruner"
            refuse(source, key, f"a class of {module.__name__} (e.g. {example})", name)
    # GridSampler needs a search space, PartialFixedSampler a base sampler, BaseSampler is abstract: a trial's
    # search.new_sampler(seed) would stop in the middle of the search
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an experimental sampler warns when it is built: it will in the search
        try:
            search.new_sampler(seed=0)
        except (TypeError, ValueError, ImportError) as error:
            built = f"a sampler that is built from a seed alone, e.g. TPESampler ({error})"
            refuse(source, "search.sampler", built, search.sampler)
        try:
            search.new_pruner()
        except (TypeError, ValueError) as error:
            raise SystemExit(f"{source}: search.pruner_options do not suit {search.pruner}: {error}.") from None
        # A sampler may refuse a kind of hyper-parameter only when it draws one (BruteForceSampler a Float without a
        # step), or need a package only when it first learns from a finished trial (CmaEsSampler needs cmaes from its
        # second trial on): a trial of every fold would fail, after the root and fold runs exist
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # no "A new study created in memory" for a scratch study
        try:
            study = optuna.create_study(storage=None, sampler=search.new_sampler(seed=0))
            for _ in range(2):
                trial = study.ask()
                resolve(config, drawn_by(trial))
                study.tell(trial, 0.0)
        except (TypeError, ValueError, ImportError, NotImplementedError, RuntimeError) as error:
            reason = " ".join(str(error).split()).rstrip(".")  # Optuna's reason, on one line
            refuse(source, "search.sampler", f"a sampler that can draw this config's hyper-parameters ({reason})",
                 search.sampler)  # fmt: skip
        finally:
            optuna.logging.set_verbosity(verbosity)


def empty(hp: Hyperparameter) -> str | None:
    """What a hyper-parameter that can draw nothing needs, or None: a choice, or a range that is not empty."""
    return range_problem(hp) if isinstance(hp, Float | Int) else None if hp.choices else "at least one choice"


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
