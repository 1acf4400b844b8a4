"""Step 4 — Optuna chooses the hyper-parameters inside every fold: seeded, pruned, resumable, parallel.

What it does: ImageNet-pretrained DenseNet-121 with a new head (Linear → ReLU → Dropout → Linear to one logit).
Warm-up: only the head trains, on unaugmented images; the backbone is frozen and in eval mode (its BatchNorm
statistics do not move). Fine-tuning: all layers, a smaller learning rate, AutoAugment. Early stopping on dev
ROC AUC keeps the best model; the decision threshold is fitted on dev (Youden's J).

This step fixes step 3's flaw 5, hand-picked hyper-parameters: the head's width, the dropout, and both phases'
learning rates and weight decays were values someone tried until they looked good, on data that included the
test images of some fold. Now an Optuna study in every fold chooses them by dev ROC AUC, from that fold's train
and dev images only (its test images never reach the search), and a refit with the chosen values is evaluated
once on the fold's test set. The method, not a person, picks the values, so anyone can rerun it on new data.
Every trial of a fold starts from the same seeded state (the trials differ only by their hyper-parameters), the
sampler is seeded per trial, and a pruner stops trials that fall behind. The studies are stored (studies.py):
the same command again resumes them, and several processes can run it at once and share the trials.
Still open: hard-coded settings (5).

Run from the repository root:

    python step_1/download_data.py --synthetic  # the offline stand-in (without --synthetic: the real data)
    python step_4/make_dataset_splits.py        # data/oxfordiii/dataset_splits.json, 10 x 10 folds, made once
    python step_4/train.py                      # the first 2 x 2 folds, 3 trials each; DenseNet-121: use a GPU
    python step_4/train.py --quick              # same code path at smoke size on a CPU (times: benchmarks/README.md)
    python step_4/train.py --quick --num-threads 1 &  # twice at once: two workers share the trials
    python step_4/analyze_predictions.py        # per-fold metrics, 95% interval, the searches and chosen values
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import optuna
import torch

import studies
from support import common, resume, runs, sharing
from support.pets import dataset_folder, drop_undecodable, read_annotations, warn_if_standin
from support.provenance import code_digest, log_provenance, pin_code_paths
from support.splits import choose_folds, count_or_all, fold_indices, load_splits
from support.training import build_model, choose_precision, fit, make_loaders, seed_everything, train_and_evaluate


# ----------------------------------------------------------------------------------------------------------
# Settings: still hard-coded (flaw 6), but every value is now logged with each run. The searched ones (see
# SEARCH_SPACE) are the fallback values only; each fold uses the values its search chose.
@dataclass(frozen=True)
class Settings:
    """Everything that decides what a training run does."""

    backbone: str  # a torchvision classification model name
    pretrained: bool  # start from ImageNet weights
    image_size: int  # images are resized to image_size × image_size
    max_images: int | None  # stratified cap on the images used (None: all of them)
    batch_size: int
    warmup_epochs: int  # head only, backbone frozen
    warmup_lr: float
    finetune_epochs: int  # all layers
    finetune_lr: float
    patience: int  # fine-tuning stops after this many epochs without a better dev ROC AUC
    warmup_weight_decay: float
    finetune_weight_decay: float
    head_hidden: int  # width of the new head's hidden layer
    dropout: float


FULL = Settings(
    backbone="densenet121",
    pretrained=True,
    image_size=224,  # the resolution DenseNet-121 was trained at on ImageNet
    max_images=None,
    batch_size=32,
    warmup_epochs=3,  # a new head on good features converges in a few epochs
    warmup_lr=1e-3,
    finetune_epochs=15,
    finetune_lr=1e-4,  # 10x smaller: move the pretrained weights gently
    patience=3,
    warmup_weight_decay=1e-4,
    finetune_weight_decay=1e-4,
    head_hidden=256,
    dropout=0.2,
)

# --quick: the same code path at smoke size for a CPU. A small backbone without pretrained weights (nothing to
# download), 64 px images and a capped subset make one training take seconds; the learning rates are larger
# because a network trained from scratch has nothing to protect.
QUICK = replace(
    FULL,
    backbone="resnet18",
    pretrained=False,
    image_size=64,
    max_images=600,
    warmup_epochs=2,
    finetune_epochs=3,
    finetune_lr=1e-3,
    patience=2,
    head_hidden=64,
)

# The hyper-parameters each fold's search chooses: a list is a choice, a pair (low, high) a range; learning rates
# and weight decays on a log scale, where "ten times larger" is the natural step. Optuna's default sampler (TPE)
# draws at random for its first 10 trials, then models which values did well.
SEARCH_SPACE = {
    "head_hidden": [128, 256, 512, 1024],
    "dropout": (0.0, 0.5),
    "warmup_lr": (1e-4, 1e-2),
    "warmup_weight_decay": (1e-6, 1e-2),
    "finetune_lr": (1e-5, 1e-3),  # fine-tuning moves pretrained weights: smaller steps
    "finetune_weight_decay": (1e-6, 1e-2),
}
# --quick: ranges in which a small network trained from scratch still learns within its few epochs
QUICK_SEARCH_SPACE = {**SEARCH_SPACE, "head_hidden": [32, 64, 128], "finetune_lr": (3e-4, 3e-3)}
# The pruner stops a trial whose dev ROC AUC after an epoch is below the median of the earlier trials' at that
# epoch; it judges from the second trial on, and not after the first epoch, which says little.
PRUNING = {"n_startup_trials": 1, "n_warmup_steps": 2}

QUICK_SHARES = {"train": 0.70, "dev": 0.15, "test": 0.15}  # --quick: how max_images is shared by a fold's parts
EXPERIMENT = "step_4"  # one MLflow experiment per step
DEFAULT_SEED = 0  # any fixed value works; what matters is that it is fixed and logged


# ----------------------------------------------------------------------------------------------------------
# Hyper-parameter search: one Optuna study per fold, on the fold's train and dev images only
def suggest(trial: optuna.Trial, space: dict) -> dict:
    """One trial's hyper-parameters, drawn from the search space by the study's sampler."""
    return {
        "head_hidden": trial.suggest_categorical("head_hidden", space["head_hidden"]),
        "dropout": trial.suggest_float("dropout", *space["dropout"]),
        **{
            name: trial.suggest_float(name, *space[name], log=True)
            for name in ("warmup_lr", "warmup_weight_decay", "finetune_lr", "finetune_weight_decay")
        },
    }


def search(
    study: optuna.Study,
    fold: tuple[int, int],
    paths: list[Path],
    labels: np.ndarray,
    split: dict[str, np.ndarray],
    settings: Settings,
    space: dict,
    args: argparse.Namespace,
    device: torch.device,
) -> optuna.trial.FrozenTrial:
    """Run trials, each in its own MLflow run, until the study has the finished ones asked for; return the best."""
    search_split = {part: split[part] for part in ("train", "dev")}  # the fold's test images never reach a trial

    def objective(trial: optuna.Trial) -> float:
        trial_settings = replace(settings, **suggest(trial, space))  # drawn by the study's sampler
        tags = {"run_level": "trial", "trial_number": str(trial.number)}
        with runs.tracked_run(run_name=f"trial-{trial.number}", nested=True, tags=tags) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params(trial.params)
            # Common random numbers: every trial (and the refit) starts from the same seeded state, so trials
            # differ only by their hyper-parameters, and the refit retraces the best trial bit for bit.
            seed_everything(args.seed, args.deterministic, args.num_threads)
            loaders = make_loaders(paths, labels, search_split, trial_settings, args, device)
            model = build_model(trial_settings).to(device)

            def report(epoch: int, dev_auc: float) -> None:
                trial.report(dev_auc, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"dev ROC AUC {dev_auc:.3f} after epoch {epoch}: below the median")

            best = fit(model, loaders, trial_settings, device, report, choose_precision(device, args.amp))
            mlflow.log_metric("dev_roc_auc", best["dev_roc_auc"])
        return best["dev_roc_auc"]

    studies.run_trials(study, objective, args.n_trials, optuna.samplers.TPESampler, (args.seed, *fold))
    return study.best_trial


# ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags (everything else is hard-coded above, and logged)."""
    parser = common.parser(__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke size for a CPU: small backbone, no pretrained weights, 64 px, at most 600 images, few epochs",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/oxfordiii"), help="dataset root")
    common.add_device_flags(parser)
    common.add_seed_flags(parser, DEFAULT_SEED)
    parser.add_argument(
        "--split-file", type=Path, help="from make_dataset_splits.py (default: DATA_DIR/dataset_splits.json)"
    )
    parser.add_argument("--n-root-splits", type=count_or_all, default=2, help="run the first N outer folds ('all')")
    parser.add_argument("--n-nested-splits", type=count_or_all, default=2, help="and in each the first N inner folds")
    parser.add_argument("--root-split", type=common.int_in(0), help="run only this outer fold (with --nested-split)")
    parser.add_argument("--nested-split", type=common.int_in(0), help="run only this inner fold (with --root-split)")
    parser.add_argument("--n-trials", type=common.int_in(1), default=3, help="finished trials in each fold's search")
    sharing.add_storage_flag(parser)  # --storage: where the Optuna studies are kept
    parser.add_argument("--pruning", action=argparse.BooleanOptionalAction, default=True, help="stop lagging trials")
    common.add_amp_flag(parser)  # --amp/--no-amp: mixed precision on a CUDA GPU
    common.add_portable_flag(parser)  # --portable/--no-portable: the CPU code paths every x86-64 CPU has
    return parser.parse_args(argv)


