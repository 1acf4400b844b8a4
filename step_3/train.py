"""Step 3 — nested cross-validation from an external split file, with statistics across folds.

What it does: ImageNet-pretrained DenseNet-121 with a new head (Linear → ReLU → Dropout → Linear to one logit).
Warm-up: only the head trains, on unaugmented images; the backbone is frozen and in eval mode (its BatchNorm
statistics do not move). Fine-tuning: all layers, a smaller learning rate, AutoAugment. Early stopping on dev
ROC AUC keeps the best model; the decision threshold is fitted on dev (Youden's J).

This step fixes step 2's flaw 4, one random split: a test ROC AUC from one split says little about how much the
result depends on which images landed in the test set. The folds come from a split file made once by
make_dataset_splits.py (nested stratified k-fold: outer folds hold out a test set, inner folds a dev set),
validated whenever it is loaded (splits.py), and every chosen fold is trained and evaluated in its own MLflow
run under one root run. analyze_predictions.py turns the folds into a mean with a 95% interval. The same command
again resumes (support/resume.py): completed folds are skipped. Step 2's training core is now in training.py,
unchanged but for two speed-ups and the hooks later steps use; this file keeps the folds. Still open: hand-picked
hyper-parameters (step 4), hard-coded settings (5).

Run from the repository root:

    python step_1/download_data.py --synthetic  # the offline stand-in (without --synthetic: the real data)
    python step_3/make_dataset_splits.py        # data/oxfordiii/dataset_splits.json, 10 x 10 folds, made once
    python step_3/train.py                      # the first 2 x 2 folds; DenseNet-121 at 224 px: use a GPU
    python step_3/train.py --quick              # same code path at smoke size on a CPU (times: benchmarks/README.md)
    python step_3/train.py --root-split 3 --nested-split 0   # one fold, e.g. one job of a job array
    python step_3/analyze_predictions.py        # per-fold metrics, mean and 95% interval
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow
import torch

from splits import choose_folds, count_or_all, fold_indices, load_splits
from support import common, resume, runs
from support.pets import dataset_folder, drop_undecodable, read_annotations, warn_if_standin
from support.provenance import code_digest, log_provenance, pin_code_paths
from support.training import choose_precision, seed_everything, train_and_evaluate


# ----------------------------------------------------------------------------------------------------------
# Settings: still hard-coded (flaw 6), but every value is now logged with each run.
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

QUICK_SHARES = {"train": 0.70, "dev": 0.15, "test": 0.15}  # --quick: how max_images is shared by a fold's parts
EXPERIMENT = "step_3"  # one MLflow experiment per step
DEFAULT_SEED = 0  # any fixed value works; what matters is that it is fixed and logged


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
    common.add_amp_flag(parser)  # --amp/--no-amp: mixed precision on a CUDA GPU
    common.add_portable_flag(parser)  # --portable/--no-portable: the CPU code paths every x86-64 CPU has
    return parser.parse_args(argv)


def run_fold(
    fold: tuple[int, int], splits: dict, settings: Settings, args: argparse.Namespace, device: torch.device, key: str
) -> None:
    """Train and evaluate one fold in its own MLflow run; its completion tag is the last thing written."""
    # Every fold starts from the same seeded state, so its result does not depend on which folds ran before it
    # in this process: a resumed experiment gives the same per-fold numbers as an uninterrupted one.
    seed_everything(args.seed, args.deterministic, args.num_threads)
    parts = fold_indices(splits, fold, settings.max_images, QUICK_SHARES, args.seed)
    with resume.fold_run(fold, key, args, parts):  # logs the seed, thread counts and the parts' sizes
        results = train_and_evaluate(splits["files"], splits["labels"], parts, settings, args, device)
        mlflow.set_tag("fold_complete", "true")  # the last action: FINISHED alone does not prove completion
    print(
        f"fold {fold[0]}/{fold[1]} complete: dev ROC AUC {results['dev_roc_auc']:.3f}, "
        f"test ROC AUC {results['test_roc_auc']:.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    """Train and evaluate the chosen folds of the split file, each in its own MLflow run under one root run."""
    args = parse_args(argv)
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
    # What decides the results: the split file, seed, determinism, settings, device, thread count and the code
    code = code_digest(Path(__file__).resolve().parent)
    precision = choose_precision(device, args.amp).name  # bf16 or fp16 on a CUDA GPU (unless --no-amp), else fp32
    # another device, thread count, precision or CPU code path: other bits
    machine = (str(device), args.num_threads, precision, cpu_paths)
    key = resume.run_key(splits["digest"], args.seed, args.deterministic, asdict(settings), machine, code)
    print(f"{len(folds)} fold(s) of {split_file} | {settings.backbone} at {settings.image_size} px on {device}")

    def record() -> None:  # what defines the root run, written once, when it is new
        mlflow.set_tags({"split_file": str(split_file), "split_file_digest": splits["digest"]})
        mlflow.log_params(
            {
                **asdict(settings),
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

    experiment_id = runs.use_experiment(EXPERIMENT)
    with resume.root_run(experiment_id, key, f"{settings.backbone}-seed{args.seed}", record, folds) as root:
        for fold in resume.pending(experiment_id, key, folds):  # a rerun skips the completed folds
            run_fold(fold, splits, settings, args, device, key)

    print(f"{len(folds)} fold(s) complete in {time.perf_counter() - started:.0f} s")
    runs.print_where(experiment_id, root.info.run_id)
    print(f"Next: {Path(sys.executable).name} step_3/analyze_predictions.py")


if __name__ == "__main__":
    main()
