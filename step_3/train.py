"""Step 3 — nested cross-validation from an external split file, with statistics across folds.

Descends from step 2 (`diff -u step_2/train.py step_3/train.py`) and fixes its flaw 4, "one random split":
a test ROC AUC from one split says little about how much the result depends on which images happened to land
in the test set. Here the splits come from a file made once by make_dataset_splits.py (nested stratified
k-fold: outer folds hold out a test set, inner folds a dev set), validated whenever it is loaded, and every
chosen fold is trained and evaluated. analyze_predictions.py turns the folds into a mean with a 95% interval.

MLflow (experiment `step_3`): one root run → one run per fold (tags `root_split_id`, `nested_split_id`) →
phase runs (`warmup`, `finetune`). Resume is explicit: the root and fold runs carry a run key (a hash of the
split file, seed and settings); the same command again reopens the root run with that key and skips every fold
whose completion tag is there. Runs left RUNNING by a dead process on this host are marked KILLED first.

Still open: hand-picked hyper-parameters (step 4), hard-coded settings (step 5).

Run from the repository root:

    python step_1/download_data.py --synthetic             # (or without --synthetic: the real data)
    python step_3/make_dataset_splits.py                   # data/oxfordiii/dataset_splits.json, 10 x 10 folds
    python step_3/train.py --quick                         # the first 2 x 2 folds at smoke size on a CPU
    python step_3/train.py --n-root-splits all --n-nested-splits all   # every fold (GPU)
    python step_3/train.py --root-split 3 --nested-split 0 # one fold, e.g. one job of a job array
    python step_3/analyze_predictions.py                   # per-fold metrics, mean and 95% interval
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import torchvision
from mlflow.entities import Metric
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from provenance import log_provenance
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
QUICK = Settings(
    backbone="resnet18",
    pretrained=False,
    image_size=64,
    max_images=600,
    batch_size=32,
    warmup_epochs=2,
    warmup_lr=1e-3,
    finetune_epochs=3,
    finetune_lr=1e-3,
    patience=2,
    weight_decay=1e-4,
    head_hidden=64,
    dropout=0.2,
)

QUICK_SHARES = {"train": 0.70, "dev": 0.15, "test": 0.15}  # --quick: how max_images is shared by a fold's parts
EXPERIMENT = "step_3"  # one MLflow experiment per step
DEFAULT_SEED = 0  # any fixed value works; what matters is that it is fixed and logged
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation the ImageNet weights expect
IMAGENET_STD = (0.229, 0.224, 0.225)
STANDIN_MARKER = "SYNTHETIC.json"  # written by download_data.py --synthetic


# ----------------------------------------------------------------------------------------------------------
# Device
def pick_device(name: str) -> torch.device:
    """Return the requested device; `auto` takes CUDA, then Apple MPS, then the CPU."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
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
    torch.set_num_threads(num_threads)  # float sums are added in a different order with another thread count
    torch.backends.cudnn.benchmark = False  # benchmark mode picks the fastest kernel, which may differ per run
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible matmuls
    # warn_only: an op without a deterministic implementation on this device warns instead of stopping the run;
    # main() reports those ops and tags the run, because such a run is not bit-for-bit reproducible.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling new tensors costs time, adds nothing


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for one sample's augmentation in one epoch, independent of worker processes and batch order."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------------
# Stopping cleanly: Ctrl-C, `timeout`, `kill` and SLURM signal the whole process group. The handler only sets
# a flag; the training loop checks it after every batch and raises, so every MLflow run is closed as KILLED.
# (A handler that raises by itself can fire inside MLflow or DataLoader code and leave runs RUNNING.)
STOP_REQUESTED = threading.Event()


class StopRequested(Exception):
    """Raised by the training loop once a stop signal has arrived."""


def request_stop(signum: int, _frame: object) -> None:
    """Signal handler: remember the request; a second Ctrl-C interrupts at once."""
    STOP_REQUESTED.set()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"\n{signal.Signals(signum).name} received: stopping after this batch", file=sys.stderr, flush=True)


def check_stop() -> None:
    """Raise StopRequested if a stop signal has arrived."""
    if STOP_REQUESTED.is_set():
        raise StopRequested("stopped by a signal")


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker start-up: leave SIGINT and SIGTERM to the main process, which shuts workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def tracked_run(**kwargs: object) -> Iterator[mlflow.ActiveRun]:
    """`mlflow.start_run`, but a run stopped by a signal ends KILLED rather than FAILED."""
    with mlflow.start_run(**kwargs) as run:
        try:
            yield run
        except (StopRequested, KeyboardInterrupt):
            mlflow.end_run("KILLED")
            raise


