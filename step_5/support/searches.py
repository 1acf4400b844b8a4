"""What the folds' searches found, byte-identical in steps 4 and 5: the hyper-parameters every fold chose side by
side (a stable method picks similar values in every fold), and each fold's Optuna study as figures.

However a step declares its search space (step 4 in train.py's SEARCH_SPACE: a list is a choice, a pair a range,
learning rates and weight decays on a log scale), it is logged as `search/search_setup.json` on the root run, which
is what is read here.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write PNG files; never open a window (headless machines, SSH, CI)
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.artifacts import load_dict  # noqa: E402

from support import sharing  # noqa: E402

Fold = tuple[int, int]  # (root split, nested split)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def searched(name: str, declared: list | dict) -> dict:
    """One declared hyper-parameter as {"values": its choices or [low, high], "log": bool, "choices": bool}."""
    if isinstance(declared, dict):  # step 5: {"setting": ..., "suggest_float": {"low": ..., "high": ..., ...}}
        kind, spec = next((kind, spec) for kind, spec in declared.items() if kind.startswith("suggest_"))
        choices = kind == "suggest_categorical"
        values = list(spec["choices"]) if choices else [spec["low"], spec["high"]]
        return {"values": values, "log": bool(spec.get("log")), "choices": choices}
    log = name.endswith("_lr") or name.endswith("weight_decay")  # step 4: a list of choices, or a (low, high) range
    return {"values": list(declared), "log": log, "choices": all(isinstance(value, int) for value in declared)}


def chosen_table(root: mlflow.entities.Run, folds: dict[Fold, mlflow.entities.Run]) -> tuple[pd.DataFrame, dict]:
    """One row per fold with the numeric hyper-parameters its search chose (the fold run's params); their space."""
    declared = load_dict(f"runs:/{root.info.run_id}/search/search_setup.json")["search_space"]
    space = {name: searched(name, spec) for name, spec in declared.items()}
    space = {name: spec for name, spec in space.items() if all(is_number(v) for v in spec["values"])}
    rows = [
        {
            "root_split": root_split,
            "nested_split": nested_split,
            "best_trial": int(run.data.tags["best_trial_number"]),
            **{name: float(run.data.params[name]) for name in space},
        }
        for (root_split, nested_split), run in folds.items()
    ]
    return pd.DataFrame(rows), space


def print_chosen(chosen: pd.DataFrame, space: dict) -> None:
    """The chosen values per fold, and how far apart they are across folds."""
    print("\nHyper-parameters chosen by each fold's search (a stable method picks similar values):")
    print(chosen.to_string(index=False, float_format="{:.3g}".format))
    for name, spec in space.items():
        low, high = chosen[name].min(), chosen[name].max()
        spread = f"largest / smallest = {high / low:.1f}x" if spec["log"] and low > 0 else f"range {high - low:.3g}"
        values = spec["values"]
        print(f"  {name}: {low:.3g} to {high:.3g} ({spread}; searched {values[0]:g} to {values[-1]:g})")


def plot_chosen(chosen: pd.DataFrame, space: dict) -> plt.Figure:
    """One strip per hyper-parameter over its searched range, one dot per fold, coloured by outer fold."""
    fig, axes = plt.subplots(len(space), 1, figsize=(6.5, 0.85 * len(space) + 0.9))
    for ax, (name, spec) in zip(axes, space.items(), strict=True):
        for root_split, group in chosen.groupby("root_split"):
            y = group["nested_split"] * 0.15  # the nested repeats of one outer fold one above the other
            ax.scatter(group[name], y, color=plt.cm.tab10(root_split % 10), s=30, label=f"outer fold {root_split}")
        values, choices = spec["values"], spec["choices"]  # a list of choices, e.g. the head's width
        if (choices or spec["log"]) and min(values) > 0:  # a log axis cannot show 0 (a dropout choice of 0.0)
            ax.set_xscale("log", base=2 if choices else 10)
            low, high = values[0], values[-1]
            decades = [10.0**k for k in range(math.ceil(math.log10(low)), math.floor(math.log10(high)) + 1)]
            ticks = values if choices else sorted({low, high, *decades})
            ax.set_xticks(ticks, [f"{tick:g}" for tick in ticks])
            ax.minorticks_off()
            ax.set_xlim(low / 1.2, high * 1.2)
        elif min(values) < max(values):
            ax.set_xlim(min(values), max(values))
        ax.set_yticks([])
        ax.set_ylim(-0.3, 0.15 * chosen["nested_split"].max() + 0.3)
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
    axes[0].set_title("Hyper-parameters chosen in each fold (x axis: the searched range)")
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def log_search_figures(
    client: mlflow.MlflowClient,
    root: mlflow.entities.Run,
    folds: dict[Fold, mlflow.entities.Run],
    storage: str | None,
) -> None:
    """Each fold's optimisation history and parameter importances (Optuna's plots), logged onto the root run."""
    storage = storage or root.data.tags.get("optuna_storage", sharing.DEFAULT_STORAGE)
    if not (sharing.is_url(storage) or Path(storage).is_file()):
        print(f"No search figures: no Optuna journal at {storage} (pass --storage where the studies are kept)")
        return
    if ":***@" in storage:  # train.py logged a database URL without its password
        print(f"No search figures: the logged storage {storage} hides its password; pass --storage with the full URL")
        return
    opened = sharing.open_storage(storage)
    for (root_split, nested_split), run in folds.items():
        name = run.data.tags["optuna_study"]
        try:
            study = optuna.load_study(study_name=name, storage=opened)
        except KeyError:
            print(f"No search figures for fold {root_split}/{nested_split}: study {name} is not in {storage}")
            continue
        n_complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        with warnings.catch_warnings(record=True) as caught:  # Optuna's warnings go into the titles instead
            warnings.simplefilter("always")
            plots = {
                "history": optuna.visualization.matplotlib.plot_optimization_history(study),
                "epochs": optuna.visualization.matplotlib.plot_intermediate_values(study),
                "importances": optuna.visualization.matplotlib.plot_param_importances(study),
            }
        too_few = any("too small to compute importances" in str(w.message) for w in caught)
        titles = {
            "history": "dev ROC AUC of each completed trial",
            "epochs": "dev ROC AUC after each epoch, pruned trials included",
            "importances": f"parameter importances, {n_complete} completed trial(s)"
            + ("\n(too few to compute them: Optuna shows them as equal)" if too_few else "")
            + ("\n(from so few trials they say little)" if 1 < n_complete < 10 and not too_few else ""),
        }
        plots["epochs"].set_xlabel("epoch (warm-up epochs first, then fine-tuning)")
        for kind, ax in plots.items():
            ax.set_title("")  # Optuna's own titles (centre or left)
            ax.set_title("", loc="left")
            ax.set_title(f"Fold {root_split}/{nested_split}: {titles[kind]}", loc="left")
        for kind, ax in plots.items():
            path = f"figures/search/fold-{root_split}-{nested_split}_{kind}.png"
            client.log_figure(root.info.run_id, ax.figure, path, save_kwargs={"dpi": 110, "bbox_inches": "tight"})
            plt.close(ax.figure)
    print("Logged each fold's optimisation history and parameter importances under figures/search/")
