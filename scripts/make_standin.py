"""Build an offline synthetic stand-in for the Oxford-IIIT Pet dataset, in torchvision's layout.

Run from the repository root (every step's download_data.py --synthetic hands over to this script):

    python scripts/make_standin.py                          # 7,349 images, as many as the real: ~30 s on 2 cores
    python scripts/make_standin.py --n-images 240 --seed 1  # a small stand-in, as in the tests

It writes <data-dir>/oxford-iiit-pet/{images,annotations} like the real download, plus the marker
oxford-iiit-pet/SYNTHETIC.json, assembled in a temporary folder and renamed into place only when complete.
A stand-in built with the same options is kept; one built with other options is rebuilt; a dataset without
the marker (the real one) is replaced only with --force.

The stand-in is NOT the pets. Its difficulty is known by construction: cats and dogs differ by overlapping
cues (body hue: cats warmer, dogs cooler; shape: pointed ears and a slim body vs floppy ears and a round body),
drawn over cluttered backgrounds with noise, and a fraction P_SWAP of each class is drawn with the other class's
look, so the best ROC AUC is about 1 - P_SWAP. It also plants the real archive's defects: a PNG, a GIF, a
grayscale and a CMYK JPEG named .jpg, a truncated JPEG, .mat files among the images, images no annotation file
lists. The same options give byte-identical files, whatever the number of processes drawing them.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import math
import os
import shutil
import sys
import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "step_1"))  # every step holds the same support/common.py
from support.common import int_in  # noqa: E402

# -----------------------------------------------------------------------------
# Settings
DATASET_FOLDER = "oxford-iiit-pet"  # torchvision's folder under --data-dir, for real data and stand-in
MARKER_NAME = "SYNTHETIC.json"  # present only in a stand-in: how every script tells the two apart
GENERATOR_VERSION = 1  # bump whenever the drawing changes, so that stand-ins built before are rebuilt
P_SWAP = 0.1  # fraction of each class drawn with the other class's look: the best ROC AUC is about 1 - P_SWAP
# Listed images per breed in the real trainval.txt + test.txt, in class-id order; cat breeds are capitalised.
REAL_COUNTS = {
    "Abyssinian": 198,
    "american_bulldog": 200,
    "american_pit_bull_terrier": 200,
    "basset_hound": 200,
    "beagle": 200,
    "Bengal": 200,
    "Birman": 200,
    "Bombay": 184,
    "boxer": 199,
    "British_Shorthair": 200,
    "chihuahua": 200,
    "Egyptian_Mau": 190,
    "english_cocker_spaniel": 196,
    "english_setter": 200,
    "german_shorthaired": 200,
    "great_pyrenees": 200,
    "havanese": 200,
    "japanese_chin": 200,
    "keeshond": 199,
    "leonberger": 200,
    "Maine_Coon": 200,
    "miniature_pinscher": 200,
    "newfoundland": 196,
    "Persian": 200,
    "pomeranian": 200,
    "pug": 200,
    "Ragdoll": 200,
    "Russian_Blue": 200,
    "saint_bernard": 200,
    "samoyed": 200,
    "scottish_terrier": 199,
    "shiba_inu": 200,
    "Siamese": 199,
    "Sphynx": 200,
    "staffordshire_bull_terrier": 189,
    "wheaten_terrier": 200,
    "yorkshire_terrier": 200,
}
BREEDS = sorted(REAL_COUNTS, key=str.lower)  # class ids 1..37: alphabetical, ignoring case, as in list.txt
REAL_TOTAL, REAL_TRAINVAL = 7349, 3680  # official list.txt and trainval.txt sizes (test.txt has 3,669)
MIN_IMAGES = len(BREEDS)  # one image per breed: with fewer, some of the 37 classes would be missing
MAX_SEED = 2**32 - 1  # --seed from 0 to this: the range every NumPy seeding API accepts
LIST_HEADER = [  # the real list.txt's header, its typos included
    "#Image CLASS-ID SPECIES BREED ID",
    "#ID: 1:37 Class ids",
    "#SPECIES: 1:Cat 2:Dog",
    "#BREED ID: 1-25:Dog 1:12:Cat",
    "#All images with 1st letter as captial are cat images",
    "#images with small first letter are dog images",
]
WIDTHS, HEIGHTS = (400, 500), (300, 500)  # pixel ranges around the real photos' typical 500 x 375
ANIMAL_SCALE = (0.32, 0.5)  # body length / shorter side: big enough for the cues to survive 64 px
CAT_WARMTH, DOG_WARMTH = (0.0, 0.6), (0.4, 1.0)  # 0 = orange, 1 = blue; they overlap: hue alone is not enough
EAR_TRIANGLE = ((0.15, -0.5), (0.95, -0.3), (0.7, -1.9))  # a cat's ear, in head radii from the head's centre
NOISE_SIGMA = (2.0, 10.0)  # per-image pixel noise, in 0-255 units
JPEG_QUALITY = (75, 96)  # per image, like photos from different cameras (upper bound exclusive)
# One listed file of each impostor the real archive holds under a .jpg name (only the last fails to decode):
LISTED_DEFECTS = ("png_named_jpg", "gif_named_jpg", "grayscale_jpeg", "cmyk_jpeg", "truncated_jpeg")
N_MAT_FILES, N_UNLISTED = 3, 3  # the real images/ folder also holds .mat files and images no list mentions
FAKE_MAT = b"MATLAB 5.0 MAT-file, stand-in placeholder".ljust(116) + bytes(8) + b"\0\1IM"  # a .mat header
CHUNK_SIZE = 16  # images per task handed to a worker process
BANNER = "SYNTHETIC STAND-IN, NOT THE OXFORD-IIIT PET DATASET: results on it are not results on the real pets."


# -----------------------------------------------------------------------------
# Planning the stand-in: which files, which labels, which split, which look, which defects
def apportion(total: int, weights: list[int]) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainder), so that the parts sum to `total`."""
    quotas = [weight * total / sum(weights) for weight in weights]
    parts = [math.floor(quota) for quota in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: parts[i] - quotas[i])  # stable: ties keep order
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def breed_counts(n_images: int) -> list[int]:
    """Listed images per breed, in BREEDS order: the real counts scaled to `n_images`, each at least one."""
    counts = apportion(n_images, [REAL_COUNTS[breed] for breed in BREEDS])
    while min(counts) == 0:  # only for small n_images: move one image over from the largest breed
        counts[counts.index(max(counts))] -= 1
        counts[counts.index(0)] += 1
    return counts