# ----------------------------------------------------------------------------------------------------------
# Data
def dataset_folder(data_dir: Path) -> Path:
    """Return the `oxford-iiit-pet` folder inside data_dir, or stop with a clear message."""
    folder = data_dir / "oxford-iiit-pet"
    if not (folder / "annotations" / "list.txt").is_file():
        raise SystemExit(
            f"No dataset in {folder} (annotations/list.txt is missing): run "
            f"`python step_1/download_data.py --data-dir {data_dir}` (add --synthetic offline)."
        )
    return folder


def warn_if_standin(folder: Path) -> bool:
    """Say loudly when the data is the synthetic stand-in; return whether it is."""
    if not (folder / STANDIN_MARKER).exists():
        return False
    bar = "!" * 100
    print(
        f"{bar}\n!! {folder} is the SYNTHETIC STAND-IN, not the Oxford-IIIT Pet data. Its results say nothing "
        f"about real pets.\n{bar}",
        flush=True,
    )
    return True


def read_annotations(folder: Path) -> tuple[list[Path], np.ndarray]:
    """Read annotations/list.txt: image paths and labels from the species column (1 = cat, the positive class)."""
    paths, labels = [], []
    for line in (folder / "annotations" / "list.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _class_id, species, _breed_id = line.split()
        paths.append(folder / "images" / f"{name}.jpg")
        labels.append(1 if species == "1" else 0)
    return paths, np.array(labels)


def load_image(path: Path, size: int) -> torch.Tensor:
    """Decode an image file to a 3×size×size uint8 tensor, whatever its real format or colour mode.

    PIL rather than torchvision.io: torchvision's decoders are deprecated since 0.29, and PIL's `draft` lets
    libjpeg decode a JPEG directly at 1/2, 1/4 or 1/8 scale, which makes small images several times cheaper.
    PIL also reads the PNG and GIF files named .jpg and the grayscale and CMYK JPEGs of the real archive.
    """
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # only JPEGs use it; it never goes below the requested size
        rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def is_decodable(path: Path, size: int) -> bool:
    """Whether the whole file decodes (a header check would miss truncated JPEGs)."""
    try:
        load_image(path, size)
    except (OSError, ValueError, SyntaxError):
        return False
    return True


def drop_undecodable(paths: list[Path], labels: np.ndarray, size: int) -> tuple[list[Path], np.ndarray]:
    """Exclude the files that do not decode, before any split, and list them once."""
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # PIL releases the GIL while decoding
        ok = list(
            tqdm(
                pool.map(lambda p: is_decodable(p, size), paths),
                total=len(paths),
                desc="checking images",
                unit="img",
                leave=False,
            )
        )
    bad = [p.name for p, good in zip(paths, ok, strict=True) if not good]
    if bad:
        print(f"Excluded {len(bad)} undecodable file(s): {', '.join(bad)}")
    keep = np.flatnonzero(ok)
    return [paths[i] for i in keep], labels[keep]


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
        if not (0 <= args.root_split < k_root and 0 <= args.nested_split < k_nested):
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
        worker_init_fn=ignore_stop_signals,
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
        check_stop()
    log_step_losses(losses, first_step=(epoch - 1) * len(loader))
    return total / count


def log_step_losses(losses: list[float], first_step: int) -> None:
    """Log the training loss of every step of an epoch to the active run, in one batched write.

    One store round trip per epoch instead of one per step: the training loop never waits for the store.
    """
    now = int(time.time() * 1000)
    metrics = [Metric("train_loss", loss, now, first_step + i) for i, loss in enumerate(losses)]
    mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=metrics)


@torch.no_grad()
def predict(model: PetClassifier, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, float]:
    """Cat probabilities for every image of the loader, in order, and the mean loss."""
    model.eval()
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    scores, total = [], 0.0
    for images, labels in loader:
        check_stop()
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
    with tracked_run(run_name="warmup", nested=True, tags={"run_level": "phase", "phase": "warmup"}):
        mlflow.log_params({"lr": settings.warmup_lr, "max_epochs": settings.warmup_epochs, "trainable": "head"})
        train_phase(
            "warmup",
            model,
            {**loaders, "train": loaders["warmup"]},
            head_optimizer,
            settings.warmup_epochs,
            settings.warmup_epochs,
            device,
            best,
        )
    model.backbone.requires_grad_(True)
    all_optimizer = torch.optim.AdamW(model.parameters(), lr=settings.finetune_lr, weight_decay=settings.weight_decay)
    with tracked_run(run_name="finetune", nested=True, tags={"run_level": "phase", "phase": "finetune"}):
        mlflow.log_params({"lr": settings.finetune_lr, "max_epochs": settings.finetune_epochs, "trainable": "all"})
        train_phase(
            "finetune", model, loaders, all_optimizer, settings.finetune_epochs, settings.patience, device, best
        )
    return best


