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
again resumes (resume.py): completed folds are skipped. Still open: hand-picked hyper-parameters (step 4),
hard-coded settings (5).

Run from the repository root:

    python step_1/download_data.py --synthetic  # the offline stand-in (without --synthetic: the real data)
    python step_3/make_dataset_splits.py        # data/oxfordiii/dataset_splits.json, 10 x 10 folds, made once
    python step_3/train.py                      # the first 2 x 2 folds; DenseNet-121 at 224 px: use a GPU
    python step_3/train.py --quick              # same code path at smoke size on a CPU (~1 min on 2 cores)
    python step_3/train.py --root-split 3 --nested-split 0   # one fold, e.g. one job of a job array
    python step_3/analyze_predictions.py        # per-fold metrics, mean and 95% interval
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
import urllib.error
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import torchvision
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

import resume
import runs
from pets import dataset_folder, drop_undecodable, load_image, read_annotations, warn_if_standin
from provenance import code_digest, log_image_lists, log_provenance, nondeterminism_reported
from splits import load_splits


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
    weight_decay: float
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
    weight_decay=1e-4,
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
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation the ImageNet weights expect
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------
# Device
def pick_device(name: str) -> torch.device:
    """Return the requested device; `auto` takes CUDA, then Apple MPS, then the CPU."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(kind for kind in ("cuda", "mps", "cpu") if available[kind])
    if not available[name]:
        raise SystemExit(
            f"--device {name} was asked for, but this machine has no {name.upper()} device: "
            "use --device auto or --device cpu."
        )
    return torch.device(name)


# ----------------------------------------------------------------------------------------------------------
# Seeding and determinism
def seed_everything(seed: int, deterministic: bool, num_threads: int) -> None:
    """Seed Python, NumPy and torch (all devices), fix the thread count, and ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the CPU and every CUDA device
    # torch's CPU matrix products run in Intel MKL, which by default picks its code path by the memory alignment of
    # each input and may change its thread count from call to call. Its reproducibility mode pins both; MKL reads
    # these variables at its first call, so main() calls this function before any computation.
    os.environ.setdefault("MKL_CBWR", "AUTO")
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    torch.set_num_threads(num_threads)  # float sums are added in a different order with another thread count
    torch.backends.cudnn.benchmark = False  # benchmark mode picks the fastest kernel, which may differ per run
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible matmuls
    # warn_only: an op without a deterministic implementation on this device warns instead of stopping the run;
    # the run reports those ops and is tagged, because such a run is not bit-for-bit reproducible.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling new tensors costs time, adds nothing


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for one sample's augmentation in one epoch, independent of worker processes and batch order."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------------
# Data
def stratified_subset(labels: np.ndarray, max_images: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded class-stratified subset of at most max_images images (all of them if None)."""
    indices = np.arange(len(labels))
    if max_images is None or max_images >= len(labels):
        return indices
    subset, _ = train_test_split(indices, train_size=max_images, stratify=labels, random_state=seed)
    return np.sort(subset)


def fold_indices(splits: dict, root: int, nested: int, max_images: int | None, seed: int) -> dict[str, np.ndarray]:
    """Train, dev and test indices of one fold; with a cap (--quick), a seeded stratified subsample of each."""
    fold = {"train": splits["root_splits"][root]["nested"][nested]["train"],
            "dev": splits["root_splits"][root]["nested"][nested]["dev"],
            "test": splits["root_splits"][root]["test"]}  # fmt: skip
    if max_images is None:
        return fold
    return {
        part: idx[stratified_subset(splits["labels"][idx], round(max_images * QUICK_SHARES[part]), seed)]
        for part, idx in fold.items()
    }


def choose_folds(splits: dict, args: argparse.Namespace) -> list[tuple[int, int]]:
    """The (root split, nested split) pairs to run: one fold, or the first n of each level ('all': every one)."""
    k_root, k_nested = len(splits["root_splits"]), len(splits["root_splits"][0]["nested"])
    if (args.root_split is None) != (args.nested_split is None):
        raise SystemExit("--root-split and --nested-split go together: give both to run one fold, or neither.")
    if args.root_split is not None:
        if not (args.root_split < k_root and args.nested_split < k_nested):
            raise SystemExit(
                f"Fold ({args.root_split}, {args.nested_split}) is not in {splits['path']}, which has "
                f"{k_root} root x {k_nested} nested splits (numbered from 0)."
            )
        return [(args.root_split, args.nested_split)]
    counts = []
    for flag, value, available in (("--n-root-splits", args.n_root_splits, k_root),
                                   ("--n-nested-splits", args.n_nested_splits, k_nested)):  # fmt: skip
        count = available if value == "all" else int(value) if value.isdigit() else 0
        if not 1 <= count <= available:
            raise SystemExit(f"{flag} {value}: give a number from 1 to {available}, or 'all' ({splits['path']}).")
        counts.append(count)
    return [(root, nested) for root in range(counts[0]) for nested in range(counts[1])]


class PetImages(Dataset):
    """Images and cat labels; AutoAugment on the fly when `augment` is on, seeded per sample and epoch."""

    def __init__(self, paths: list[Path], labels: np.ndarray, image_size: int, augment: bool, seed: int) -> None:
        self.paths, self.labels, self.image_size = paths, labels, image_size
        self.augment = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET) if augment else None
        self.normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.seed = seed
        self.epoch = 0  # set by the training loop; workers are started per epoch, so each gets the current one

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_image(self.paths[index], self.image_size)
        if self.augment is not None:
            # The random draws depend on (seed, epoch, index) only, not on which worker process makes them or
            # when: the augmentation, and so the result, is the same for any --num-workers.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, self.epoch, index))
                image = self.augment(image)
        image = self.normalize(image.float() / 255)
        return image, torch.tensor(float(self.labels[index]))


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, device: torch.device, seed: int
) -> DataLoader:
    """A DataLoader; with num_workers > 0, worker processes decode and augment while the model trains.

    Its own seeded generator makes the shuffling order a function of the seed alone."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=runs.ignore_stop_signals,
    )


