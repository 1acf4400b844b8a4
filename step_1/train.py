"""Step 1 — the naive baseline: fine-tune an ImageNet CNN to tell cats from dogs (Oxford-IIIT Pet).

What it does: ImageNet-pretrained DenseNet-121 with a new head (Linear → ReLU → Dropout → Linear to one logit).
Warm-up: only the head trains, on unaugmented images; the backbone is frozen and in eval mode (its BatchNorm
statistics do not move). Fine-tuning: all layers, a smaller learning rate, AutoAugment. Early stopping on dev
ROC AUC keeps the best model; the decision threshold is fitted on dev (Youden's J).

This step works and is correct, but it is not reproducible, on purpose: no seed (flaw 1), nothing recorded (2),
outputs overwrite each other in results/step_1/ (3), one random split (4), hand-picked hyper-parameters (5),
settings hard-coded in this file (6). Steps 2 to 5 fix them; README.md's flaw ledger says which step fixes which.

Run from the repository root:

    python step_1/download_data.py --synthetic  # the offline stand-in (without --synthetic: the real data)
    python step_1/train.py                      # DenseNet-121, ImageNet weights, 224 px: use a GPU
    python step_1/train.py --quick              # same code path at smoke size on a CPU (times: benchmarks/README.md)
    python step_1/analyze_predictions.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from support import common
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
# Settings: hard-coded on purpose (flaw 6). Change them here and the old values are gone (flaw 2).
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
RESULTS_DIR = Path("results/step_1")  # fixed paths: every run overwrites the last one (flaw 3)


# ----------------------------------------------------------------------------------------------------------
# Data
def stratified_subset(labels: np.ndarray, max_images: int | None) -> np.ndarray:
    """Indices of a class-stratified random subset of at most max_images images (all of them if None)."""
    indices = np.arange(len(labels))
    if max_images is None or max_images >= len(labels):
        return indices
    subset, _ = train_test_split(indices, train_size=max_images, stratify=labels)  # unseeded (flaw 1)
    return np.sort(subset)


def split_train_dev_test(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random stratified train/dev/test split (flaws 1 and 4: unseeded, and only one)."""
    indices = np.arange(len(labels))
    rest, test = train_test_split(indices, test_size=TEST_FRACTION, stratify=labels)
    dev_share = DEV_FRACTION / (1 - TEST_FRACTION)  # of the images left after the test set
    train, dev = train_test_split(rest, test_size=dev_share, stratify=labels[rest])
    return train, dev, test


