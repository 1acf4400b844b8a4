"""The training core of step 2, with two hooks the later steps need and two speed-ups, byte-identical in steps 3
to 5.

Seeding and determinism, the images (AutoAugment seeded per sample and epoch), the model (an ImageNet backbone
with a new head), the warm-up on the frozen backbone and the fine-tuning with early stopping on dev ROC AUC, the
threshold fitted on dev, the prediction tables and the logged model: `train_and_evaluate` does it all for one
split, in the active MLflow run. The two hooks: `report(epoch, dev_roc_auc)`, through which a search's pruner may
stop a trial (step 4), and a weight decay per phase (step 2 had one for both). The settings are read by name
(duck typing), so the same code serves step 3's constants, step 4's trial values and step 5's config.

The two speed-ups, neither of which changes what a rerun gives: the warm-up trains the head on the frozen
backbone's features, computed once per process for the images and weights it needs (`frozen_features`; step 2 runs
the backbone over the same images every warm-up epoch); and on a CUDA GPU the arithmetic runs in bf16 or fp16
(`Precision`; `--no-amp` keeps fp32). They may move the last bits against step 2's; the bits of a rerun they do
not move.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import os
import random
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Protocol

import mlflow
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from support import common, runs
from support.pets import IMAGENET_MEAN, IMAGENET_STD, DecodedImages, file_stat
from support.provenance import log_image_lists, nondeterminism_reported


class Settings(Protocol):
    """What the training reads from its settings: any object with these attributes will do."""

    backbone: str  # a torchvision classification model name
    pretrained: bool  # start from ImageNet weights
    image_size: int  # images are resized to image_size × image_size
    batch_size: int
    warmup_epochs: int  # head only, backbone frozen
    warmup_lr: float
    warmup_weight_decay: float
    finetune_epochs: int  # all layers
    finetune_lr: float
    finetune_weight_decay: float
    patience: int  # fine-tuning stops after this many epochs without a better dev ROC AUC
    head_hidden: int  # width of the new head's hidden layer
    dropout: float


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


class Precision:
    """How the arithmetic runs: "fp32", or autocast to "bf16" or "fp16" (the latter with a gradient scaler: small fp16
    gradients would round to zero) with channels_last images, which mixed-precision convolutions read fastest. The
    weights stay fp32 either way, and so does the logged model."""

    def __init__(self, device_type: str, name: str) -> None:
        self.device_type, self.name = device_type, name
        self.memory_format = torch.contiguous_format if name == "fp32" else torch.channels_last
        self.scaler = torch.amp.GradScaler(device_type, enabled=name == "fp16")  # for fp32 and bf16: does nothing

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward passes' context: autocast to the chosen type, or nothing for fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16 if self.name == "bf16" else torch.float16)

    def batch(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A batch on the device; a batch of images (4-D) in the memory format chosen."""
        tensor = tensor.to(device, non_blocking=True)
        return tensor.contiguous(memory_format=self.memory_format) if tensor.dim() == 4 else tensor


def choose_precision(device: torch.device, amp: bool) -> Precision:
    """Mixed precision on a CUDA GPU unless --no-amp: bf16 where the GPU has it, else fp16 (a T4's bf16 is emulated,
    slower than fp16); fp32 on other devices, as in step 2. Its name ("bf16", "fp16", "fp32") is logged."""
    if not amp or device.type != "cuda":
        return Precision(device.type, "fp32")
    return Precision("cuda", "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16")


# ----------------------------------------------------------------------------------------------------------
# Data
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
        """Logits of a batch of images; of a batch of the backbone's features (2-D), as the warm-up gives them."""
        features = images if images.dim() == 2 else self.backbone(images)
        return self.head(features).squeeze(1)


def build_model(settings: Settings) -> PetClassifier:
    """The backbone (ImageNet weights when settings.pretrained) with its classifier replaced by our head."""
    backbone = common.load_backbone(settings.backbone, settings.pretrained)
    classifier = "classifier" if hasattr(backbone, "classifier") else "fc"  # DenseNet vs ResNet naming
    n_features = getattr(backbone, classifier).in_features
    setattr(backbone, classifier, nn.Identity())
    return PetClassifier(backbone, n_features, settings.head_hidden, settings.dropout)


# ----------------------------------------------------------------------------------------------------------
# The warm-up's features: the frozen backbone, in eval mode, gives each unaugmented image the same features in
# every epoch and every trial that starts from the same weights. Computed once per process, in the loader's
# batches and order (the last bits of a batch's features depend on what else is in it), and kept by what they
# depend on, they come out the same whether this process computed them or an earlier trial did.
class Features(Dataset):
    """The frozen backbone's features of a dataset's images, with its labels and paths."""

    def __init__(self, features: torch.Tensor, labels: np.ndarray, paths: list[Path] | None) -> None:
        self.features, self.labels, self.paths = features, labels, paths
        self.epoch = 0  # set by the training loop, as on PetImages; features have no augmentation to seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], torch.tensor(float(self.labels[index]))