def species_of(breed: str) -> int:
    """The species column of the annotation files: 1 = cat (capitalised breed names), 2 = dog."""
    return 1 if breed[0].isupper() else 2


def plan_standin(n_images: int, seed: int) -> tuple[list[tuple], set[str], list[tuple], dict]:
    """Decide everything but the pixels: annotation rows, trainval names, images to draw, and the marker."""
    rng = np.random.default_rng([seed, 0])  # stream (0,) plans; stream (1, index) draws image `index`
    counts = breed_counts(n_images)
    n_trainval = apportion(round(n_images * REAL_TRAINVAL / REAL_TOTAL), counts)
    rows, trainval = [], set()  # rows: (name, class id, species, breed id within species)
    for class_id, breed in enumerate(BREEDS, 1):
        same_species = [other for other in BREEDS if species_of(other) == species_of(breed)]
        names = [f"{breed}_{number}" for number in range(1, counts[class_id - 1] + 1)]
        rows += [(name, class_id, species_of(breed), same_species.index(breed) + 1) for name in names]
        trainval.update(names[i] for i in rng.permutation(len(names))[: n_trainval[class_id - 1]])
    swapped = set()
    for species in (1, 2):
        members = [row[0] for row in rows if row[2] == species]
        swapped.update(rng.choice(members, round(P_SWAP * len(members)), replace=False).tolist())
    chosen = rng.choice(n_images, len(LISTED_DEFECTS), replace=False)
    defect_of = {rows[i][0]: kind for i, kind in zip(chosen, LISTED_DEFECTS, strict=True)}
    mat_names = [rows[i][0] for i in rng.choice(n_images, N_MAT_FILES, replace=False)]
    unlisted = [f"{BREEDS[i]}_{counts[i] + 1}" for i in rng.choice(len(BREEDS), N_UNLISTED, replace=False)]
    # One spec per image file: (random-stream index, name, look drawn, defect or None, listed or not)
    looks = {1: "cat", 2: "dog"}
    specs = [
        (i, name, looks[3 - species if name in swapped else species], defect_of.get(name), True)
        for i, (name, _, species, _) in enumerate(rows)
    ]
    specs += [(n_images + k, name, looks[species_of(name)], None, False) for k, name in enumerate(unlisted)]
    defects = [{"file": f"images/{name}.jpg", "kind": kind} for name, kind in defect_of.items()]
    defects += [{"file": f"images/{name}.mat", "kind": "mat_file"} for name in mat_names]
    defects += [{"file": f"images/{name}.jpg", "kind": "unlisted_image"} for name in unlisted]
    marker = {
        **standin_options(n_images, seed),
        "statement": "This is a synthetic stand-in drawn by step_1/download_data.py --synthetic, NOT the "
        "Oxford-IIIT Pet dataset: results on it are not results on the real pets.",
        "auc_ceiling": round(1 - P_SWAP, 6),
        "counts": {"list": n_images, "trainval": len(trainval), "test": n_images - len(trainval)},
        "defects": sorted(defects, key=lambda defect: (defect["kind"], defect["file"])),
        "swapped_images": sorted(swapped),
    }
    return rows, trainval, specs, marker