def save_predictions(path: Path, paths: list[Path], labels: np.ndarray, scores: np.ndarray) -> None:
    """Write one row per image: file name, label (1 = cat) and predicted cat probability."""
    pd.DataFrame({"file": [p.name for p in paths], "label": labels, "score": scores}).to_csv(path, index=False)


# ----------------------------------------------------------------------------------------------------------
# Resume: find the work already done, through MLflow alone
def run_key(*parts: object) -> str:
    """A short hash of everything that decides a run's results (split file, seed, settings)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def sweep_dead_runs(client: mlflow.MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs whose process (tags host, pid; children inherit their parent's) is dead.

    Only processes on this host can be checked; a run of a live process, or of another host, is left alone.
    """
    running = {r.info.run_id: r for r in client.search_runs([experiment_id], "attributes.status = 'RUNNING'")}
    killed = []
    for run_id, run in running.items():
        owner = run
        while "pid" not in owner.data.tags and owner.data.tags.get("mlflow.parentRunId"):
            owner = client.get_run(owner.data.tags["mlflow.parentRunId"])
        tags = owner.data.tags
        if tags.get("host") == socket.gethostname() and "pid" in tags and not pid_alive(int(tags["pid"])):
            client.set_terminated(run_id, "KILLED")
            killed.append(run_id)
    if killed:
        print(f"Marked KILLED {len(killed)} run(s) left RUNNING by a process that no longer exists")
    return killed


def completed_folds(client: mlflow.MlflowClient, experiment_id: str, key: str) -> set[tuple[int, int]]:
    """Folds of this run key whose completion tag is there (a FINISHED status alone proves nothing)."""
    runs = client.search_runs(
        [experiment_id], f"tags.run_level = 'fold' AND tags.run_key = '{key}' AND tags.fold_complete = 'true'"
    )
    return {(int(r.data.tags["root_split_id"]), int(r.data.tags["nested_split_id"])) for r in runs}


def find_root_run(client: mlflow.MlflowClient, experiment_id: str, key: str) -> str | None:
    """The id of the latest root run with this run key, if any."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.run_level = 'root' AND tags.run_key = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


# ----------------------------------------------------------------------------------------------------------
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
        type=int,
        help="DataLoader worker processes; when not given, 0 on a CPU (workers would compete with the model for "
        "the cores) and 4 on a GPU (it needs images faster than one process decodes them)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the split, weights and augmentation")
    parser.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="deterministic algorithms only (bit-for-bit reruns; on a GPU somewhat slower)",
    )
    parser.add_argument(
        "--num-threads", type=int, default=os.cpu_count(), help="torch CPU threads (another count, other bits)"
    )
    parser.add_argument(
        "--split-file", type=Path, help="from make_dataset_splits.py (default: DATA_DIR/dataset_splits.json)"
    )
    parser.add_argument("--n-root-splits", default="2", help="run the first N outer folds ('all': every one)")
    parser.add_argument("--n-nested-splits", default="2", help="and in each, the first N inner folds ('all')")
    parser.add_argument("--root-split", type=int, help="run only this outer fold (with --nested-split)")
    parser.add_argument("--nested-split", type=int, help="run only this inner fold (with --root-split)")
    return parser.parse_args(argv)


def log_outputs(model: PetClassifier, loaders: dict[str, DataLoader], scores: dict[str, np.ndarray]) -> None:
    """Prediction tables and the kept model's weights as artifacts of the active run (no file outside MLflow)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("dev", "test"):
            path = Path(tmp) / f"{name}_predictions.csv"
            save_predictions(path, loaders[name].dataset.paths, loaders[name].dataset.labels, scores[name])
            mlflow.log_artifact(str(path), "predictions")
        torch.save(model.state_dict(), Path(tmp) / "state_dict.pt")
        mlflow.log_artifact(str(Path(tmp) / "state_dict.pt"), "model")