# ----------------------------------------------------------------------------------------------------------
# Model
class PetClassifier(nn.Module):
    """An ImageNet backbone without its classifier, and a new head that outputs one logit (cat)."""

    def __init__(self, backbone: nn.Module, n_features: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images)).squeeze(1)


def build_model(settings: Settings) -> PetClassifier:
    """The backbone (ImageNet weights when settings.pretrained) with its classifier replaced by our head."""
    weights = torchvision.models.get_model_weights(settings.backbone).DEFAULT if settings.pretrained else None
    try:
        backbone = torchvision.models.get_model(settings.backbone, weights=weights)
    except (urllib.error.URLError, OSError) as error:
        raise SystemExit(
            f"Could not download the ImageNet weights of {settings.backbone} ({error}): offline, "
            f"run with --quick (no pretrained weights), or copy {Path(weights.url).name} into "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'} and run again."
        ) from None
    classifier = "classifier" if hasattr(backbone, "classifier") else "fc"  # DenseNet vs ResNet naming
    n_features = getattr(backbone, classifier).in_features
    setattr(backbone, classifier, nn.Identity())
    return PetClassifier(backbone, n_features, settings.head_hidden, settings.dropout)


# ----------------------------------------------------------------------------------------------------------
# Train and evaluate
def train_one_epoch(
    model: PetClassifier,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    freeze_backbone: bool,
    epoch: int,
) -> float:
    """One pass over the training images; log every step's loss to the active run; return the mean loss."""
    model.train()
    if freeze_backbone:
        model.backbone.eval()  # frozen means frozen: BatchNorm running statistics must not move either
    loss_fn = nn.BCEWithLogitsLoss()
    total, count, losses = 0.0, 0, []
    for images, labels in tqdm(loader, desc="  batches", unit="batch", leave=False, disable=None):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(labels)
        count += len(labels)
        losses.append(loss.item())
        runs.check_stop()
    runs.log_step_losses(losses, first_step=(epoch - 1) * len(loader))
    return total / count


@torch.no_grad()
def predict(model: PetClassifier, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, float]:
    """Cat probabilities for every image of the loader, in order, and the mean loss."""
    model.eval()
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    scores, total = [], 0.0
    for images, labels in loader:
        runs.check_stop()
        logits = model(images.to(device, non_blocking=True))
        total += loss_fn(logits, labels.to(device, non_blocking=True)).item()
        scores.append(torch.sigmoid(logits).cpu().numpy())
    return np.concatenate(scores), total / len(loader.dataset)


def fit_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold that maximises Youden's J = sensitivity + specificity − 1 on these labels."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    best = 1 + np.argmax(tpr[1:] - fpr[1:])  # skip the first point: its threshold is +inf (nothing predicted cat)
    return float(thresholds[best])


