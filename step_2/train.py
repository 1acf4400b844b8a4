"""Step 2 — MLflow tracking, seeding and provenance: every run recorded, bit-for-bit reruns.

What it does: ImageNet-pretrained DenseNet-121 with a new head (Linear → ReLU → Dropout → Linear to one logit).
Warm-up: only the head trains, on unaugmented images; the backbone is frozen and in eval mode (its BatchNorm
statistics do not move). Fine-tuning: all layers, a smaller learning rate, AutoAugment. Early stopping on dev
ROC AUC keeps the best model; the decision threshold is fitted on dev (Youden's J).

This step fixes step 1's flaws 1-3: one --seed decides the split, the weights, the shuffling and (per sample) the
augmentation; every run is an MLflow run (a root run, a child run per phase) with its settings, metrics, model and
provenance (provenance.py), and nothing goes to fixed paths. The same command on the same machine gives the same
bits, for any --num-workers; a stop signal ends the runs KILLED (support/runs.py). Still open: flaws 4 to 6 (steps 3-5).

Run from the repository root:

    python step_1/download_data.py --synthetic  # the offline stand-in (without --synthetic: the real data)
    python step_2/train.py                      # DenseNet-121, ImageNet weights, 224 px: use a GPU
    python step_2/train.py --quick              # same code path at smoke size on a CPU (times: benchmarks/README.md)
    python step_2/analyze_predictions.py        # metrics and figures of the latest run, logged onto it
    mlflow ui                                   # then open the link train.py printed
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from provenance import log_image_lists, log_provenance, nondeterminism_reported, pin_code_paths
from support import common, runs
from support.pets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DecodedImages,
    dataset_folder,
    drop_undecodable,
    read_annotations,
    warn_if_standin,
)


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

DEV_FRACTION = 0.15  # of all images, for early stopping and the threshold
TEST_FRACTION = 0.15  # of all images, touched once at the end
EXPERIMENT = "step_2"  # one MLflow experiment per step
DEFAULT_SEED = 0  # any fixed value works; what matters is that it is fixed and logged


# ----------------------------------------------------------------------------------------------------------
# Seeding and determinism
def seed_everything(seed: int, deterministic: bool, num_threads: int) -> None:
    """Seed Python, NumPy and torch (all devices), fix the thread count, and ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the CPU and every CUDA device
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


def split_train_dev_test(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One seeded stratified train/dev/test split (still only one: flaw 4, fixed in step 3)."""
    indices = np.arange(len(labels))
    rest, test = train_test_split(indices, test_size=TEST_FRACTION, stratify=labels, random_state=seed)
    dev_share = DEV_FRACTION / (1 - TEST_FRACTION)  # of the images left after the test set
    train, dev = train_test_split(rest, test_size=dev_share, stratify=labels[rest], random_state=seed)
    return train, dev, test


class PetImages(Dataset):
    """Images and cat labels; AutoAugment on the fly when `augment` is on, seeded per sample and epoch."""

    def __init__(self, paths: list[Path], labels: np.ndarray, image_size: int, augment: bool, seed: int) -> None:
        self.paths, self.labels, self.image_size = paths, labels, image_size
        self.images = DecodedImages(paths, image_size)
        self.augment = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET) if augment else None
        self.normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.seed = seed
        self.epoch = 0  # set by the training loop; workers are started per epoch, so each gets the current one

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]  # decoded once per process, kept in memory (pets.DecodedImages)
        if self.augment is not None:
            # The draws depend on (seed, epoch, index) only, not on which worker makes them or when: the result is
            # the same for any --num-workers. Only the CPU's generator is seeded (then restored), never a GPU's.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
                image = self.augment(image)
        image = self.normalize(image.float() / 255)
        return image, torch.tensor(float(self.labels[index]))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, device: torch.device) -> DataLoader:
    """A DataLoader; with num_workers > 0, worker processes decode and augment while the model trains. Its own
    generator, seeded with the dataset's seed, makes the shuffling order a function of the seed alone."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(dataset.seed),
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
    backbone = common.load_backbone(settings.backbone, settings.pretrained)
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
    epoch: int,
    freeze_backbone: bool,
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
            model, loaders["train"], optimizer, device, epoch, freeze_backbone=name == "warmup"
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
    epochs, patience = settings.finetune_epochs, settings.patience
    with runs.tracked_run(run_name="finetune", nested=True, tags={"run_level": "phase", "phase": "finetune"}):
        mlflow.log_params({"lr": settings.finetune_lr, "max_epochs": settings.finetune_epochs, "trainable": "all"})
        train_phase("finetune", model, loaders, all_optimizer, epochs, patience, device, best)
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
        name: make_loader(subset(part, augment), settings.batch_size, shuffle, args.num_workers, device)
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
    common.add_portable_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Split the images once, train, pick the threshold on dev, test, and record all of it in one MLflow run."""
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    device = common.pick_device(args)  # and --num-workers, when not given, for that device
    # The CPU's code paths, before the first computation: the same on every x86-64 CPU with --portable (provenance.py)
    cpu_paths = pin_code_paths(args.quick if args.portable is None else args.portable)
    seed_everything(args.seed, args.deterministic, args.num_threads)
    started = time.perf_counter()

    folder = dataset_folder(args.data_dir)
    is_standin = warn_if_standin(folder)
    paths, labels = read_annotations(folder)
    paths, labels = drop_undecodable(paths, labels, settings.image_size)
    keep = stratified_subset(labels, settings.max_images, args.seed)
    paths, labels = [paths[i] for i in keep], labels[keep]
    split = dict(zip(("train", "dev", "test"), split_train_dev_test(labels, args.seed), strict=True))
    print(
        f"{len(paths)} images: "
        + ", ".join(f"{k} {len(v)}" for k, v in split.items())
        + f" | {settings.backbone} at {settings.image_size} px on {device}"
    )

    experiment_id = runs.use_experiment(EXPERIMENT)
    with runs.tracked_run(run_name=f"{settings.backbone}-seed{args.seed}", tags={"run_level": "root"}) as root:
        mlflow.log_params(
            {
                **asdict(settings),
                "seed": args.seed,
                "deterministic": args.deterministic,
                "quick": args.quick,
                "portable": cpu_paths["code_paths"] == "portable",
                "device": str(device),
                "num_threads": torch.get_num_threads(),
                "num_workers": args.num_workers,
                "data_dir": str(args.data_dir),
                **{f"n_{name}": len(split[name]) for name in ("train", "dev", "test")},
            }
        )
        log_provenance(Path(__file__).resolve().parent, device, folder, paths, is_standin)
        results = train_and_evaluate(paths, labels, split, settings, args, device)
        mlflow.set_tag("run_complete", "true")  # the last action: FINISHED alone does not prove completion

    print(
        f"dev ROC AUC {results['dev_roc_auc']:.3f} (best: {results['best_phase']} epoch {results['best_epoch']}), "
        f"test ROC AUC {results['test_roc_auc']:.3f}, threshold {results['threshold']:.3f}, "
        f"{time.perf_counter() - started:.0f} s"
    )
    runs.print_where(experiment_id, root.info.run_id)
    print(f"Next: {Path(sys.executable).name} step_2/analyze_predictions.py")


if __name__ == "__main__":
    main()