def run_fold(
    fold: tuple[int, int], splits: dict, settings: Settings, args: argparse.Namespace, device: torch.device, key: str
) -> float:
    """Train and evaluate one fold in its own MLflow run; its completion tag is the last thing written."""
    root_split, nested_split = fold
    # Every fold starts from the same seeded state, so its result does not depend on which folds ran before it
    # in this process: a resumed experiment gives the same per-fold numbers as an uninterrupted one.
    seed_everything(args.seed, args.deterministic, args.num_threads)
    parts = fold_indices(splits, root_split, nested_split, settings.max_images, args.seed)
    files, labels = splits["files"], splits["labels"]
    loaders = {
        name: make_loader(
            PetImages([files[i] for i in parts[part]], labels[parts[part]], settings.image_size, augment, args.seed),
            settings.batch_size,
            shuffle,
            args.num_workers,
            device,
            args.seed,
        )
        for name, part, augment, shuffle in (
            ("warmup", "train", False, True),
            ("train", "train", True, True),
            ("dev", "dev", False, False),
            ("test", "test", False, False),
        )
    }
    tags = {
        "run_level": "fold",
        "root_split_id": str(root_split),
        "nested_split_id": str(nested_split),
        "run_key": key,
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
    }
    with tracked_run(run_name=f"fold-{root_split}-{nested_split}", nested=True, tags=tags):
        mlflow.log_params(
            {
                "seed": args.seed,
                "num_threads": torch.get_num_threads(),
                "num_workers": args.num_workers,
                **{f"n_{name}": len(parts[name]) for name in ("train", "dev", "test")},
            }
        )
        model = build_model(settings).to(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("always", message=".*does not have a deterministic implementation.*")
            best = fit(model, loaders, settings, device)
            scores = {name: predict(model, loaders[name], device)[0] for name in ("dev", "test")}
        nondeterministic = sorted(
            {str(w.message).split(" does not")[0] for w in caught if "deterministic implementation" in str(w.message)}
        )
        if nondeterministic:
            print(
                f"Not bit-for-bit reproducible on {device}: no deterministic kernel for {', '.join(nondeterministic)}",
                file=sys.stderr,
            )
            mlflow.set_tag("nondeterministic_ops", ", ".join(nondeterministic))
        threshold = fit_threshold(loaders["dev"].dataset.labels, scores["dev"])
        test_auc = roc_auc_score(loaders["test"].dataset.labels, scores["test"])
        mlflow.log_metrics({"dev_roc_auc": best["dev_roc_auc"], "test_roc_auc": test_auc, "threshold": threshold})
        mlflow.set_tags({"best_phase": best["phase"], "best_epoch": str(best["epoch"])})
        log_outputs(model, loaders, scores)
        mlflow.set_tag("fold_complete", "true")  # the last action: FINISHED alone does not prove completion
    print(
        f"fold {root_split}/{nested_split} complete: dev ROC AUC {best['dev_roc_auc']:.3f}, test ROC AUC {test_auc:.3f}"
    )
    return test_auc


def main(argv: list[str] | None = None) -> None:
    """Train and evaluate the chosen folds of the split file, each in its own MLflow run under one root run."""
    args = parse_args(argv)
    settings = QUICK if args.quick else FULL
    device = pick_device(args.device)
    if args.num_workers is None:
        args.num_workers = 0 if device.type == "cpu" else 4
    seed_everything(args.seed, args.deterministic, args.num_threads)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)
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
    key = run_key(splits["digest"], args.seed, args.deterministic, asdict(settings))
    print(f"{len(folds)} fold(s) of {split_file} | {settings.backbone} at {settings.image_size} px on {device}")

    experiment_id = mlflow.set_experiment(EXPERIMENT).experiment_id
    client = mlflow.MlflowClient()
    sweep_dead_runs(client, experiment_id)
    done = completed_folds(client, experiment_id, key)
    root_id = find_root_run(client, experiment_id, key)
    try:
        with tracked_run(run_id=root_id, run_name=f"{settings.backbone}-seed{args.seed}") as root:
            print(f"MLflow run {'reopened' if root_id else 'started'}: {root.info.run_id} (experiment {EXPERIMENT})")
            mlflow.set_tags({"host": socket.gethostname(), "pid": str(os.getpid())})
            if root_id is None:  # a new root: record what defines it once (params cannot change later)
                mlflow.set_tags(
                    {
                        "run_level": "root",
                        "run_key": key,
                        "split_file": str(split_file),
                        "split_file_digest": splits["digest"],
                    }
                )
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
                log_provenance(
                    Path(__file__).resolve().parent,
                    device,
                    folder,
                    splits["files"],
                    is_standin,
                    digest=splits["meta"]["dataset_digest"],  # load_splits just checked it against the data
                )
                mlflow.log_artifact(str(split_file), "splits")
            for fold in folds:
                if fold in done:
                    print(f"fold {fold[0]}/{fold[1]} already complete: skipped")
                    continue
                run_fold(fold, splits, settings, args, device, key)
            mlflow.set_tag("run_complete", "true")  # every fold this command asked for is complete
    except StopRequested:
        raise SystemExit(
            f"Stopped by a signal: run {root.info.run_id} and its open fold and phase runs were marked KILLED; "
            "the same command resumes, skipping the completed folds."
        ) from None

    print(f"{len(folds)} fold(s) complete in {time.perf_counter() - started:.0f} s")
    print(f"Tracking URI: {mlflow.get_tracking_uri()}\nRoot run: {root.info.run_id}")
    print(
        "View it: `mlflow ui` from this directory (or with --backend-store-uri set to the tracking URI), then "
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{root.info.run_id}"
    )
    print(f"Next: {Path(sys.executable).name} step_3/analyze_predictions.py")


if __name__ == "__main__":
    main()
