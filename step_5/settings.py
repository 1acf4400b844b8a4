"""What a configuration is: the experiment as data, where a search's choices stand beside the fixed values.

A configuration (`Config`) has five sections: data, model, training, cross-validation and search. A setting of the
model or training section may hold a hyper-parameter instead of a value (`Categorical`, `Float`, `Int`: Optuna's
`suggest_*` calls, declared where the value would go); `resolve` replaces each by the value a trial draws
(`drawn_by`) or a finished trial drew (`taken_from`), in the order they are declared, and leaves fixed values alone.
A config file (config.py) builds a `Config` from these classes. How it is loaded, changed by `--set`, logged and read
back as JSON: support/config_io.py; how every key, type and range is checked first: support/config_checks.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace
from types import SimpleNamespace
from typing import Any

import optuna


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


Hyperparameter = Categorical | Float | Int


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

    def new_sampler(self, seed: int) -> optuna.samplers.BaseSampler:  # studies.run_trials seeds one per trial
        return getattr(optuna.samplers, self.sampler)(seed=seed)

    def new_pruner(self) -> optuna.pruners.BasePruner:
        return getattr(optuna.pruners, self.pruner)(**self.pruner_options)


@dataclass(frozen=True)
class Config:
    data: Data
    model: Model
    training: Training
    cv: CrossValidation
    search: Search


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
    """Every hyper-parameter of the config by parameter name, as JSON: the setting it sits in, how it is drawn."""
    found: dict[str, dict] = {}

    def collect(path: str, hp: Hyperparameter) -> None:
        drawn = {f.name: list(value) if isinstance(value := getattr(hp, f.name), tuple) else value for f in fields(hp)}
        found[param_name(path, hp)] = {"setting": path.rstrip("."), f"suggest_{type(hp).__name__.lower()}": drawn}

    resolve(config, collect)
    return found


def as_settings(config: Config) -> SimpleNamespace:
    """The data, model and training sections of a resolved config as one object, every setting an attribute: what
    training.py reads (its `Settings`)."""
    sections = (config.data, config.model, config.training)
    return SimpleNamespace(**{f.name: getattr(section, f.name) for section in sections for f in fields(section)})
