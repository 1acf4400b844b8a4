"""Split files: nested stratified k-fold, written once, checked every time they are loaded, and the folds a run takes.

A split file fixes which images each fold trains, tunes and tests on, so that every run, on every machine, uses
the same folds, and a fold's test images can never leak into its training. The format:

    {"meta": {...}, "files": ["images/Abyssinian_1.jpg", ...],
     "root_splits": {"0": {"test_indices": [...],
                           "nested_splits": {"0": {"train_indices": [...], "dev_indices": [...]}, ...}}, ...}}

Indices point into `files`. `load_splits` refuses, with one sentence, a file that leaks (a test image in
training), is not stratified, or was made from other data than the data on disk (a stale file). `choose_folds`
picks the folds a command asks for, and `fold_indices` gives a fold's train, dev and test images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import sklearn
from sklearn.model_selection import StratifiedKFold, train_test_split

from support.common import STEP_DIR
from support.provenance import dataset_digest

FORMAT_VERSION = 1  # bump when the layout changes; load_splits refuses other versions
CLASS_NAMES = {0: "dog", 1: "cat"}  # labels as read from the species column (1 = cat, the positive class)
REMAKE = f"regenerate it with python {STEP_DIR.name}/make_dataset_splits.py"  # for a bad file
# How the folds to run are named to the user: by their command-line flags (choose_folds takes other names)
FLAGS = {"root": "--root-split", "nested": "--nested-split", "n_root": "--n-root-splits",
         "n_nested": "--n-nested-splits", "all": "'all'"}  # fmt: skip


def make_splits(
    files: list[str], labels: np.ndarray, k_root: int, k_nested: int, seed: int, dataset_digest: str
) -> dict:
    """Nested stratified k-fold over `files` (sorted names relative to the dataset folder) as a JSON-able dict."""
    labels = np.asarray(labels)
    if k_root < 2 or k_nested < 2:
        raise SystemExit(f"--k-root {k_root} --k-nested {k_nested}: cross-validation needs at least 2 folds each.")
    classes, counts = np.unique(labels, return_counts=True)
    for label, count in zip(classes, counts, strict=True):
        # every test set needs each class once (k_root), and so does every dev set inside the smallest pool
        if count < k_root or count - math.ceil(count / k_root) < k_nested:
            raise SystemExit(
                f"Only {count} {CLASS_NAMES.get(int(label), label)} image(s): too few for {k_root} outer x "
                f"{k_nested} nested folds with that class in every test and dev set; use smaller --k-root/--k-nested."
            )
    everything = np.arange(len(files))
    root_splits = {}
    outer = StratifiedKFold(k_root, shuffle=True, random_state=seed)
    for root, (pool, test) in enumerate(outer.split(everything, labels)):
        inner = StratifiedKFold(k_nested, shuffle=True, random_state=seed)
        nested = {
            str(i): {"train_indices": sorted(pool[train].tolist()), "dev_indices": sorted(pool[dev].tolist())}
            for i, (train, dev) in enumerate(inner.split(pool, labels[pool]))
        }
        root_splits[str(root)] = {"test_indices": sorted(test.tolist()), "nested_splits": nested}
    meta = {
        "format_version": FORMAT_VERSION,
        "k_root": k_root,
        "k_nested": k_nested,
        "seed": seed,
        "dataset_digest": dataset_digest,
        "n_files": len(files),
        "class_counts": {CLASS_NAMES.get(int(c), str(c)): int(n) for c, n in zip(classes, counts, strict=True)},
        "method": "sklearn StratifiedKFold(shuffle=True, random_state=seed): outer folds over all files, "
        "nested folds over each outer fold's remaining files",
        "sklearn_version": sklearn.__version__,  # another version may cut other folds from the same seed
    }
    return {"meta": meta, "files": list(files), "root_splits": root_splits}


def write_splits(splits: dict, path: Path) -> None:
    """Write the split file with deterministic bytes, atomically (a temporary file, then a rename)."""
    text = json.dumps(splits, sort_keys=True, indent=1, separators=(",", ": ")) + "\n"
    # one line per index list rather than one line per index: a third of the size, and the rest stays readable
    text = re.sub(r'(_indices": )\[([\d,\s]*)\]', lambda m: f"{m[1]}[{''.join(m[2].split())}]", text)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(text.encode())
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a split file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def index_problem(indices: object, n: int) -> str | None:
    """What is wrong with a list of indices into n files, or None if nothing is."""
    if not isinstance(indices, list):
        return "is not a list"
    bad = [i for i in indices if type(i) is not int or not 0 <= i < n]
    if bad:
        return f"holds {bad[0]!r}, not an integer from 0 to {n - 1}"
    if len(set(indices)) != len(indices):
        return "lists an index twice"
    return None


def check_layout(splits: object, name: str) -> None:
    """Stop unless every key is there, every index is in range, and each fold's parts partition the files."""
    if not isinstance(splits, dict):
        raise SystemExit(f"{name}: the top level is not a JSON object; {REMAKE}.")
    for key in ("meta", "files", "root_splits"):
        if key not in splits:
            raise SystemExit(f"{name}: key '{key}' is missing; {REMAKE}.")
    meta, files, roots = splits["meta"], splits["files"], splits["root_splits"]
    for key in ("format_version", "dataset_digest", "k_root", "k_nested"):
        if not isinstance(meta, dict) or key not in meta:
            raise SystemExit(f"{name}: key 'meta.{key}' is missing; {REMAKE}.")
    if meta["format_version"] != FORMAT_VERSION:
        raise SystemExit(f"{name}: meta.format_version is {meta['format_version']}, not {FORMAT_VERSION}; {REMAKE}.")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files) or files != sorted(set(files)):
        raise SystemExit(f"{name}: 'files' is not a sorted list of distinct file names; {REMAKE}.")
    k_root, k_nested, n = meta["k_root"], meta["k_nested"], len(files)
    if not isinstance(roots, dict) or type(k_root) is not int or set(roots) != {str(i) for i in range(k_root)}:
        raise SystemExit(f"{name}: 'root_splits' is not numbered 0 to meta.k_root - 1; {REMAKE}.")
    for root, split in roots.items():
        where = f"{name}: root split {root}"
        for key in ("test_indices", "nested_splits"):
            if not isinstance(split, dict) or key not in split:
                raise SystemExit(f"{where}: key '{key}' is missing; {REMAKE}.")
        if problem := index_problem(split["test_indices"], n):
            raise SystemExit(f"{where}: test_indices {problem}; {REMAKE}.")
        nested_splits = split["nested_splits"]
        if (
            not isinstance(nested_splits, dict)
            or type(k_nested) is not int
            or set(nested_splits) != {str(i) for i in range(k_nested)}
        ):
            raise SystemExit(f"{where}: 'nested_splits' is not numbered 0 to meta.k_nested - 1; {REMAKE}.")
        for nested, parts in nested_splits.items():
            here = f"{where}, nested split {nested}"
            for key in ("train_indices", "dev_indices"):
                if not isinstance(parts, dict) or key not in parts:
                    raise SystemExit(f"{here}: key '{key}' is missing; {REMAKE}.")
                if problem := index_problem(parts[key], n):
                    raise SystemExit(f"{here}: {key} {problem}; {REMAKE}.")
            named = {"train": parts["train_indices"], "dev": parts["dev_indices"], "test": split["test_indices"]}
            for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
                if shared := sorted(set(named[a]) & set(named[b])):
                    raise SystemExit(
                        f"{here}: {a} and {b} share {len(shared)} {'index' if len(shared) == 1 else 'indices'} "
                        f"(e.g. {shared[0]}); {REMAKE}."
                    )
            if sum(len(v) for v in named.values()) != n:  # disjoint and in range: covering means adding up to n
                missing = sorted(set(range(n)).difference(*named.values()))
                raise SystemExit(f"{here}: {len(missing)} files are in no part (e.g. index {missing[0]}); {REMAKE}.")