def train_phase(
    name: str,
    model: PetClassifier,
    loaders: dict[str, DataLoader],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    patience: int,
    device: torch.device,
    best: dict,
) -> None:
    """Train for up to `epochs`, keep the state with the best dev ROC AUC in `best`, stop after `patience` misses."""
    dev_labels = loaders["dev"].dataset.labels
    misses = 0
    for epoch in (bar := tqdm(range(1, epochs + 1), desc=name, unit="epoch")):
        loaders["train"].dataset.epoch = epoch
        train_loss = train_one_epoch(
            model, loaders["train"], optimizer, device, freeze_backbone=name == "warmup", epoch=epoch
        )
        dev_scores, dev_loss = predict(model, loaders["dev"], device)
        dev_auc = roc_auc_score(dev_labels, dev_scores)
        mlflow.log_metrics({"epoch_train_loss": train_loss, "dev_loss": dev_loss, "dev_roc_auc": dev_auc}, step=epoch)
        bar.set_postfix(train_loss=f"{train_loss:.3f}", dev_loss=f"{dev_loss:.3f}", dev_roc_auc=f"{dev_auc:.3f}")
        if dev_auc > best.get("dev_roc_auc", -1.0):
            best.update(
                dev_roc_auc=dev_auc,
                phase=name,
                epoch=epoch,
                state={k: v.detach().clone() for k, v in model.state_dict().items()},
            )
            misses = 0
        else:
            misses += 1
            if misses >= patience:
                tqdm.write(f"{name}: no better dev ROC AUC for {patience} epochs, stopping early")
                break
    model.load_state_dict(best["state"])


def fit(model: PetClassifier, loaders: dict[str, DataLoader], settings: Settings, device: torch.device) -> dict:
    """Warm up the head on the frozen backbone, then fine-tune everything; return the best state found."""
    best: dict = {}
    model.backbone.requires_grad_(False)
    head_optimizer = torch.optim.AdamW(
        model.head.parameters(), lr=settings.warmup_lr, weight_decay=settings.weight_decay
    )
    warmup_loaders, epochs = {**loaders, "train": loaders["warmup"]}, settings.warmup_epochs
    with runs.tracked_run(run_name="warmup", nested=True, tags={"run_level": "phase", "phase": "warmup"}):
        mlflow.log_params({"lr": settings.warmup_lr, "max_epochs": settings.warmup_epochs, "trainable": "head"})
        train_phase("warmup", model, warmup_loaders, head_optimizer, epochs, epochs, device, best)  # no early stop
    model.backbone.requires_grad_(True)
    all_optimizer = torch.optim.AdamW(model.parameters(), lr=settings.finetune_lr, weight_decay=settings.weight_decay)
    with runs.tracked_run(run_name="finetune", nested=True, tags={"run_level": "phase", "phase": "finetune"}):
        mlflow.log_params({"lr": settings.finetune_lr, "max_epochs": settings.finetune_epochs, "trainable": "all"})
        train_phase(
            "finetune", model, loaders, all_optimizer, settings.finetune_epochs, settings.patience, device, best
        )
    return best