FEATURES: dict[tuple, torch.Tensor] = {}  # this process's features, by what they depend on (frozen_features)
FEATURES_KEPT = 4  # sets of features (a search's train and dev, ~4 KB an image for DenseNet-121): a few MB


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's weights and buffers, by name: which backbone, which weights."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@torch.no_grad()
def frozen_features(backbone: nn.Module, loaders: dict[str, DataLoader], precision: Precision) -> dict[str, DataLoader]:
    """Loaders of the backbone's features of the loaders' (unaugmented) images, in the same batches and order."""
    backbone.eval()  # frozen means frozen: BatchNorm uses its running statistics and does not move them
    device = next(backbone.parameters()).device
    weights = weights_digest(backbone)
    feature_loaders = {}
    for name, loader in loaders.items():
        dataset = loader.dataset
        if getattr(dataset, "augment", None) is not None:
            raise ValueError(f"frozen_features: the {name} images are augmented, so their features are not constant")
        paths = getattr(dataset, "paths", None)
        files = () if paths is None else tuple((str(p), *file_stat(p)) for p in paths)
        kept = bool(files) and all(length is not None for _, length, _ in files)  # images that are files on disk
        what = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), str(device), precision.name)
        key = (weights, *what, loader.batch_size, getattr(dataset, "image_size", None), files)
        features = FEATURES.get(key) if kept else None
        if features is None:
            in_order = DataLoader(  # its own generator: the global random state is left as it was
                dataset,
                loader.batch_size,
                num_workers=loader.num_workers,
                pin_memory=loader.pin_memory,
                generator=torch.Generator(),
                worker_init_fn=runs.ignore_stop_signals,
            )
            parts = []
            for batch, _ in tqdm(in_order, desc=f"  {name} features", unit="batch", leave=False, disable=None):
                runs.check_stop()
                with precision.autocast():
                    parts.append(backbone(precision.batch(batch, device)).float().cpu())
            features = torch.cat(parts)
            if kept:
                FEATURES[key] = features
                while len(FEATURES) > FEATURES_KEPT:
                    FEATURES.pop(next(iter(FEATURES)))  # the oldest
        generator = torch.Generator()
        if loader.generator is not None:
            generator.set_state(loader.generator.get_state())  # the image loader's shuffling order
        shuffle = isinstance(loader.sampler, torch.utils.data.RandomSampler)
        dataset = Features(features, dataset.labels, paths)
        feature_loaders[name] = DataLoader(dataset, loader.batch_size, shuffle=shuffle, generator=generator)
    return feature_loaders


# ----------------------------------------------------------------------------------------------------------
# Train and evaluate
def train_one_epoch(
    model: PetClassifier,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    freeze_backbone: bool,
    precision: Precision,
) -> float:
    """One pass over the training images; log every step's loss to the active run; return the mean loss."""
    model.train()
    if freeze_backbone:
        model.backbone.eval()  # frozen means frozen: BatchNorm running statistics must not move either
    loss_fn = nn.BCEWithLogitsLoss()
    total, count, losses = 0.0, 0, []
    for images, labels in tqdm(loader, desc="  batches", unit="batch", leave=False, disable=None):
        images, labels = precision.batch(images, device), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = loss_fn(model(images).float(), labels)
        precision.scaler.scale(loss).backward()  # fp16: the loss scaled up, so small gradients do not round to 0
        precision.scaler.step(optimizer)
        precision.scaler.update()
        total += loss.item() * len(labels)
        count += len(labels)
        losses.append(loss.item())
        runs.check_stop()
    runs.log_step_losses(losses, first_step=(epoch - 1) * len(loader))
    return total / count


@torch.no_grad()
def predict(
    model: PetClassifier, loader: DataLoader, device: torch.device, precision: Precision
) -> tuple[np.ndarray, float]:
    """Cat probabilities for every image of the loader, in order, and the mean loss."""
    model.eval()
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    scores, total = [], 0.0
    for images, labels in loader:
        runs.check_stop()
        with precision.autocast():
            logits = model(precision.batch(images, device)).float()
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
    precision: Precision,
    report: Callable[[int, float], None] | None = None,
) -> None:
    """Train for up to `epochs`, keep the state with the best dev ROC AUC in `best`, stop after `patience` misses.

    `report(epoch, dev_roc_auc)` is called after every epoch: a search's pruner may stop the trial there."""
    dev_labels = loaders["dev"].dataset.labels
    misses = 0
    for epoch in (bar := tqdm(range(1, epochs + 1), desc=name, unit="epoch")):
        loaders["train"].dataset.epoch = epoch
        train_loss = train_one_epoch(
            model, loaders["train"], optimizer, device, epoch, freeze_backbone=name == "warmup", precision=precision
        )
        dev_scores, dev_loss = predict(model, loaders["dev"], device, precision)
        dev_auc = roc_auc_score(dev_labels, dev_scores)
        mlflow.log_metrics({"epoch_train_loss": train_loss, "dev_loss": dev_loss, "dev_roc_auc": dev_auc}, step=epoch)
        bar.set_postfix(train_loss=f"{train_loss:.3f}", dev_loss=f"{dev_loss:.3f}", dev_roc_auc=f"{dev_auc:.3f}")
        if report is not None:
            report(epoch, dev_auc)
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