def check_stratified(splits: dict, labels: np.ndarray, name: str, remedy: str = REMAKE) -> None:
    """Stop unless every part holds each class in proportion (within one image) and at least once in test and dev.

    The rule, for every class c: a test set T holds within 1 of |T|·n_c/n images of class c (n_c, n: counts over
    all files); a dev or train set P of an outer fold holds within 1 of |P|·m_c/m, where m_c, m count that outer
    fold's pool (every file outside its test set). StratifiedKFold always meets it for two classes: it deals
    each class round robin over the folds, so class and fold counts are each the floor or ceiling of their share.
    """
    n = len(labels)
    for root, split in splits["root_splits"].items():
        test = np.asarray(split["test_indices"], dtype=int)
        pool = np.setdiff1d(np.arange(n), test)
        for nested, parts in split["nested_splits"].items():
            named = {
                "test": (test, np.arange(n)),
                "dev": (np.asarray(parts["dev_indices"], dtype=int), pool),
                "train": (np.asarray(parts["train_indices"], dtype=int), pool),
            }
            for part, (indices, reference) in named.items():
                for c in np.unique(labels):
                    count = int(np.sum(labels[indices] == c))
                    expected = len(indices) * np.mean(labels[reference] == c)
                    if abs(count - expected) > 1 + 1e-9 or (count == 0 and part != "train"):
                        raise SystemExit(
                            f"{name}: root split {root}, nested split {nested}: {part} holds {count} "
                            f"{CLASS_NAMES.get(int(c), c)} images where stratification needs {expected:.1f} "
                            f"(within 1, and at least 1); {remedy}."
                        )


def check_structure(splits: object, labels: np.ndarray, name: str) -> None:
    """Every check that needs no files on disk: layout, partition and stratification against `labels`."""
    check_layout(splits, name)
    if len(labels) != len(splits["files"]):
        raise SystemExit(f"{name} lists {len(splits['files'])} files but {len(labels)} labels were given; {REMAKE}.")
    check_stratified(splits, np.asarray(labels), name)