def predictions_table(paths: list[Path], labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """One row per image: file name, label (1 = cat) and predicted cat probability."""
    return pd.DataFrame({"file": [p.name for p in paths], "label": labels, "score": scores})


def log_outputs(model: PetClassifier, loaders: dict[str, DataLoader], scores: dict) -> None:
    """Prediction tables and the kept model, as an MLflow model that loads without this code, on the active run."""
    for name in ("dev", "test"):
        table = predictions_table(loaders[name].dataset.paths, loaders[name].dataset.labels, scores[name])
        # CSV keeps every bit of the scores; log_table's JSON keeps 10 decimals, too few for a bit-for-bit check
        mlflow.log_text(table.to_csv(index=False), f"predictions/{name}_predictions.csv")
    example = torch.stack([loaders["test"].dataset[i][0] for i in range(2)])
    mlflow.pytorch.log_model(  # serialised with torch.export: no pickle, no PetClassifier needed to load it
        copy.deepcopy(model).cpu().eval(),
        name="model",
        input_example=example.numpy(),  # also gives the signature the UI shows
        pip_requirements=[f"torch=={version('torch')}"],  # inferring them instead costs seconds per run
        validate_serving_input=False,  # a reload and prediction; analyze_predictions.py checks far more
    )


def train_and_evaluate(
    paths: list[Path],
    labels: np.ndarray,
    split: dict[str, np.ndarray],
    settings: Settings,
    args: argparse.Namespace,
    device: torch.device,
) -> dict:
    """Train on the split's train images, early-stop and fit the threshold on dev, evaluate once on test."""

    def subset(part: str, augment: bool) -> PetImages:
        return PetImages([paths[i] for i in split[part]], labels[split[part]], settings.image_size, augment, args.seed)

    loaders = {
        name: make_loader(subset(part, augment), settings.batch_size, shuffle, args.num_workers, device, args.seed)
        for name, part, augment, shuffle in (
            ("warmup", "train", False, True),  # the frozen warm-up sees the images unaugmented
            ("train", "train", True, True),
            ("dev", "dev", False, False),
            ("test", "test", False, False),
        )
    }
    log_image_lists({name: loader.dataset.paths for name, loader in loaders.items()})
    model = build_model(settings).to(device)
    with nondeterminism_reported(device):
        best = fit(model, loaders, settings, device)
        scores = {name: predict(model, loaders[name], device)[0] for name in ("dev", "test")}
    results = {
        "threshold": fit_threshold(loaders["dev"].dataset.labels, scores["dev"]),
        "dev_roc_auc": best["dev_roc_auc"],
        "test_roc_auc": roc_auc_score(loaders["test"].dataset.labels, scores["test"]),
        "best_phase": best["phase"],
        "best_epoch": best["epoch"],
    }
    mlflow.log_metrics({key: results[key] for key in ("dev_roc_auc", "test_roc_auc", "threshold")})
    mlflow.set_tags({"best_phase": best["phase"], "best_epoch": str(best["epoch"])})
    log_outputs(model, loaders, scores)
    return results


# ----------------------------------------------------------------------------------------------------------
def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from low to high, so a bad value is one sentence that names the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{value} is out of range: give a whole number from {low}"
                + (f" to {high}" if high is not None else " up")
            )
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags (everything else is hard-coded above, and logged)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke size for a CPU: small backbone, no pretrained weights, 64 px, at most 600 images, few epochs",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/oxfordiii"), help="dataset root")
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        default="auto",
        help="auto: CUDA, then MPS, then CPU",
    )
    parser.add_argument(
        "--num-workers",
        type=int_in(0),
        help="DataLoader worker processes; when not given, 0 on a CPU (workers would compete with the model for "
        "the cores) and 4 on a GPU (it needs images faster than one process decodes them)",
    )
    parser.add_argument(
        "--seed", type=int_in(0, 2**32 - 1), default=DEFAULT_SEED, help="seed of the split, weights and augmentation"
    )
    parser.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="deterministic algorithms only (bit-for-bit reruns; on a GPU somewhat slower)",
    )
    parser.add_argument(
        "--num-threads", type=int_in(1), default=os.cpu_count(), help="torch CPU threads (another count, other bits)"
    )
    parser.add_argument(
        "--split-file", type=Path, help="from make_dataset_splits.py (default: DATA_DIR/dataset_splits.json)"
    )
    parser.add_argument("--n-root-splits", default="2", help="run the first N outer folds ('all': every one)")
    parser.add_argument("--n-nested-splits", default="2", help="and in each, the first N inner folds ('all')")
    parser.add_argument("--root-split", type=int_in(0), help="run only this outer fold (with --nested-split)")
    parser.add_argument("--nested-split", type=int_in(0), help="run only this inner fold (with --root-split)")
    return parser.parse_args(argv)


def run_fold(
    fold: tuple[int, int], splits: dict, settings: Settings, args: argparse.Namespace, device: torch.device, key: str
) -> dict:
    """Train and evaluate one fold in its own MLflow run; its completion tag is the last thing written."""
    root_split, nested_split = fold
    # Every fold starts from the same seeded state, so its result does not depend on which folds ran before it
    # in this process: a resumed experiment gives the same per-fold numbers as an uninterrupted one.
    seed_everything(args.seed, args.deterministic, args.num_threads)
    parts = fold_indices(splits, root_split, nested_split, settings.max_images, args.seed)
    tags = {"run_level": "fold", "root_split_id": str(root_split), "nested_split_id": str(nested_split)}
    with runs.tracked_run(run_name=f"fold-{root_split}-{nested_split}", nested=True, tags=tags):
        mlflow.set_tags({"run_key": key, **resume.owner_tags()})
        mlflow.log_params(
            {
                "seed": args.seed,
                "num_threads": torch.get_num_threads(),
                "num_workers": args.num_workers,
                **{f"n_{name}": len(parts[name]) for name in ("train", "dev", "test")},
            }
        )
        results = train_and_evaluate(splits["files"], splits["labels"], parts, settings, args, device)
        mlflow.set_tag("fold_complete", "true")  # the last action: FINISHED alone does not prove completion
    print(
        f"fold {root_split}/{nested_split} complete: dev ROC AUC {results['dev_roc_auc']:.3f}, "
        f"test ROC AUC {results['test_roc_auc']:.3f}"
    )
    return results


