"""download_data.py and the stand-in it hands over to (scripts/make_standin.py): the stand-in's layout,
determinism, planted defects and marker, that torchvision reads it; the hand-over itself; the flags' checks; what
the real download does when it fails or finds a dataset already there. No network: downloads go to a dead port."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import REPO, run_script
from PIL import Image

SCRIPT = "step_1/download_data.py"  # what the README runs; --synthetic hands over to GENERATOR
GENERATOR = "scripts/make_standin.py"
STANDIN_COMMANDS = {"download_data.py --synthetic": (SCRIPT, "--synthetic"), "make_standin.py": (GENERATOR,)}
# The discard port on loopback: nothing listens there, so the download fails at once, without a network.
UNREACHABLE = "http://127.0.0.1:9/"
# What a user expects from the real archive, written out here rather than imported from the script under test.
LIST_HEADER = [
    "#Image CLASS-ID SPECIES BREED ID",
    "#ID: 1:37 Class ids",
    "#SPECIES: 1:Cat 2:Dog",
    "#BREED ID: 1-25:Dog 1:12:Cat",
    "#All images with 1st letter as captial are cat images",
    "#images with small first letter are dog images",
]
CATS = [
    "Abyssinian",
    "Bengal",
    "Birman",
    "Bombay",
    "British_Shorthair",
    "Egyptian_Mau",
    "Maine_Coon",
    "Persian",
    "Ragdoll",
    "Russian_Blue",
    "Siamese",
    "Sphynx",
]
DOGS = [
    "american_bulldog",
    "american_pit_bull_terrier",
    "basset_hound",
    "beagle",
    "boxer",
    "chihuahua",
    "english_cocker_spaniel",
    "english_setter",
    "german_shorthaired",
    "great_pyrenees",
    "havanese",
    "japanese_chin",
    "keeshond",
    "leonberger",
    "miniature_pinscher",
    "newfoundland",
    "pomeranian",
    "pug",
    "saint_bernard",
    "samoyed",
    "scottish_terrier",
    "shiba_inu",
    "staffordshire_bull_terrier",
    "wheaten_terrier",
    "yorkshire_terrier",
]
LISTED_KINDS = {"png_named_jpg", "gif_named_jpg", "grayscale_jpeg", "cmyk_jpeg", "truncated_jpeg"}


def read_rows(path: Path) -> list[list[str]]:
    """The data lines of an annotation file, split into columns."""
    return [line.split() for line in path.read_text().splitlines() if not line.startswith("#")]


def all_files(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by relative path."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def marker_of(data_dir: Path) -> dict:
    """The stand-in's marker file, parsed."""
    return json.loads((data_dir / "oxford-iiit-pet" / "SYNTHETIC.json").read_text())


def fake_real_dataset(data_dir: Path) -> Path:
    """A folder that looks like a downloaded real dataset (no marker); returns a file inside it."""
    pet = data_dir / "oxford-iiit-pet"
    (pet / "images").mkdir(parents=True)
    (pet / "annotations").mkdir()
    (pet / "annotations" / "list.txt").write_text("Abyssinian_1 1 1 1\n")
    photo = pet / "images" / "a_real_photo.jpg"
    photo.write_bytes(b"\xff\xd8 not really a photo")
    return photo


