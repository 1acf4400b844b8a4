"""Step 5 — the experiment in a config file; any logged run can be run again from its record.

What it does: ImageNet-pretrained DenseNet-121 with a new head (Linear → ReLU → Dropout → Linear to one logit).
Warm-up: only the head trains, on unaugmented images; the backbone is frozen and in eval mode (its BatchNorm
statistics do not move). Fine-tuning: all layers, a smaller learning rate, AutoAugment. Early stopping on dev
ROC AUC keeps the best model; the decision threshold is fitted on dev (Youden's J).

This step fixes step 4's flaw 6, settings hard-coded in the training code: to run another experiment someone had
to edit this file, and the record of a run did not say enough to run it again. Now what the experiment is lives
in a config file (config.py; config_quick.py for --quick), the hyper-parameters are declared in it where their
values would go, `--set` changes one setting for one run, and the config, its resolved JSON, the search space and
the overrides are logged. `--from-run RUN_ID` runs a logged run again from MLflow's record alone and says whether
the result came back: identical, within noise, or different (reproduce.py).

Run from the repository root:

    python step_1/download_data.py --synthetic  # the offline stand-in (without --synthetic: the real data)
    python step_5/make_dataset_splits.py        # data/oxfordiii/dataset_splits.json, 10 x 10 folds, made once
    python step_5/train.py                      # config.py: 2 x 2 folds, 3 trials each; DenseNet-121: use a GPU
    python step_5/train.py --quick              # config_quick.py: smoke size on a CPU (times: benchmarks/README.md)
    python step_5/train.py --quick --set search.n_trials=5   # one setting changed for one run
    python step_5/train.py --from-run RUN_ID    # run a logged root run again; ends with a verdict
    python step_5/analyze_predictions.py        # per-fold metrics, 95% interval, searches, reproducibility report
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import torch

import reproduce
import settings
from support import common, config_io, resume, runs, sharing, studies
from support.config_io import CONFIG_KEYS
from support.pets import dataset_folder, drop_undecodable, read_annotations, warn_if_standin
from support.provenance import code_digest, log_provenance, pin_code_paths
from support.splits import choose_folds, fold_indices, load_splits
from support.training import build_model, choose_precision, fit, make_loaders, seed_everything, train_and_evaluate

# ----------------------------------------------------------------------------------------------------------
# Settings: what the experiment is lives in a config file, logged with every run: config.py (the default),
# config_quick.py (--quick), or your own (--config); --set SECTION.KEY=VALUE changes one setting for one run.
# A setting the search chooses holds a hyper-parameter there (settings.py: Categorical, Float, Int); each trial
# resolves the config into plain values. This file keeps only how to run it: device, threads, seed.
CONFIG = Path(__file__).resolve().parent / "config.py"
QUICK_CONFIG = CONFIG.with_name("config_quick.py")  # config.py at smoke size for a CPU: only what differs

EXPERIMENT = "step_5"  # one MLflow experiment per step
DEFAULT_SEED = 0  # any fixed value works; what matters is that it is fixed and logged


# ----------------------------------------------------------------------------------------------------------
# Hyper-parameter search: one Optuna study per fold, on the fold's train and dev images only
def search(
    study: optuna.Study,
    fold: tuple[int, int],
    paths: list[Path],
    labels: np.ndarray,
    split: dict[str, np.ndarray],
    config: settings.Config,
    args: argparse.Namespace,
    device: torch.device,
) -> optuna.trial.FrozenTrial:
    """Run trials, each in its own MLflow run, until the study has the finished ones asked for; return the best."""
    search_split = {part: split[part] for part in ("train", "dev")}  # the fold's test images never reach a trial

    def objective(trial: optuna.Trial) -> float:
        trial_config = settings.resolve(config, settings.drawn_by(trial))  # each hyper-parameter drawn, in order
        trial_settings = settings.as_settings(trial_config)
        tags = {"run_level": "trial", "trial_number": str(trial.number)}
        with runs.tracked_run(run_name=f"trial-{trial.number}", nested=True, tags=tags) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.log_params(trial.params)
            mlflow.log_text(config_io.dumps(trial_config), "config/resolved_config.json")  # every value it used
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

    studies.run_trials(study, objective, config.search.n_trials, config.search.new_sampler, (args.seed, *fold))
    return study.best_trial


# ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags: which experiment (a config file, or a logged run) and how to run it."""
    parser = common.parser(__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke size for a CPU: small backbone, no pretrained weights, 64 px, at most 600 images, few epochs",
    )
    parser.add_argument("--config", type=Path, help="config file (default config.py); it runs as code: trust it first")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. training.batch_size=16")
    reproduce.add_rerun_flags(parser)  # --from-run RUN_ID: rerun a logged root run, say if it came back; --fresh-rerun
    common.add_device_flags(parser)
    common.add_seed_flags(parser, DEFAULT_SEED, when_not_given="; not given: the run's with --from-run, else {default}")
    common.add_amp_flag(parser)  # --amp/--no-amp: mixed precision on a CUDA GPU
    common.add_portable_flag(parser)  # --portable/--no-portable: the CPU code paths every x86-64 CPU has
    return parser.parse_args(argv)


