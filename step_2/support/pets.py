"""Reading the Oxford-IIIT Pet images: where they are, their labels, decoding, and the files that do not decode.

The real archive holds files that are not what their name says (PNG and GIF saved as .jpg, grayscale and CMYK
JPEGs, truncated JPEGs, .mat files); the synthetic stand-in plants the same kinds. Every step reads the data
through this module, byte-identical in every step: undecodable files are excluded before any split, and listed.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from tqdm import tqdm

STANDIN_MARKER = "SYNTHETIC.json"  # written only into the synthetic stand-in (download_data.py --synthetic)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation the ImageNet weights expect
IMAGENET_STD = (0.229, 0.224, 0.225)
# open_image refuses an image over Pillow's limit itself, in one sentence: Pillow's warning would only repeat it
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


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


class TooLarge(ValueError):
    """An image with more pixels than Pillow decodes safely: refused before a pixel is decoded (one sentence)."""


def header_size(source: Path | IO[bytes]) -> tuple[int, int] | None:
    """An image's width and height from its header alone: Pillow refuses an image over twice its limit without
    saying them. None when no format reads the header."""
    with contextlib.ExitStack() as stack:
        file = stack.enter_context(open(source, "rb")) if isinstance(source, str | os.PathLike) else source
        file.seek(0)
        prefix = file.read(16)
        for factory, accept in list(Image.OPEN.values()):  # the formats Pillow tried: the one that refused is there
            accepted = accept is None or accept(prefix)  # as Image.open asks: a str is a reason to decline
            if accepted and not isinstance(accepted, str):
                file.seek(0)
                with contextlib.suppress(OSError, ValueError, SyntaxError):  # not this format after all
                    return factory(file, "").size
    return None


def open_image(source: Path | IO[bytes]) -> Image.Image:
    """Image.open, but an image with more pixels than Pillow decodes safely (Image.MAX_IMAGE_PIXELS, 89 million in
    Pillow 13) is refused with TooLarge before any pixel is decoded: a decompression bomb (a tiny file that decodes
    to gigabytes) or a photo far larger than any model input. Pillow itself only warns up to twice that limit."""
    name = str(source) if isinstance(source, str | os.PathLike) else "The image"
    limit = Image.MAX_IMAGE_PIXELS
    try:
        image = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # over twice the limit (or warnings on)
        size = header_size(source)
    else:
        if limit is None or image.width * image.height <= limit:
            return image
        size = image.size
        image.close()
    what = "has more pixels" if size is None else f"is {size[0]} x {size[1]} pixels, more"
    raise TooLarge(
        f"{name} {what} than Pillow decodes safely ({limit:,} pixels): a decompression bomb, or a photo to scale "
        "down first."
    )


def load_image(path: Path | IO[bytes], size: int) -> torch.Tensor:
    """Decode an image file to a 3×size×size uint8 tensor, whatever its real format or colour mode.

    PIL rather than torchvision.io: torchvision's decoders are deprecated since 0.29, and PIL's `draft` lets
    libjpeg decode a JPEG directly at 1/2, 1/4 or 1/8 scale, which makes small images several times cheaper.
    PIL also reads the PNG and GIF files named .jpg and the grayscale and CMYK JPEGs of the real archive. An image
    over Pillow's pixel limit is refused (TooLarge), not decoded.
    """
    with open_image(path) as image:
        image.draft("RGB", (size, size))  # only JPEGs use it; it never goes below the requested size
        rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


DECODED_LIMIT = 2 * 2**30  # bytes of decoded images kept per process: the 7,349 images at 224 px take 1.1 GB
_decoded: dict[tuple, torch.Tensor] = {}  # (path, size, file size, modification time) -> 3×size×size uint8


class DecodedImages:
    """The images of `paths` decoded at size × size, once per process: every dataset, epoch and trial of a process
    that reads the same file at the same size gets the same uint8 tensor, decoded the first time by a thread pool
    (PIL releases the GIL). A file whose size or modification time changed is decoded again. Beyond
    DECODED_LIMIT bytes (2 GiB) images are decoded when read, as without this cache; the bytes are the same."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size
        keys = [(str(p), size, *file_stat(p)) for p in paths]
        todo = [i for i, key in enumerate(keys) if key not in _decoded and key[2] is not None]
        used = sum(image.numel() for image in _decoded.values())
        todo = todo[: max(0, (DECODED_LIMIT - used) // (3 * size * size))]
        with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            for i, image in zip(todo, pool.map(lambda i: load_image(paths[i], size), todo), strict=True):
                _decoded[keys[i]] = image
        self.images = [_decoded.get(key) for key in keys]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        return load_image(self.paths[index], self.size) if image is None else image


def model_input(path: Path, size: int) -> torch.Tensor:
    """An image as the model takes it unaugmented: decoded at size × size, scaled to [0, 1], normalised as the
    ImageNet weights expect (what the training's image dataset gives for an image it does not augment)."""
    return v2.functional.normalize(load_image(path, size).float() / 255, IMAGENET_MEAN, IMAGENET_STD)


def is_decodable(path: Path, size: int) -> bool:
    """Whether the whole file decodes (a header check would miss truncated JPEGs); False for one over Pillow's
    pixel limit, which is not decoded at all."""
    try:
        load_image(path, size)
    except (OSError, ValueError, SyntaxError):  # TooLarge is a ValueError
        return False
    return True


def too_large(path: Path) -> str | None:
    """The sentence refusing a file over Pillow's pixel limit (read from its header); None for any other file."""
    try:
        open_image(path).close()
    except TooLarge as error:
        return str(error)
    except (OSError, ValueError, SyntaxError):  # gone, or not an image: it is excluded for that
        pass
    return None


CHECKS_FILE = ".image_checks.json"  # in the dataset folder: which files decoded, by file size and modification time


def file_stat(path: Path) -> tuple[int | None, int | None]:
    """A file's byte count and modification time (ns): what tells a changed file; (None, None) when it is gone."""
    try:
        stat = path.stat()
    except OSError:
        return None, None
    return stat.st_size, stat.st_mtime_ns


def file_key(path: Path, size: int) -> str | None:
    """What a check of `path` at `size` depends on: its name, byte count and modification time (None: no file)."""
    length, modified = file_stat(path)
    return None if length is None else f"{path.name} {length} {modified} {size}"


def drop_undecodable(paths: list[Path], labels: np.ndarray, size: int) -> tuple[list[Path], np.ndarray]:
    """Exclude the files that do not decode, before any split, and list them once.

    Decoding every image takes seconds (7,349 of them: ~2.7 s on 2 cores), so the outcomes are kept in CHECKS_FILE
    in the dataset folder and reused while a file's size and modification time stay the same; a new or changed
    file is decoded again. A folder that cannot be written to is checked in full every time."""
    store = paths[0].parent.parent / CHECKS_FILE if paths else None
    try:
        known = json.loads(store.read_text()) if store else {}
    except (OSError, ValueError):  # none yet, or unreadable: check every file
        known = {}
    known = known if isinstance(known, dict) else {}
    keys = [file_key(p, size) for p in paths]
    todo = [i for i, key in enumerate(keys) if key is None or key not in known]
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # PIL releases the GIL while decoding
        checked = list(
            tqdm(
                pool.map(lambda i: is_decodable(paths[i], size), todo),
                total=len(todo),
                desc="checking images",
                unit="img",
                leave=False,
                disable=not todo or None,
            )
        )
    known.update({keys[i]: good for i, good in zip(todo, checked, strict=True) if keys[i] is not None})
    ok = [key is not None and known[key] is True for key in keys]  # a file that is gone is excluded too
    if todo and store is not None:
        save_checks(store, known)
    bad = [p for p, good in zip(paths, ok, strict=True) if not good]
    if bad:
        print(f"Excluded {len(bad)} undecodable file(s): {', '.join(p.name for p in bad)}")
        for sentence in filter(None, map(too_large, bad)):  # header reads only: why a large one was not decoded
            print(f"  {sentence}")
    keep = np.flatnonzero(ok)
    return [paths[i] for i in keep], labels[keep]


def save_checks(store: Path, checks: dict[str, bool]) -> None:
    """Write the checks atomically (a temporary file renamed over the old one); skip it where that is not allowed."""
    temporary = store.with_name(f"{store.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(checks, sort_keys=True))
        os.replace(temporary, store)
    except OSError:  # a read-only dataset: fine, only slower
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
