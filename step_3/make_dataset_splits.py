"""Make the split file: nested stratified k-fold over every decodable listed image, made once.

Outer ("root") folds each hold out a test set; inside the rest, nested folds each hold out a dev set (early
stopping, threshold) and train on what remains. train.py reads the folds from this file instead of drawing a
split itself, so every run and every machine uses the same folds, and load_splits checks the file each time
(no leaks, stratified, made from the data on disk). The same data and options give a byte-identical file.
Steps 3, 4 and 5 hold the same script (but for its imports): one split file serves them all.

Run from the repository root (step_N: this step's folder, step_3, step_4 or step_5):

    python step_N/make_dataset_splits.py                          # data/oxfordiii/dataset_splits.json, 10 x 10
    python step_N/make_dataset_splits.py --k-root 5 --k-nested 3  # fewer folds
    python step_N/make_dataset_splits.py --data-dir /scratch/pets --output /scratch/pets/splits_seed1.json --seed 1
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from splits import make_splits, write_splits
from support import common
from support.pets import dataset_folder, drop_undecodable, read_annotations, warn_if_standin
from support.provenance import dataset_digest

CHECK_SIZE = 64  # the image check decodes at the smallest size the steps train at (--quick), the fastest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = common.parser(__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("data/oxfordiii"), help="dataset root")
    parser.add_argument("--k-root", type=common.int_in(2), default=10, help="outer folds: each holds out one test set")
    parser.add_argument(
        "--k-nested", type=common.int_in(2), default=10, help="nested folds of each outer fold: one dev set each"
    )
    parser.add_argument("--seed", type=common.int_in(0, 2**32 - 1), default=0, help="seed of the fold assignment")
    parser.add_argument("--output", type=Path, help="the split file (default: DATA_DIR/dataset_splits.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build the folds over the decodable listed images and write them, with the data's digest, to the split file."""
    args = parse_args(argv)
    started = time.perf_counter()
    output = args.output or args.data_dir / "dataset_splits.json"
    folder = dataset_folder(args.data_dir)
    is_standin = warn_if_standin(folder)
    listed, labels = read_annotations(folder)
    paths, labels = drop_undecodable(listed, labels, CHECK_SIZE)  # excluded before splitting, as in train.py
    order = sorted(range(len(paths)), key=lambda i: paths[i].relative_to(folder).as_posix())  # canonical order
    files = [paths[i].relative_to(folder).as_posix() for i in order]
    digest = dataset_digest(folder, [folder / f for f in files])
    splits = make_splits(files, labels[order], args.k_root, args.k_nested, args.seed, digest)
    splits["meta"]["dataset_synthetic"] = is_standin
    splits["meta"]["excluded_undecodable"] = sorted(p.relative_to(folder).as_posix() for p in set(listed) - set(paths))

    if not output.parent.is_dir():
        raise SystemExit(f"--output {output}: folder {output.parent} does not exist; create it or choose another.")
    before = hashlib.sha256(output.read_bytes()).hexdigest() if output.is_file() else None
    write_splits(splits, output)
    after = hashlib.sha256(output.read_bytes()).hexdigest()
    counts = ", ".join(f"{n} {name}s" for name, n in splits["meta"]["class_counts"].items())
    print(
        f"Wrote {output} ({output.stat().st_size:,} bytes) in {time.perf_counter() - started:.0f} s: "
        f"{len(files)} files ({counts}), {args.k_root} root x {args.k_nested} nested splits, seed {args.seed}\n"
        f"dataset digest {digest[:12]}…, split file sha256 {after[:12]}…"
    )
    if before not in (None, after):
        print(
            f"It replaced a different split file (sha256 {before[:12]}…): runs made on the old file cannot be "
            "pooled or compared with runs made on this one."
        )
    elif before == after:
        print("Unchanged: the file there was already identical.")


if __name__ == "__main__":
    main()