def run_fold(
    fold: tuple[int, int],
    splits: dict,
    config: settings.Config,
    args: argparse.Namespace,
    device: torch.device,
    key: str,
    study_name: str,
) -> None:
    """Search, refit and check one fold in its own MLflow run; its completion tag is the last thing written."""
    # Every fold starts from the same seeded state, so its result does not depend on which folds ran before it
    # in this process: a resumed experiment gives the same per-fold numbers as an uninterrupted one.
    seed_everything(args.seed, args.deterministic, args.num_threads)
    parts = fold_indices(splits, fold, config.data.max_images, config.data.shares, args.seed)
    with resume.fold_run(fold, key, args, parts):  # logs the seed, thread counts and the parts' sizes
        study = studies.open_study(config.search.storage, study_name, config.search.new_pruner())
        mlflow.set_tag("optuna_study", study_name)
        best = search(study, fold, splits["files"], splits["labels"], parts, config, args, device)
        with sharing.refit_once(study, key) as mine:  # several workers: exactly one of them refits the fold
            if not mine:
                print(f"fold {fold[0]}/{fold[1]}: search complete, refitted by another process")
                return
            with studies.refit_run(best) as refit:  # the best trial's values, from the state every trial started from
                refit_config = settings.resolve(config, settings.taken_from(best.params))  # each at its chosen value
                mlflow.log_text(config_io.dumps(refit_config), "config/resolved_config.json")
                seed_everything(args.seed, args.deterministic, args.num_threads)
                chosen = settings.as_settings(refit_config)
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
    original = reproduce.original_of(args, EXPERIMENT, DEFAULT_SEED)  # --from-run: the run to rerun, from its record
    config, files = config_io.load_experiment(args, original, CONFIG, QUICK_CONFIG)  # a bad config stops here
    sharing.open_storage(config.search.storage)  # a bad storage stops here, before any work
    device = common.pick_device(args)  # and --num-workers, when not given, for that device
    # The CPU's code paths, before the first computation: the same on every x86-64 CPU with --portable (provenance)
    cpu_paths = pin_code_paths(args.quick if args.portable is None else args.portable)
    seed_everything(args.seed, args.deterministic, args.num_threads)
    started = time.perf_counter()

    folder = dataset_folder(Path(config.data.data_dir))
    is_standin = warn_if_standin(folder)
    paths, labels = read_annotations(folder)
    paths, labels = drop_undecodable(paths, labels, config.data.image_size)
    split_file = Path(config.data.split_file or folder.parent / "dataset_splits.json")
    labels_by_file = {p.relative_to(folder).as_posix(): int(y) for p, y in zip(paths, labels, strict=True)}
    splits = load_splits(split_file, folder, labels_by_file, reproduce.split_file_words(original))
    cv = config.cv
    folds = choose_folds(splits, cv.n_root_splits, cv.n_nested_splits, (cv.root_split, cv.nested_split), CONFIG_KEYS)
    folds = reproduce.folds_to_run(original, args.set, folds)  # a rerun: every fold the run holds
    # What decides the results: the split file, seed, determinism, settings, search, device, threads and the code
    code = code_digest(Path(__file__).resolve().parent)
    precision = choose_precision(device, args.amp).name  # bf16 or fp16 on a CUDA GPU (unless --no-amp), else fp32
    # another device, thread count, precision or CPU code path: other bits
    machine = (str(device), args.num_threads, precision, cpu_paths)
    rerun = reproduce.rerun_of(original, device)  # a rerun: the run it reruns, the packages and the hardware
    search_key = resume.run_key(
        splits["digest"], args.seed, args.deterministic, config_io.recipe(config), machine, code, rerun
    )
    key = resume.run_key(search_key, config.search.n_trials)  # more trials later: a new root run, the same studies
    print(
        f"{len(folds)} fold(s) of {split_file}, {config.search.n_trials} trials each | {config.model.backbone} at "
        f"{config.data.image_size} px on {device} | Optuna studies in {config.search.storage}"
    )
    differences = reproduce.warn_differences(original, CONFIG.parent, device, precision)

    def record() -> None:  # what defines the root run, written once, when it is new
        mlflow.set_tags({"split_file": str(split_file), "split_file_digest": splits["digest"]})
        mlflow.log_params(
            {
                **config_io.flat_settings(config),  # every fixed setting; each fold logs the values its search chose
                "config": f"run {args.from_run}" if original else str(files[0]),
                "seed": args.seed,
                "deterministic": args.deterministic,
                "portable": cpu_paths["code_paths"] == "portable",
                "device": str(device),
                "amp": args.amp,
                "precision": precision,
                "k_root": len(splits["root_splits"]),
                "k_nested": len(splits["root_splits"][0]["nested"]),
            }
        )
        digest = splits["meta"]["dataset_digest"]  # load_splits just checked it against the data
        log_provenance(Path(__file__).resolve().parent, device, folder, splits["files"], is_standin, digest)
        mlflow.log_artifact(str(split_file), "splits")
        config_io.log_config(config, files, args.set)  # its files, the resolved config, the search and its setup
        reproduce.log_original(original, differences)  # a rerun: the run it reproduces, how its environment differs

    experiment_id = runs.use_experiment(EXPERIMENT)
    if reproduce.already_reproduced(original, experiment_id, key, folds):
        return  # this very rerun was made before: its verdict is printed, nothing is rerun
    with resume.root_run(experiment_id, key, f"{config.model.backbone}-seed{args.seed}", record, folds) as root:
        for fold in resume.pending(experiment_id, key, folds):  # a rerun skips the completed folds
            study = f"{EXPERIMENT}-split-{splits['digest'][:8]}-fold-{fold[0]}-{fold[1]}-{search_key[:8]}"
            run_fold(fold, splits, config, args, device, key, study)
        reproduce.judge(original, root.info.run_id, list(settings.search_space(config)), args.set, differences)

    print(f"{len(folds)} fold(s) complete in {time.perf_counter() - started:.0f} s")
    runs.print_where(experiment_id, root.info.run_id)
    print(f"Next: {Path(sys.executable).name} step_5/analyze_predictions.py")


if __name__ == "__main__":
    main()
