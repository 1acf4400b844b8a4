"""Reading the Oxford-IIIT Pet images: where they are, their labels, decoding, and the files that do not decode.

The real archive holds files that are not what their name says (PNG and GIF saved as .jpg, grayscale and CMYK
JPEGs, truncated JPEGs, .mat files); the synthetic stand-in plants the same kinds. Every step reads the data
through this module, byte-identical in every step: undecodable files are excluded before any split, and listed.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from tqdm import tqdm

STANDIN_MARKER = "SYNTHETIC.json"  # written only into the synthetic stand-in (download_data.py --synthetic)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation the ImageNet weights expect
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def model_input(path: Path, size: int) -> torch.Tensor:
    """An image as the model takes it unaugmented: decoded at size × size, scaled to [0, 1], normalised as the
    ImageNet weights expect (what the training's image dataset gives for an image it does not augment)."""
    return v2.functional.normalize(load_image(path, size).float() / 255, IMAGENET_MEAN, IMAGENET_STD)


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