@pytest.fixture
def generator(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The stand-in's generator imported as a module, by its plain name from scripts/ so worker processes can
    import it."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    return importlib.import_module("make_standin")


def test_default_plan_has_the_real_counts_and_split_sizes(generator) -> None:
    assert sorted(generator.REAL_COUNTS) == sorted(CATS + DOGS)
    assert sum(generator.REAL_COUNTS.values()) == 7349
    assert generator.breed_counts(7349) == [generator.REAL_COUNTS[breed] for breed in generator.BREEDS]
    rows, trainval, specs, marker = generator.plan_standin(7349, 0)  # no pixels drawn: cheap
    assert (len(rows), len(trainval), len(specs)) == (7349, 3680, 7349 + 3)
    assert marker["counts"] == {"list": 7349, "trainval": 3680, "test": 3669}
    for n_images in (37, 60, 1000):
        counts = generator.breed_counts(n_images)
        assert sum(counts) == n_images and min(counts) >= 1


def test_layout_names_ids_splits_and_trimaps(make_standin) -> None:
    pet = make_standin(120) / "oxford-iiit-pet"
    assert (pet / "annotations" / "list.txt").read_text().splitlines()[:6] == LIST_HEADER
    rows = read_rows(pet / "annotations" / "list.txt")
    assert len(rows) == 120 and len({row[0] for row in rows}) == 120
    class_order = sorted(CATS + DOGS, key=str.lower)
    real_ids = {
        "Abyssinian": 1,
        "american_bulldog": 2,
        "beagle": 5,
        "Bengal": 6,
        "boxer": 9,
        "yorkshire_terrier": 37,
    }
    seen_breeds = set()
    for name, class_id, species, breed_id in rows:
        breed, number = name.rsplit("_", 1)
        seen_breeds.add(breed)
        same_species = sorted(CATS if breed in CATS else DOGS, key=str.lower)
        assert number.isdigit() and int(class_id) == class_order.index(breed) + 1
        assert int(species) == (1 if breed in CATS else 2) and (species == "1") == breed[0].isupper()
        assert int(breed_id) == same_species.index(breed) + 1
        assert int(class_id) == real_ids.get(breed, int(class_id))
    assert seen_breeds == set(CATS + DOGS)
    trainval = read_rows(pet / "annotations" / "trainval.txt")
    test = read_rows(pet / "annotations" / "test.txt")
    assert len(trainval) == round(120 * 3680 / 7349) and len(trainval) + len(test) == 120
    assert sorted(map(tuple, trainval + test)) == sorted(map(tuple, rows))  # cover list.txt exactly once
    values = set()
    for name, *_ in rows:
        assert (pet / "images" / f"{name}.jpg").is_file()
        trimap = Image.open(pet / "annotations" / "trimaps" / f"{name}.png")
        assert trimap.mode == "L" and trimap.size == Image.open(pet / "images" / f"{name}.jpg").size
        values |= set(np.unique(np.asarray(trimap)).tolist())
    assert values == {1, 2, 3}


def test_same_options_give_identical_bytes_whatever_the_process_count(
    make_standin, generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = make_standin(60, seed=0)
    monkeypatch.setattr(generator.os, "cpu_count", lambda: 1)  # the fixture's build used every core
    generator.main(["--n-images", "60", "--seed", "0", "--data-dir", str(tmp_path / "again")])
    first, second = all_files(reference), all_files(tmp_path / "again")
    assert len(first) > 2 * 60 and list(first) == list(second)
    assert [path for path in first if first[path] != second[path]] == []
    other_seed = all_files(make_standin(60, seed=1))
    common_images = [path for path in first if path.endswith(".jpg") and path in other_seed]
    assert len(common_images) > 50
    assert [path for path in common_images if first[path] == other_seed[path]] == []


def test_planted_defects_are_what_the_marker_says(make_standin) -> None:
    data_dir = make_standin(60)
    pet = data_dir / "oxford-iiit-pet"
    defects = {defect["file"]: defect["kind"] for defect in marker_of(data_dir)["defects"]}
    assert sorted(defects.values()) == sorted([*LISTED_KINDS, *["mat_file"] * 3, *["unlisted_image"] * 3])
    listed = {row[0] for row in read_rows(pet / "annotations" / "list.txt")}
    by_kind = {kind: pet / file for file, kind in defects.items()}
    for kind in LISTED_KINDS:
        assert by_kind[kind].stem in listed
    assert by_kind["png_named_jpg"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert by_kind["gif_named_jpg"].read_bytes().startswith(b"GIF8")
    gray, cmyk = Image.open(by_kind["grayscale_jpeg"]), Image.open(by_kind["cmyk_jpeg"])
    assert (gray.format, gray.mode, cmyk.format, cmyk.mode) == ("JPEG", "L", "JPEG", "CMYK")
    for kind in ("png_named_jpg", "gif_named_jpg", "grayscale_jpeg", "cmyk_jpeg"):
        assert Image.open(by_kind[kind]).convert("RGB").size[0] >= 400
    truncated = Image.open(by_kind["truncated_jpeg"])
    assert truncated.format == "JPEG" and truncated.size[0] >= 400  # the header reads...
    with pytest.raises(OSError):
        truncated.load()  # ...but the pixels do not
    for name in listed - {by_kind[kind].stem for kind in LISTED_KINDS}:
        image = Image.open(pet / "images" / f"{name}.jpg")
        assert (image.format, image.mode) == ("JPEG", "RGB")  # every other listed file is a plain JPEG
    mat_files = {str(path.relative_to(pet)) for path in (pet / "images").glob("*.mat")}
    assert mat_files == {file for file, kind in defects.items() if kind == "mat_file"}
    assert all((pet / file).read_bytes().startswith(b"MATLAB") for file in mat_files)
    unlisted = {path.stem for path in (pet / "images").glob("*.jpg")} - listed
    assert {f"images/{name}.jpg" for name in unlisted} == {f for f, k in defects.items() if k == "unlisted_image"}
    for name in unlisted:
        assert Image.open(pet / "images" / f"{name}.jpg").convert("RGB").size[0] >= 400
        assert name.rsplit("_", 1)[0] in CATS + DOGS
    all_lines = "".join((pet / "annotations" / f).read_text() for f in ("list.txt", "trainval.txt", "test.txt"))
    assert all(f"{name} " not in all_lines for name in unlisted)


def test_torchvision_reads_both_splits_with_cat_and_dog_labels(make_standin) -> None:
    from torchvision.datasets import OxfordIIITPet

    data_dir = make_standin(120)
    pet = data_dir / "oxford-iiit-pet"
    truncated = {d["file"] for d in marker_of(data_dir)["defects"] if d["kind"] == "truncated_jpeg"}
    checked = {"Abyssinian": 0, "beagle": 0}
    for split in ("trainval", "test"):
        names = [row[0] for row in read_rows(pet / "annotations" / f"{split}.txt")]
        dataset = OxfordIIITPet(data_dir, split=split, target_types="binary-category")
        assert len(dataset) == len(names) > 50
        for index, name in enumerate(names):
            if f"images/{name}.jpg" in truncated:
                continue
            image, target = dataset[index]
            assert image.mode == "RGB"
            assert target == (0 if name[0].isupper() else 1)  # torchvision: 0 = cat, 1 = dog
            breed = name.rsplit("_", 1)[0]
            if breed in checked:
                assert target == {"Abyssinian": 0, "beagle": 1}[breed]
                checked[breed] += 1
    assert min(checked.values()) >= 1


def test_marker_records_what_the_stand_in_is(make_standin) -> None:
    data_dir = make_standin(120)
    text = (data_dir / "oxford-iiit-pet" / "SYNTHETIC.json").read_text()
    marker = json.loads(text)
    assert text == json.dumps(marker, indent=2, sort_keys=True) + "\n"
    assert {"statement", "generator_version", "seed", "n_images", "p_swap", "auc_ceiling", "defects"} <= set(marker)
    assert "synthetic stand-in" in marker["statement"] and "NOT the Oxford-IIIT Pet" in marker["statement"]
    assert (marker["seed"], marker["n_images"], marker["p_swap"]) == (0, 120, 0.1)
    assert marker["auc_ceiling"] == pytest.approx(1 - marker["p_swap"])
    assert len(marker["defects"]) == 5 + 3 + 3
    species = {row[0]: row[2] for row in read_rows(data_dir / "oxford-iiit-pet" / "annotations" / "list.txt")}
    swapped = marker["swapped_images"]
    for label in ("1", "2"):
        n_label = sum(value == label for value in species.values())
        assert sum(species[name] == label for name in swapped) == round(0.1 * n_label)


def test_cats_look_warmer_than_dogs_except_the_swapped_ones(make_standin) -> None:
    data_dir = make_standin(120)
    pet = data_dir / "oxford-iiit-pet"
    marker = marker_of(data_dir)
    skip = {Path(d["file"]).stem for d in marker["defects"]}
    swapped = set(marker["swapped_images"])
    warmth: dict[tuple[bool, bool], list[float]] = {(cat, sw): [] for cat in (True, False) for sw in (True, False)}
    for name, _, species, _ in read_rows(pet / "annotations" / "list.txt"):
        if name in skip:
            continue
        pixels = np.asarray(Image.open(pet / "images" / f"{name}.jpg").convert("RGB"), np.float32)
        body = np.asarray(Image.open(pet / "annotations" / "trimaps" / f"{name}.png")) == 1
        warmth[species == "1", name in swapped].append(float((pixels[..., 0] - pixels[..., 2])[body].mean()))
    median = {key: np.median(values) for key, values in warmth.items()}
    assert median[True, False] > median[False, False] + 40  # red minus blue: cats warmer than dogs
    assert median[True, True] < median[True, False] and median[False, True] > median[False, False]


def test_failed_download_says_one_clear_sentence_and_leaves_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    proc = run_script(SCRIPT, "--mirror", UNREACHABLE, "--data-dir", str(data_dir), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--synthetic" in lines[0] and "127.0.0.1:9" in lines[0]
    assert not (data_dir / "oxford-iiit-pet").exists() and not (data_dir / ".download-tmp").exists()


def test_download_does_not_replace_a_stand_in(make_standin, tmp_path: Path) -> None:
    data_dir = tmp_path / "oxfordiii"
    shutil.copytree(make_standin(60), data_dir)
    before = all_files(data_dir)
    proc = run_script(SCRIPT, "--mirror", UNREACHABLE, "--data-dir", str(data_dir), cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert "--force" in lines[0] and str(data_dir / "oxford-iiit-pet") in lines[0]
    forced = run_script(
        SCRIPT, "--force", "--mirror", UNREACHABLE, "--data-dir", str(data_dir), cwd=tmp_path, check=False
    )
    assert forced.returncode != 0 and "--synthetic" in forced.stderr
    assert all_files(data_dir) == before  # a failed forced download leaves the stand-in as it was


@pytest.mark.parametrize("command", STANDIN_COMMANDS.values(), ids=STANDIN_COMMANDS.keys())
def test_stand_in_does_not_replace_a_real_dataset_without_force(command: tuple[str, ...], tmp_path: Path) -> None:
    data_dir = tmp_path / "oxfordiii"
    photo = fake_real_dataset(data_dir)
    args = (*command, "--n-images", "40", "--data-dir", str(data_dir))
    proc = run_script(*args, cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert "--force" in lines[0] and str(data_dir / "oxford-iiit-pet") in lines[0]
    assert photo.exists() and not (data_dir / "oxford-iiit-pet" / "SYNTHETIC.json").exists()
    forced = run_script(*args, "--force", cwd=tmp_path)
    assert "SYNTHETIC STAND-IN" in forced.stdout and "not results on the real pets" in forced.stdout
    assert not photo.exists() and marker_of(data_dir)["n_images"] == 40
    assert len(read_rows(data_dir / "oxford-iiit-pet" / "annotations" / "list.txt")) == 40


def test_existing_real_dataset_is_kept_without_network(tmp_path: Path) -> None:
    data_dir = tmp_path / "oxfordiii"
    photo = fake_real_dataset(data_dir)
    proc = run_script(SCRIPT, "--mirror", UNREACHABLE, "--data-dir", str(data_dir), cwd=tmp_path)
    assert "already" in proc.stdout and photo.exists()


def test_matching_stand_in_is_kept_and_a_different_one_rebuilt(make_standin, tmp_path: Path) -> None:
    data_dir = tmp_path / "oxfordiii"
    shutil.copytree(make_standin(60), data_dir)
    sentinel = data_dir / "oxford-iiit-pet" / "sentinel.txt"
    sentinel.write_text("still here")
    kept = run_script(SCRIPT, "--synthetic", "--n-images", "60", "--data-dir", str(data_dir), cwd=tmp_path)
    assert "kept" in kept.stdout and "SYNTHETIC STAND-IN" in kept.stdout and sentinel.exists()
    args = ("--synthetic", "--n-images", "60", "--seed", "1", "--data-dir", str(data_dir))
    rebuilt = run_script(SCRIPT, *args, cwd=tmp_path)
    assert "rebuilding" in rebuilt.stdout and not sentinel.exists() and marker_of(data_dir)["seed"] == 1


def argparse_error(proc) -> str:
    """The one error line argparse printed (after its usage lines); fails the test if there is not exactly one."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""  # 2: argparse's status
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1]
    return errors[0]


def test_too_few_images_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "oxfordiii"
    proc = run_script(SCRIPT, "--synthetic", "--n-images", "36", "--data-dir", str(data_dir), cwd=tmp_path, check=False)
    error = argparse_error(proc)  # status 2 through the hand-over: make_standin.py's own exit status
    assert error.endswith("error: argument --n-images: 36 is out of range: give a whole number from 37 up")
    assert not data_dir.exists()


BAD_NUMBERS = [  # (flag, bad value, what the one error line says)
    ("--n-images", "many", "'many' is not a whole number"),
    ("--n-images", "1e3", "'1e3' is not a whole number"),
    ("--n-images", "-40", "-40 is out of range: give a whole number from 37 up"),
    ("--seed", "-1", "-1 is out of range: give a whole number from 0 to 4294967295"),
    ("--seed", str(2**32), "4294967296 is out of range: give a whole number from 0 to 4294967295"),
    ("--seed", "0.5", "'0.5' is not a whole number"),
]


@pytest.mark.parametrize(("flag", "value", "says"), BAD_NUMBERS, ids=[f"{f}={v}" for f, v, _ in BAD_NUMBERS])
@pytest.mark.parametrize("command", STANDIN_COMMANDS.values(), ids=STANDIN_COMMANDS.keys())
def test_a_bad_number_is_one_argparse_error(
    command: tuple[str, ...], flag: str, value: str, says: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "oxfordiii"
    proc = run_script(*command, f"{flag}={value}", "--data-dir", str(data_dir), cwd=tmp_path, check=False)
    assert argparse_error(proc).endswith(f"error: argument {flag}: {says}")
    assert not data_dir.exists()


def test_the_bounds_themselves_are_accepted(generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    monkeypatch.setattr(generator, "build_standin", lambda *args: built.append(args))  # no drawing: the flags only
    generator.main(["--n-images", "37", "--seed", str(2**32 - 1), "--data-dir", str(tmp_path)])
    generator.main(["--n-images", "37", "--seed", "0", "--data-dir", str(tmp_path)])
    assert built == [(tmp_path, 37, 2**32 - 1), (tmp_path, 37, 0)]


def test_stand_in_flags_without_synthetic_are_refused(tmp_path: Path) -> None:
    proc = run_script(SCRIPT, "--seed", "1", "--data-dir", str(tmp_path / "oxfordiii"), cwd=tmp_path, check=False)
    assert "--synthetic" in argparse_error(proc) and not (tmp_path / "oxfordiii").exists()


def test_download_data_is_identical_in_every_step() -> None:
    copies = {path.parent.name: path.read_bytes() for path in sorted(REPO.glob("step_*/download_data.py"))}
    assert len(copies) >= 3 and "step_1" in copies
    assert [step for step, text in copies.items() if text != copies["step_1"]] == []


def test_the_generator_has_one_copy_outside_the_steps() -> None:
    folders = ("step_*", "scripts", "docs", "benchmarks", "tests")
    sources = [path for folder in folders for path in REPO.glob(f"{folder}/*.py")]
    defining = [str(path.relative_to(REPO)) for path in sources if "\ndef plan_standin(" in path.read_text()]
    assert defining == [GENERATOR]


def test_synthetic_without_the_generator_is_one_clear_sentence(tmp_path: Path) -> None:
    """A step folder copied on its own (no scripts/ beside it) cannot draw a stand-in: it says so."""
    (tmp_path / "step_1").mkdir()
    shutil.copy2(REPO / SCRIPT, tmp_path / SCRIPT)
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--synthetic", "--data-dir", "data"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(tmp_path / GENERATOR) in lines[0] and "missing" in lines[0]
    assert not (tmp_path / "data").exists()