def run_fold(
    fold: tuple[int, int],
    splits: dict,
    settings: Settings,
    space: dict,
    args: argparse.Namespace,
    device: torch.device,
    key: str,
    study_name: str,
) -> None:
    """Search, refit and check one fold in its own MLflow run; its completion tag is the last thing written."""
    # Every fold starts from the same seeded state, so its result does not depend on which folds ran before it
    # in this process: a resumed experiment gives the same per-fold numbers as an uninterrupted one.
    seed_everything(args.seed, args.deterministic, args.num_threads)
    parts = fold_indices(splits, fold, settings.max_images, QUICK_SHARES, args.seed)
    with resume.fold_run(fold, key, args, parts):  # logs the seed, thread counts and the parts' sizes
        pruner = optuna.pruners.MedianPruner(**PRUNING) if args.pruning else optuna.pruners.NopPruner()
        study = studies.open_study(args.storage, study_name, pruner)
        mlflow.set_tag("optuna_study", study_name)
        best = search(study, fold, splits["files"], splits["labels"], parts, settings, space, args, device)
        with sharing.refit_once(study, key) as mine:  # several workers: exactly one of them refits the fold
            if not mine:
                print(f"fold {fold[0]}/{fold[1]}: search complete, refitted by another process")
                return
            with studies.refit_run(best) as refit:  # the best trial's values, from the state every trial started from
                seed_everything(args.seed, args.deterministic, args.num_threads)
                chosen = replace(settings, **best.params)
                results = train_and_evaluate(splits["files"], splits["labels"], parts, chosen, args, device)
            studies.check_refit(fold, best, results, refit.info.run_id)  # the best trial's dev ROC AUC, exactly?
            mlflow.set_tag("fold_complete", "true")  # the last action: FINISHED alone does not prove completion
    print(
        f"fold {fold[0]}/{fold[1]} complete: trial {best.number} chosen ({studies.brief(best.params)}); "
        f"refit dev ROC AUC {results['dev_roc_auc']:.3f}, test ROC AUC {results['test_roc_auc']:.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    """Train and evaluate the chosen folds of the split file, each in its own MLflow run under one root run."""
    args = parse_args(argv)
    sharing.open_storage(args.storage)  # a bad --storage stops here, before any work
    settings = QUICK if args.quick else FULL
    device = common.pick_device(args)  # and --num-workers, when not given, for that device
    # The CPU's code paths, before the first computation: the same on every x86-64 CPU with --portable (provenance)
    cpu_paths = pin_code_paths(args.quick if args.portable is None else args.portable)
    seed_everything(args.seed, args.deterministic, args.num_threads)
    started = time.perf_counter()

    folder = dataset_folder(args.data_dir)
    is_standin = warn_if_standin(folder)
    paths, labels = read_annotations(folder)
    paths, labels = drop_undecodable(paths, labels, settings.image_size)
    split_file = args.split_file or args.data_dir / "dataset_splits.json"
    labels_by_file = {p.relative_to(folder).as_posix(): int(y) for p, y in zip(paths, labels, strict=True)}
    splits = load_splits(split_file, folder, labels_by_file)  # stops with one sentence on a leaking or stale file
    folds = choose_folds(splits, args.n_root_splits, args.n_nested_splits, (args.root_split, args.nested_split))
    space = QUICK_SEARCH_SPACE if args.quick else SEARCH_SPACE
    pruning = PRUNING if args.pruning else None
    # What decides the results: the split file, seed, determinism, settings, search, device, threads and the code
    code = code_digest(Path(__file__).resolve().parent)
    precision = choose_precision(device, args.amp).name  # bf16 or fp16 on a CUDA GPU (unless --no-amp), else fp32
    # another device, thread count, precision or CPU code path: other bits
    machine = (str(device), args.num_threads, precision, cpu_paths)
    search_key = resume.run_key(
        splits["digest"], args.seed, args.deterministic, asdict(settings), space, pruning, machine, code
    )
    key = resume.run_key(search_key, args.n_trials)  # more trials later: a new root run that extends the same studies
    print(
        f"{len(folds)} fold(s) of {split_file}, {args.n_trials} trials each | {settings.backbone} at "
        f"{settings.image_size} px on {device} | Optuna studies in {args.storage}"
    )

    def record() -> None:  # what defines the root run, written once, when it is new
        mlflow.set_tags({"split_file": str(split_file), "split_file_digest": splits["digest"]})
        mlflow.log_params(
            {
                **{name: value for name, value in asdict(settings).items() if name not in space},
                "n_trials": args.n_trials,
                "pruning": args.pruning,
                "seed": args.seed,
                "deterministic": args.deterministic,
                "quick": args.quick,
                "portable": cpu_paths["code_paths"] == "portable",
                "device": str(device),
                "amp": args.amp,
                "precision": precision,
                "data_dir": str(args.data_dir),
                "k_root": len(splits["root_splits"]),
                "k_nested": len(splits["root_splits"][0]["nested"]),
            }
        )
        digest = splits["meta"]["dataset_digest"]  # load_splits just checked it against the data
        log_provenance(Path(__file__).resolve().parent, device, folder, splits["files"], is_standin, digest)
        mlflow.log_artifact(str(split_file), "splits")
        pruner = {"MedianPruner": pruning} if args.pruning else None
        studies.log_setup(space, "TPESampler", pruner, args.n_trials, args.storage)

    experiment_id = runs.use_experiment(EXPERIMENT)
    with resume.root_run(experiment_id, key, f"{settings.backbone}-seed{args.seed}", record, folds) as root:
        for fold in resume.pending(experiment_id, key, folds):  # a rerun skips the completed folds
            study = f"{EXPERIMENT}-split-{splits['digest'][:8]}-fold-{fold[0]}-{fold[1]}-{search_key[:8]}"
            run_fold(fold, splits, settings, space, args, device, key, study)

    print(f"{len(folds)} fold(s) complete in {time.perf_counter() - started:.0f} s")
    runs.print_where(experiment_id, root.info.run_id)
    print(f"Next: {Path(sys.executable).name} step_4/analyze_predictions.py")


if __name__ == "__main__":
    main()
