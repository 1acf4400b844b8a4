"""Download the Oxford-IIIT Pet dataset, or hand over to scripts/make_standin.py for an offline stand-in.

Run from the repository root (this file is the same in every step):

    python step_1/download_data.py                 # the real images and annotations (about 800 MB)
    python step_1/download_data.py --synthetic     # the offline stand-in: 7,349 images (times: benchmarks/README.md)
    python step_1/download_data.py --synthetic --n-images 240 --seed 1   # a small stand-in, as in the tests

The real data comes through torchvision into a temporary folder, renamed into place only when complete, so it
has torchvision's layout: <data-dir>/oxford-iiit-pet/{images,annotations}. The later scripts do not read it with
torchvision.datasets.OxfordIIITPet; they parse annotations/list.txt themselves.

--synthetic runs scripts/make_standin.py (one copy, outside the step folders) with the same flags. It draws a
stand-in in the same layout plus the marker oxford-iiit-pet/SYNTHETIC.json: that marker is how every script
tells a stand-in from the real pets. A dataset of the other kind is replaced only with --force.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

# -----------------------------------------------------------------------------
# Settings
DATASET_FOLDER = "oxford-iiit-pet"  # torchvision's folder under --data-dir, for real data and stand-in
MARKER_NAME = "SYNTHETIC.json"  # present only in a stand-in: how every script tells the two apart
OFFICIAL_BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/"  # where torchvision gets both archives
GENERATOR = Path(__file__).resolve().parents[1] / "scripts" / "make_standin.py"  # the stand-in, for every step


def install(new: Path, target: Path) -> None:
    """Rename a finished folder into place; whatever was there is removed only once the new one is in."""
    old = target.with_name(".replaced-tmp")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def download_real(data_dir: Path, base_url: str) -> None:
    """Download and extract the real images and annotations with torchvision, then move them into place."""
    # Imported here, not at the top: --synthetic and the checks need none of torch's seconds of start-up.
    from torchvision.datasets import OxfordIIITPet

    base_url = base_url.rstrip("/") + "/"
    resources = tuple((base_url + url.rsplit("/", 1)[1], md5) for url, md5 in OxfordIIITPet._RESOURCES)
    mirrored = type("MirroredOxfordIIITPet", (OxfordIIITPet,), {"_RESOURCES": resources})  # same md5s
    tmp = data_dir / ".download-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        mirrored(tmp, split="trainval", download=True)
        for archive in (tmp / DATASET_FOLDER).glob("*.tar.gz"):
            archive.unlink()  # extracted; the 800 MB of archives are not needed again
        install(tmp / DATASET_FOLDER, data_dir / DATASET_FOLDER)
    except (urllib.error.URLError, OSError, RuntimeError, tarfile.TarError, EOFError) as error:
        reason = getattr(error, "reason", None) or error
        raise SystemExit(
            f"Could not download the Oxford-IIIT Pet dataset from {base_url} ({reason}); check the network, "
            f"then run the same command again, or run with --synthetic to build an offline stand-in instead."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"Downloaded the Oxford-IIIT Pet dataset to {data_dir / DATASET_FOLDER}.")


def make_standin(args: argparse.Namespace) -> None:
    """Run scripts/make_standin.py with this Python and the stand-in's flags; it checks them and what is there."""
    if not GENERATOR.is_file():
        raise SystemExit(f"--synthetic needs {GENERATOR}, which is missing: run this script from a complete checkout.")
    flags = [f"--data-dir={args.data_dir}", *(["--force"] if args.force else [])]
    flags += [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in ("n_images", "seed") if name in args]
    returncode = subprocess.run([sys.executable, str(GENERATOR), *flags]).returncode
    if returncode != 0:
        raise SystemExit(returncode)


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, then hand over to the stand-in's generator, keep the real dataset, or download it."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--data-dir", default="data/oxfordiii", help="dataset root (gets oxford-iiit-pet/)")
    parser.add_argument("--synthetic", action="store_true", help="build the stand-in: run scripts/make_standin.py")
    # Passed on as given: scripts/make_standin.py owns their defaults and checks (see its --help).
    parser.add_argument("--n-images", default=argparse.SUPPRESS, metavar="N", help="stand-in: listed images")
    parser.add_argument("--seed", default=argparse.SUPPRESS, metavar="S", help="stand-in: random seed")
    parser.add_argument("--force", action="store_true", help="replace a dataset of the other kind")
    parser.add_argument(
        "--mirror",
        default=OFFICIAL_BASE_URL,
        metavar="URL",
        help="advanced: base URL serving images.tar.gz and annotations.tar.gz",
    )
    args = parser.parse_args(argv)
    if args.synthetic:
        make_standin(args)
        return
    if "n_images" in args or "seed" in args:
        parser.error("--n-images and --seed describe the stand-in: use them with --synthetic")

    data_dir = Path(args.data_dir)
    target = data_dir / DATASET_FOLDER
    if target.exists() and not args.force:
        if (target / MARKER_NAME).is_file():
            raise SystemExit(
                f"{target} already holds a synthetic stand-in (it has {MARKER_NAME}), which this command would "
                f"replace with the real Oxford-IIIT Pet dataset; pass --force to replace it, or choose another "
                f"--data-dir."
            )
        if not (target / "images").is_dir():
            raise SystemExit(
                f"{target} already holds an incomplete dataset (no images/ folder); pass --force to replace it "
                f"with the real Oxford-IIIT Pet dataset, or choose another --data-dir."
            )
        print(f"The Oxford-IIIT Pet dataset is already in {target}; nothing to do.")
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    download_real(data_dir, args.mirror)


if __name__ == "__main__":
    main()
