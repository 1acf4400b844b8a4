"""Save a 4 x 4 grid of sample images from the synthetic stand-in, with their labels, for the README.

Run from the repository root, after `python step_1/download_data.py --synthetic`:

    python docs/make_standin_figure.py          # writes docs/standin_samples.png

Each panel shows the file name and its label (cat or dog, from list.txt's species column). Panels marked
"drawn as the other class" are the images the generator deliberately drew with the other class's look (their
share, P_SWAP, caps the best possible ROC AUC at about 1 - P_SWAP); files with planted defects are left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402 -- after choosing the backend

N_ROWS, N_COLS = 4, 4  # 16 panels: 8 cats and 8 dogs
N_SWAPPED = 2  # panels per class that show an image drawn with the other class's look


def read_species(pet: Path) -> dict[str, int]:
    """Species of every listed image (1 = cat, 2 = dog), from annotations/list.txt."""
    lines = (pet / "annotations" / "list.txt").read_text().splitlines()
    return {line.split()[0]: int(line.split()[2]) for line in lines if not line.startswith("#")}


def pick_samples(species: dict[str, int], marker: dict, seed: int) -> list[str]:
    """Eight cats and eight dogs, N_SWAPPED of each drawn with the other class's look, chosen with `seed`."""
    rng = np.random.default_rng(seed)
    defects = {Path(defect["file"]).stem for defect in marker["defects"]}
    swapped = set(marker["swapped_images"])
    picked = []
    for label in (1, 2):
        names = sorted(name for name, value in species.items() if value == label and name not in defects)
        plain = [name for name in names if name not in swapped]
        other_look = [name for name in names if name in swapped]
        half = N_ROWS * N_COLS // 2
        picked += rng.choice(other_look, N_SWAPPED, replace=False).tolist()
        picked += rng.choice(plain, half - N_SWAPPED, replace=False).tolist()
    return picked


def main(argv: list[str] | None = None) -> None:
    """Read the stand-in, pick the samples, draw and save the grid."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--data-dir", default="data/oxfordiii", help="dataset root holding oxford-iiit-pet/")
    parser.add_argument("--out", default="docs/standin_samples.png", help="where to save the figure")
    parser.add_argument("--seed", type=int, default=0, help="which samples to show")
    args = parser.parse_args(argv)

    pet = Path(args.data_dir) / "oxford-iiit-pet"
    marker_path = pet / "SYNTHETIC.json"
    if not marker_path.is_file():
        raise SystemExit(
            f"{marker_path} not found: build the stand-in first with "
            f"`python step_1/download_data.py --synthetic --data-dir {args.data_dir}`."
        )
    marker = json.loads(marker_path.read_text())
    species = read_species(pet)
    swapped = set(marker["swapped_images"])
    rng_order = np.random.default_rng(args.seed + 1)  # shuffle so cats and dogs are mixed on the page
    names = rng_order.permutation(pick_samples(species, marker, args.seed)).tolist()

    fig, axes = plt.subplots(N_ROWS, N_COLS, figsize=(10, 10))
    for ax, name in zip(axes.flat, names, strict=True):
        ax.imshow(Image.open(pet / "images" / f"{name}.jpg").convert("RGB"))
        label = "cat" if species[name] == 1 else "dog"
        note = "\n(drawn as the other class)" if name in swapped else "\n"
        ax.set_title(f"{name}\nlabel: {label}{note}", fontsize=9, color="firebrick" if name in swapped else "black")
        ax.axis("off")
    fig.suptitle(
        f"Synthetic stand-in, NOT the Oxford-IIIT Pet dataset "
        f"(seed {marker['seed']}, {marker['n_images']} images)\n"
        f"{marker['p_swap']:.0%} of each class is drawn with the other class's look: "
        f"best possible ROC AUC about {marker['auc_ceiling']}",
        fontsize=11,
    )
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=72, metadata={"Software": None})
    tmp.replace(out)  # never a half-written figure
    print(f"Saved {len(names)} samples from {pet} to {out}.")


if __name__ == "__main__":
    main()