def load_splits(path: Path, folder: Path, labels: dict[str, int], told: tuple[str, str] | None = None) -> dict:
    """Read and validate a split file against the data in `folder`; index arrays per fold, ready to use.

    `labels` maps every listed, decodable image (relative name, as in the file's `files`) to its label. `told`: how
    a message names the file and what it says to do when the data do not fit it; by default the file's path, and to
    regenerate the file.
    """
    name, remedy = told or (str(path), REMAKE)
    if not path.is_file():
        raise SystemExit(
            f"No split file at {path}: make it with `python {STEP_DIR.name}/"
            f"make_dataset_splits.py --data-dir {folder.parent}` (or name another split file)."
        )
    raw = path.read_bytes()
    try:
        splits = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f"{name} is not valid JSON ({error}); {REMAKE}.") from None
    check_layout(splits, name)
    files = splits["files"]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise SystemExit(f"{name}: {len(missing)} listed file(s) are not in {folder} (e.g. {missing[0]}); {remedy}.")
    unknown, unlisted = sorted(set(files) - set(labels)), sorted(set(labels) - set(files))
    if unknown or unlisted:
        example = f"{unknown[0]} is not among the dataset's decodable listed images" if unknown else ""
        example = example or f"{unlisted[0]} is listed in the annotations but not in the split file"
        raise SystemExit(f"{name} was made from other data ({example}); {remedy}.")
    label_array = np.array([labels[f] for f in files])
    check_stratified(splits, label_array, name, remedy)
    if dataset_digest(folder, [folder / f for f in files]) != splits["meta"]["dataset_digest"]:
        raise SystemExit(
            f"{name}: meta.dataset_digest does not match the images and annotations in {folder} (they changed "
            f"since the file was made); {remedy}."
        )
    return {
        "path": path,
        "digest": hashlib.sha256(raw).hexdigest(),
        "meta": splits["meta"],
        "files": [folder / f for f in files],
        "labels": label_array,
        "root_splits": {
            int(root): {
                "test": np.array(split["test_indices"], dtype=np.int64),
                "nested": {
                    int(nested): {
                        "train": np.array(parts["train_indices"], dtype=np.int64),
                        "dev": np.array(parts["dev_indices"], dtype=np.int64),
                    }
                    for nested, parts in split["nested_splits"].items()
                },
            }
            for root, split in splits["root_splits"].items()
        },
    }


def count_or_all(text: str) -> int | None:
    """An argparse type for a number of folds: a whole number from 1, or 'all' (None)."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 up, or 'all'")
    return int(text)


def choose_folds(
    splits: dict, n_root: int | None, n_nested: int | None, one: tuple[int | None, int | None], names: dict = FLAGS
) -> list[tuple[int, int]]:
    """The (root split, nested split) pairs to run: the one fold `one`, or the first n_root x n_nested (None: all)."""
    k_root, k_nested = len(splits["root_splits"]), len(splits["root_splits"][0]["nested"])
    root, nested = one
    if (root is None) != (nested is None):
        raise SystemExit(f"{names['root']} and {names['nested']} go together: give both to run one fold, or neither.")
    if root is not None:
        if not (0 <= root < k_root and 0 <= nested < k_nested):
            raise SystemExit(
                f"Fold ({root}, {nested}) ({names['root']}, {names['nested']}) is not in {splits['path']}, which "
                f"has {k_root} root x {k_nested} nested splits (numbered from 0)."
            )
        return [(root, nested)]
    counts = []
    for name, value, available in (("n_root", n_root, k_root), ("n_nested", n_nested, k_nested)):
        count = available if value is None else value
        if not 1 <= count <= available:
            raise SystemExit(
                f"{names[name]} {value}: give a number from 1 to {available}, or {names['all']} for all "
                f"({splits['path']})."
            )
        counts.append(count)
    return [(r, n) for r in range(counts[0]) for n in range(counts[1])]


def stratified_subset(labels: np.ndarray, max_images: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded class-stratified subset of at most max_images images (all of them if None)."""
    indices = np.arange(len(labels))
    if max_images is None or max_images >= len(labels):
        return indices
    subset, _ = train_test_split(indices, train_size=max_images, stratify=labels, random_state=seed)
    return np.sort(subset)


def fold_indices(
    splits: dict, fold: tuple[int, int], max_images: int | None, shares: dict[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Train, dev and test indices of one fold; with a cap (--quick), a seeded stratified subsample of each part,
    of max_images x shares[part] images."""
    root, nested = fold
    parts = {"train": splits["root_splits"][root]["nested"][nested]["train"],
             "dev": splits["root_splits"][root]["nested"][nested]["dev"],
             "test": splits["root_splits"][root]["test"]}  # fmt: skip
    if max_images is None:
        return parts
    return {
        part: idx[stratified_subset(splits["labels"][idx], round(max_images * shares[part]), seed)]
        for part, idx in parts.items()
    }