def standin_options(n_images: int, seed: int) -> dict:
    """The options that decide a stand-in's bytes: a stand-in whose marker records the same ones is kept."""
    return {"generator_version": GENERATOR_VERSION, "n_images": n_images, "p_swap": P_SWAP, "seed": seed}


# -----------------------------------------------------------------------------
# Drawing one image
def hsv(hue_degrees: float, saturation: float, value: float) -> tuple[int, int, int]:
    """An RGB colour from a hue in degrees and a saturation and value in [0, 1]."""
    red, green, blue = colorsys.hsv_to_rgb((hue_degrees % 360) / 360, saturation, value)
    return round(255 * red), round(255 * green), round(255 * blue)


def draw_background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A random backdrop (gradient, blotchy texture or stripes) with clutter shapes of any colour on top."""
    colours = [hsv(rng.uniform(0, 360), rng.uniform(0, 0.35), rng.uniform(0.3, 0.95)) for _ in "ab"]
    angle, small = rng.uniform(0, 2 * math.pi), (width // 4, height // 4)  # the mix is drawn at 1/4 size
    xs, ys = np.arange(small[0], dtype=np.float32), np.arange(small[1], dtype=np.float32)[:, None]
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    kind = rng.integers(3)
    if kind == 0:  # gradient
        mix = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    elif kind == 1:  # blotchy texture: coarse noise blown up
        mix = rng.random((rng.integers(3, 12), rng.integers(3, 12)))
    else:  # stripes: a triangle wave, plain arithmetic (unlike np.sin) gives the same bits on every CPU
        mix = np.abs(2 * ((ramp * 4 * rng.uniform(0.004, 0.025) + rng.uniform()) % 1) - 1)
    mask = Image.fromarray((mix * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    image = Image.composite(
        Image.new("RGB", (width, height), colours[1]), Image.new("RGB", (width, height), colours[0]), mask
    )
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 8)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        size = rng.uniform(0.04, 0.15) * min(width, height)
        box = (x - size, y - size * rng.uniform(0.3, 1), x + size, y + size * rng.uniform(0.3, 1))
        colour = hsv(rng.uniform(0, 360), rng.uniform(0, 0.6), rng.uniform(0.2, 0.95))
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([tuple(point) for point in rng.uniform(-size, size, (3, 2)) + (x, y)], fill=colour)
    return image


def draw_animal(rng: np.random.Generator, look: str, body: float) -> Image.Image:
    """A cartoon pet facing right on a transparent square: the look sets its hue, ears and build."""
    cat = look == "cat"
    warmth = rng.uniform(*(CAT_WARMTH if cat else DOG_WARMTH))
    fur = hsv(35 - 160 * warmth, rng.uniform(0.5, 0.9), rng.uniform(0.6, 0.95))  # orange, red, magenta, blue
    dark = tuple(int(channel * 0.55) for channel in fur)
    side = int(body * 2.2)
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    c, u = side / 2, body
    half_height = u * (0.19 if cat else 0.29) * rng.uniform(0.9, 1.1)  # cats slim, dogs round
    leg_width, leg_length = u * (0.07 if cat else 0.11), u * rng.uniform(0.25, 0.35)
    for offset in (-0.36, -0.22, 0.2, 0.34):
        x = c + offset * u
        draw.rectangle((x - leg_width / 2, c, x + leg_width / 2, c + half_height + leg_length), fill=fur)
    if cat:  # a long tail curling up
        tail = [(c - 0.45 * u, c), (c - 0.68 * u, c - 0.12 * u), (c - 0.74 * u, c - 0.45 * u)]
        draw.line(tail, fill=fur, width=max(2, int(0.06 * u)), joint="curve")
    else:  # a short, thick one
        draw.line([(c - 0.42 * u, c - 0.05 * u), (c - 0.6 * u, c - 0.25 * u)], fill=fur, width=int(0.1 * u))
    draw.ellipse((c - u / 2, c - half_height, c + u / 2, c + half_height), fill=fur)
    r = u * (0.2 if cat else 0.24)
    hx, hy = c + 0.5 * u, c - half_height - 0.05 * u
    if cat:  # pointed triangular ears, drawn behind the head
        for s in (-1, 1):
            draw.polygon([(hx + s * dx * r, hy + dy * r) for dx, dy in EAR_TRIANGLE], fill=fur)
    draw.ellipse((hx - r, hy - r, hx + r, hy + r), fill=fur)
    if not cat:  # floppy ears hanging down the sides of the head, and a muzzle
        for s in (-1, 1):
            draw.ellipse((hx + s * r - 0.3 * r, hy - 0.7 * r, hx + s * r + 0.3 * r, hy + 0.9 * r), fill=dark)
        draw.ellipse((hx - 0.1 * r, hy + 0.1 * r, hx + 1.3 * r, hy + 0.75 * r), fill=fur)
    for s in (-1, 1):  # eyes, then the nose
        eye_x = hx + s * 0.4 * r
        draw.ellipse((eye_x - 0.11 * r, hy - 0.3 * r, eye_x + 0.11 * r, hy - 0.08 * r), fill=(20, 20, 20))
    nose_x = hx + (0.0 if cat else 1.15) * r
    draw.ellipse((nose_x - 0.12 * r, hy + 0.2 * r, nose_x + 0.12 * r, hy + 0.4 * r), fill=(30, 20, 20))
    return layer


def render_photo(rng: np.random.Generator, look: str) -> tuple[Image.Image, Image.Image]:
    """One stand-in photo and its trimap (1 = pet, 2 = background, 3 = border)."""
    width, height = int(rng.integers(WIDTHS[0], WIDTHS[1] + 1)), int(rng.integers(HEIGHTS[0], HEIGHTS[1] + 1))
    photo = draw_background(rng, width, height)
    animal = draw_animal(rng, look, rng.uniform(*ANIMAL_SCALE) * min(width, height))
    if rng.random() < 0.5:
        animal = animal.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = rng.uniform(-25, 25)
    animal = animal.crop(animal.getbbox()).rotate(angle, Image.Resampling.BILINEAR, expand=True)
    x = int(rng.uniform(0.3, 0.7) * width - animal.width / 2)
    y = int(rng.uniform(0.35, 0.65) * height - animal.height / 2)
    alpha = animal.getchannel("A")
    photo.paste(animal, (x, y), alpha)
    mask = Image.new("L", (width, height), 0)
    mask.paste(alpha, (x, y))
    pet = mask.point([0] * 128 + [255] * 128)
    trimap = pet.filter(ImageFilter.BoxBlur(2)).point([2] + [3] * 254 + [1])  # 3 where a 5x5 box is mixed
    noise = (rng.standard_normal((height, width), np.float32) * rng.uniform(*NOISE_SIGMA) + 128).clip(0, 255)
    noise = Image.fromarray(noise.astype(np.uint8)).convert("RGB")  # sensor noise, the same in every channel
    gain = rng.uniform(0.8, 1.15)  # lighting, applied as a lookup table
    lighting = [min(255, round(value * gain)) for value in range(256)]
    photo = ImageChops.add(photo.point(lighting * 3), noise, offset=-128)
    return photo, trimap


def encode(photo: Image.Image, defect: str | None, quality: int) -> bytes:
    """The bytes of one `.jpg` file: a plain JPEG, or one of the real archive's impostors if `defect` asks."""
    buffer = io.BytesIO()
    if defect == "png_named_jpg":
        photo.save(buffer, format="PNG")
    elif defect == "gif_named_jpg":
        photo.quantize(colors=64).save(buffer, format="GIF")
    else:
        mode = {"grayscale_jpeg": "L", "cmyk_jpeg": "CMYK"}.get(defect or "", "RGB")
        photo.convert(mode).save(buffer, format="JPEG", quality=quality)
    data = buffer.getvalue()
    return data[: len(data) // 2] if defect == "truncated_jpeg" else data  # the header still reads


def write_image(spec: tuple, seed: int, root: Path) -> None:
    """Draw one planned image from its own random stream (so any process may draw it) and write its files."""
    index, name, look, defect, listed = spec
    rng = np.random.default_rng([seed, 1, index])
    photo, trimap = render_photo(rng, look)
    (root / "images" / f"{name}.jpg").write_bytes(encode(photo, defect, int(rng.integers(*JPEG_QUALITY))))
    if listed:
        trimap.save(root / "annotations" / "trimaps" / f"{name}.png")


def announce_standin() -> None:
    """Say once, loudly, that the data is the synthetic stand-in."""
    print(f"{'!' * 106}\n!! {BANNER}\n{'!' * 106}")


# -----------------------------------------------------------------------------
# Building and installing
def install(new: Path, target: Path) -> None:
    """Rename a finished folder into place; whatever was there is removed only once the new one is in."""
    old = target.with_name(".replaced-tmp")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def build_standin(data_dir: Path, n_images: int, seed: int) -> None:
    """Draw the whole stand-in in a temporary folder and move it into place when complete."""
    start = time.perf_counter()
    rows, trainval, specs, marker = plan_standin(n_images, seed)
    tmp = data_dir / ".synthetic-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    root = tmp / DATASET_FOLDER
    (root / "annotations" / "trimaps").mkdir(parents=True)
    (root / "images").mkdir()
    try:
        with Pool(os.cpu_count()) as pool:
            draw_one = partial(write_image, seed=seed, root=root)
            drawn = pool.imap_unordered(draw_one, specs, chunksize=CHUNK_SIZE)  # files identical in any order
            for _ in tqdm(drawn, total=len(specs), desc="drawing the stand-in", unit="img"):
                pass
        for defect in marker["defects"]:
            if defect["kind"] == "mat_file":
                (root / defect["file"]).write_bytes(FAKE_MAT)
        lines = {name: f"{name} {class_id} {species} {breed_id}\n" for name, class_id, species, breed_id in rows}
        annotations = {
            "list.txt": "".join(f"{line}\n" for line in LIST_HEADER) + "".join(lines.values()),
            "trainval.txt": "".join(line for name, line in lines.items() if name in trainval),
            "test.txt": "".join(line for name, line in lines.items() if name not in trainval),
        }
        for file_name, text in annotations.items():
            (root / "annotations" / file_name).write_bytes(text.encode())
        (root / MARKER_NAME).write_bytes((json.dumps(marker, indent=2, sort_keys=True) + "\n").encode())
        install(root, data_dir / DATASET_FOLDER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    announce_standin()
    print(
        f"Wrote the stand-in ({n_images} listed images, seed {seed}) to {data_dir / DATASET_FOLDER} "
        f"in {time.perf_counter() - start:.1f} s."
    )


def marker_matches(target: Path, options: dict) -> bool:
    """Whether the stand-in in `target` was built with `options` (an unreadable marker never matches)."""
    try:
        marker = json.loads((target / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return all(marker.get(key) == value for key, value in options.items())


# -----------------------------------------------------------------------------
# Command line
def main(argv: list[str] | None = None) -> None:
    """Parse the flags, keep a matching stand-in or refuse to replace another dataset, else draw it."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--data-dir", default="data/oxfordiii", help="dataset root (gets oxford-iiit-pet/)")
    parser.add_argument(
        "--n-images",
        type=int_in(MIN_IMAGES),
        default=REAL_TOTAL,
        help=f"listed images, at least {MIN_IMAGES} (one per breed)",
    )
    parser.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help=f"random seed, 0 to {MAX_SEED}")
    parser.add_argument("--force", action="store_true", help="replace a dataset that is not a stand-in")
    args = parser.parse_args(argv)

    data_dir = Path(args.data_dir)
    target = data_dir / DATASET_FOLDER
    if target.exists() and not args.force:
        if not (target / MARKER_NAME).is_file():
            found = "the real Oxford-IIIT Pet dataset" if (target / "images").is_dir() else "an incomplete dataset"
            raise SystemExit(
                f"{target} already holds {found} (it has no {MARKER_NAME}), which this command would replace "
                f"with a synthetic stand-in; pass --force to replace it, or choose another --data-dir."
            )
        if marker_matches(target, standin_options(args.n_images, args.seed)):
            announce_standin()
            print(f"A stand-in built with the same options is already in {target}; kept it.")
            return
        print(f"The stand-in in {target} was built with other options; rebuilding it.")
    data_dir.mkdir(parents=True, exist_ok=True)
    build_standin(data_dir, args.n_images, args.seed)


if __name__ == "__main__":
    main()