def fit(
    model: PetClassifier,
    loaders: dict[str, DataLoader],
    settings: Settings,
    device: torch.device,
    report: Callable[[int, float], None] | None = None,
    precision: Precision | None = None,
) -> dict:
    """Warm up the head on the frozen backbone, then fine-tune everything; return the best state found.

    `report(epoch, dev_roc_auc)` gets every epoch's dev ROC AUC, fine-tuning epochs counted after the warm-up's.
    `precision` (choose_precision) defaults to fp32."""
    precision = precision or Precision(device.type, "fp32")
    model.to(memory_format=precision.memory_format)
    best: dict = {}
    model.backbone.requires_grad_(False)
    head_optimizer = torch.optim.AdamW(
        model.head.parameters(), lr=settings.warmup_lr, weight_decay=settings.warmup_weight_decay
    )
    epochs = settings.warmup_epochs
    with runs.tracked_run(run_name="warmup", nested=True, tags={"run_level": "phase", "phase": "warmup"}):
        mlflow.log_params(
            {"lr": settings.warmup_lr, "max_epochs": epochs, "trainable": "head", "precision": precision.name}
        )
        # the head trains on the frozen backbone's features of the unaugmented images, computed once
        warmup_loaders = frozen_features(model.backbone, {"train": loaders["warmup"], "dev": loaders["dev"]}, precision)
        train_phase("warmup", model, warmup_loaders, head_optimizer, epochs, epochs, device, best, precision, report)
    model.backbone.requires_grad_(True)
    all_optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.finetune_lr, weight_decay=settings.finetune_weight_decay
    )
    after_warmup = None if report is None else lambda epoch, auc: report(settings.warmup_epochs + epoch, auc)
    epochs, patience = settings.finetune_epochs, settings.patience
    with runs.tracked_run(run_name="finetune", nested=True, tags={"run_level": "phase", "phase": "finetune"}):
        mlflow.log_params(
            {"lr": settings.finetune_lr, "max_epochs": epochs, "trainable": "all", "precision": precision.name}
        )
        train_phase("finetune", model, loaders, all_optimizer, epochs, patience, device, best, precision, after_warmup)
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
        copy.deepcopy(model).cpu().eval().to(memory_format=torch.contiguous_format),  # fp32 weights, plain layout
        name="model",
        input_example=example.numpy(),  # also gives the signature the UI shows
        pip_requirements=[f"torch=={version('torch')}"],  # inferring them instead costs seconds per run
        validate_serving_input=False,  # a reload and prediction; analyze_predictions.py checks far more
    )


def make_loaders(
    paths: list[Path],
    labels: np.ndarray,
    split: dict[str, np.ndarray],
    settings: Settings,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, DataLoader]:
    """Loaders for the parts the split has: a split without "test" gives no test loader."""

    def subset(part: str, augment: bool) -> PetImages:
        return PetImages([paths[i] for i in split[part]], labels[split[part]], settings.image_size, augment, args.seed)

    return {
        name: make_loader(subset(part, augment), settings.batch_size, shuffle, args.num_workers, device)
        for name, part, augment, shuffle in (
            ("warmup", "train", False, True),  # the frozen warm-up sees the images unaugmented
            ("train", "train", True, True),
            ("dev", "dev", False, False),
            ("test", "test", False, False),
        )
        if part in split
    }


def train_and_evaluate(
    paths: list[Path],
    labels: np.ndarray,
    split: dict[str, np.ndarray],
    settings: Settings,
    args: argparse.Namespace,
    device: torch.device,
) -> dict:
    """Train on the split's train images, early-stop and fit the threshold on dev, evaluate once on test."""
    loaders = make_loaders(paths, labels, split, settings, args, device)
    log_image_lists({name: loader.dataset.paths for name, loader in loaders.items()})
    model = build_model(settings).to(device)
    precision = choose_precision(device, args.amp)
    with nondeterminism_reported(device):
        best = fit(model, loaders, settings, device, precision=precision)
        scores = {name: predict(model, loaders[name], device, precision)[0] for name in ("dev", "test")}
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