def main(argv: list[str] | None = None) -> None:
    """Train and evaluate the chosen folds of the split file, each in its own MLflow run under one root run."""
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    device = pick_device(args.device)
    if args.num_workers is None:
        args.num_workers = 0 if device.type == "cpu" else 4
    seed_everything(args.seed, args.deterministic, args.num_threads)
    runs.install_stop_handlers()  # Ctrl-C and SIGTERM end the runs KILLED instead of leaving them RUNNING
    started = time.perf_counter()

    folder = dataset_folder(args.data_dir)
    is_standin = warn_if_standin(folder)
    paths, labels = read_annotations(folder)
    paths, labels = drop_undecodable(paths, labels, settings.image_size)
    split_file = args.split_file or args.data_dir / "dataset_splits.json"
    if not split_file.is_file():
        raise SystemExit(
            f"No split file at {split_file}: make it with `python step_3/make_dataset_splits.py "
            f"--data-dir {args.data_dir}` (or point --split-file at one)."
        )
    labels_by_file = {p.relative_to(folder).as_posix(): int(y) for p, y in zip(paths, labels, strict=True)}
    splits = load_splits(split_file, folder, labels_by_file)  # stops with one sentence on a leaking or stale file
    folds = choose_folds(splits, args)
    # What decides the results: the split file, seed, determinism, settings, device, thread count and the code
    code = code_digest(Path(__file__).resolve().parent)
    machine = (str(device), args.num_threads)  # another device or thread count adds floats in another order
    key = resume.run_key(splits["digest"], args.seed, args.deterministic, asdict(settings), machine, code)
    print(f"{len(folds)} fold(s) of {split_file} | {settings.backbone} at {settings.image_size} px on {device}")

    experiment_id = runs.use_experiment(EXPERIMENT)
    done = resume.completed_folds(experiment_id, key)
    try:
        with resume.root_run(experiment_id, key, run_name=f"{settings.backbone}-seed{args.seed}") as (root, new):
            if new:  # record what defines the root once (a param cannot change later)
                mlflow.set_tags({"split_file": str(split_file), "split_file_digest": splits["digest"]})
                mlflow.log_params(
                    {
                        **asdict(settings),
                        "seed": args.seed,
                        "deterministic": args.deterministic,
                        "quick": args.quick,
                        "device": str(device),
                        "data_dir": str(args.data_dir),
                        "k_root": len(splits["root_splits"]),
                        "k_nested": len(splits["root_splits"][0]["nested"]),
                    }
                )
                digest = splits["meta"]["dataset_digest"]  # load_splits just checked it against the data
                log_provenance(Path(__file__).resolve().parent, device, folder, splits["files"], is_standin, digest)
                mlflow.log_artifact(str(split_file), "splits")
                mlflow.set_tag("root_record", "complete")  # the last: a root is reopened only with its whole record
            for fold in folds:
                if fold in done:
                    print(f"fold {fold[0]}/{fold[1]} already complete: skipped")
                    continue
                run_fold(fold, splits, settings, args, device, key)
            mlflow.set_tag("run_complete", "true")  # every fold this command asked for is complete
    except runs.StopRequested:
        raise SystemExit(
            f"Stopped by a signal: run {root.info.run_id} and its open fold and phase runs were marked KILLED; "
            "the same command resumes, skipping the completed folds."
        ) from None

    print(f"{len(folds)} fold(s) complete in {time.perf_counter() - started:.0f} s")
    print(f"Tracking URI: {mlflow.get_tracking_uri()}\nRoot run: {root.info.run_id}")
    print(f"View it: {runs.where_to_view(experiment_id, root.info.run_id)}")
    print(f"Next: {Path(sys.executable).name} step_3/analyze_predictions.py")


if __name__ == "__main__":
    main()