class PetImages(Dataset):
    """Images and cat labels; AutoAugment on the fly when `augment` is on."""

    def __init__(self, paths: list[Path], labels: np.ndarray, image_size: int, augment: bool) -> None:
        self.paths, self.labels, self.image_size = paths, labels, image_size
        self.images = DecodedImages(paths, image_size)
        self.augment = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET) if augment else None
        self.normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]  # decoded once per process, kept in memory (pets.DecodedImages)
        if self.augment is not None:
            image = self.augment(image)
        image = self.normalize(image.float() / 255)
        return image, torch.tensor(float(self.labels[index]))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, device: torch.device) -> DataLoader:
    """A DataLoader; with num_workers > 0, worker processes decode and augment while the model trains."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
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
    freeze_backbone: bool,
) -> float:
    """One pass over the training images; return the mean loss (the batch bar shows only in a terminal)."""
    model.train()
    if freeze_backbone:
        model.backbone.eval()  # frozen means frozen: BatchNorm running statistics must not move either
    loss_fn = nn.BCEWithLogitsLoss()
    total, count = 0.0, 0
    for images, labels in tqdm(loader, desc="  batches", unit="batch", leave=False, disable=None):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(labels)
        count += len(labels)
    return total / count


@torch.no_grad()
def predict(model: PetClassifier, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, float]:
    """Cat probabilities for every image of the loader, in order, and the mean loss."""
    model.eval()
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    scores, total = [], 0.0
    for images, labels in loader:
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
        train_loss = train_one_epoch(model, loaders["train"], optimizer, device, freeze_backbone=name == "warmup")
        dev_scores, dev_loss = predict(model, loaders["dev"], device)
        dev_auc = roc_auc_score(dev_labels, dev_scores)
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
    train_phase("warmup", model, warmup_loaders, head_optimizer, epochs, epochs, device, best)  # no early stop
    model.backbone.requires_grad_(True)
    all_optimizer = torch.optim.AdamW(model.parameters(), lr=settings.finetune_lr, weight_decay=settings.weight_decay)
    epochs, patience = settings.finetune_epochs, settings.patience
    train_phase("finetune", model, loaders, all_optimizer, epochs, patience, device, best)
    return best


def predictions_table(paths: list[Path], labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """One row per image: file name, label (1 = cat) and predicted cat probability."""
    return pd.DataFrame({"file": [p.name for p in paths], "label": labels, "score": scores})


def save_outputs(model: PetClassifier, loaders: dict[str, DataLoader], scores: dict, summary: dict) -> None:
    """Prediction tables, threshold and metrics, and the weights, to fixed paths (flaw 3: the last run wins)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("dev", "test"):
        table = predictions_table(loaders[name].dataset.paths, loaders[name].dataset.labels, scores[name])
        table.to_csv(RESULTS_DIR / f"{name}_predictions.csv", index=False)
    (RESULTS_DIR / "threshold.json").write_text(json.dumps(summary, indent=2) + "\n")
    torch.save(model.state_dict(), RESULTS_DIR / "model.pt")


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
        return PetImages([paths[i] for i in split[part]], labels[split[part]], settings.image_size, augment)

    loaders = {
        name: make_loader(subset(part, augment), settings.batch_size, shuffle, args.num_workers, device)
        for name, part, augment, shuffle in (
            ("warmup", "train", False, True),  # the frozen warm-up sees the images unaugmented
            ("train", "train", True, True),
            ("dev", "dev", False, False),
            ("test", "test", False, False),
        )
    }
    model = build_model(settings).to(device)
    best = fit(model, loaders, settings, device)
    scores = {name: predict(model, loaders[name], device)[0] for name in ("dev", "test")}
    results = {
        "threshold": fit_threshold(loaders["dev"].dataset.labels, scores["dev"]),
        "dev_roc_auc": best["dev_roc_auc"],
        "test_roc_auc": roc_auc_score(loaders["test"].dataset.labels, scores["test"]),
        "best_phase": best["phase"],
        "best_epoch": best["epoch"],
    }
    save_outputs(model, loaders, scores, {**results, "settings": asdict(settings)})
    return results


# ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags (everything else is hard-coded above)."""
    parser = common.parser(__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke size for a CPU: small backbone, no pretrained weights, 64 px, at most 600 images, few epochs",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/oxfordiii"), help="dataset root")
    common.add_device_flags(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Split the images once, train, pick the threshold on dev, test, and write everything to results/step_1/."""
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    device = common.pick_device(args)  # and --num-workers, when not given, for that device
    started = time.perf_counter()
    common.check_writable(RESULTS_DIR)  # a read-only folder stops here, not after the training, with the model lost

    folder = dataset_folder(args.data_dir)
    warn_if_standin(folder)
    paths, labels = read_annotations(folder)
    paths, labels = drop_undecodable(paths, labels, settings.image_size)
    keep = stratified_subset(labels, settings.max_images)
    paths, labels = [paths[i] for i in keep], labels[keep]
    split = dict(zip(("train", "dev", "test"), split_train_dev_test(labels), strict=True))
    print(
        f"{len(paths)} images: "
        + ", ".join(f"{k} {len(v)}" for k, v in split.items())
        + f" | {settings.backbone} at {settings.image_size} px on {device}"
    )

    results = train_and_evaluate(paths, labels, split, settings, args, device)

    print(
        f"dev ROC AUC {results['dev_roc_auc']:.3f} (best: {results['best_phase']} epoch {results['best_epoch']}), "
        f"test ROC AUC {results['test_roc_auc']:.3f}, threshold {results['threshold']:.3f}, "
        f"{time.perf_counter() - started:.0f} s"
    )
    written = ("dev_predictions.csv", "test_predictions.csv", "threshold.json", "model.pt")
    print("Wrote (and overwrote) " + ", ".join(str(RESULTS_DIR / name) for name in written))
    print(f"Next: {Path(sys.executable).name} step_1/analyze_predictions.py")


if __name__ == "__main__":
    main()
