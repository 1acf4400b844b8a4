"""Step 5 — the registered model on your own photos: P(cat) and cat or dog, with the run the answer came from.

Loads `models:/pets-cat-vs-dog@candidate` (register.py makes it), or any model --model names: a registered version
(`models:/pets-cat-vs-dog/2`) or a step-5 refit run's model (`runs:/RUN_ID/model`). Each image is decoded, resized and
normalised as the run logged it, and predicted in batches of the run's batch size; the label is "cat" when P(cat)
reaches the threshold the run fitted on its dev set. P(cat) is printed to the last bit of its float32 (9 digits).

    python step_5/predict.py my_cat.jpg my_dog.png
    python step_5/predict.py --model runs:/RUN_ID/model photo.jpg
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import UnidentifiedImageError  # noqa: E402

from support import (
    common,  # noqa: E402
    registry,  # noqa: E402
)
from support.pets import TooLarge, open_image  # noqa: E402


def problem(path: Path) -> str | None:
    """What keeps the file from being predicted, in one sentence; None when it is a whole image."""
    if not path.exists():
        return f"{path}: no such file."
    if not path.is_file():
        return f"{path} is not a file."
    try:
        with open_image(path) as image:  # one over Pillow's pixel limit is refused here, as in training
            image.load()  # decodes to the end: a truncated file fails here, not halfway through a batch
    except TooLarge as error:
        return str(error)
    except UnidentifiedImageError:
        return f"{path} is not an image (no image format recognises it)."
    except (OSError, ValueError, SyntaxError) as error:
        return f"{path} is a truncated or damaged image ({error}): it does not decode to the end."
    return None


def main(argv: list[str] | None = None) -> None:
    """Predict every image given, one line each, after checking them all."""
    parser = common.parser(__doc__)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--model", default=registry.DEFAULT_URI, help="a models:/ or runs:/ URI (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: CUDA, MPS, CPU")
    parser.set_defaults(num_workers=0)
    args = parser.parse_args(argv)

    if problems := [text for text in map(problem, args.images) if text]:
        raise SystemExit("\n".join(problems))  # nothing predicted: every bad file named, one sentence each
    device = common.pick_device(args)
    if args.model.startswith(("models:/", "runs:/")):  # a folder without runs: no empty mlflow.db left behind
        registry.require_store()
    predict, config, where = registry.load(mlflow.MlflowClient(), args.model, device)
    if config["dataset_synthetic"]:
        bar = "!" * 100
        print(
            f"{bar}\n!! This model was trained on the SYNTHETIC STAND-IN: it has never seen a real pet. Its answers "
            f"say nothing about your photos.\n{bar}"
        )
    print(f"Model {args.model}: {where}; threshold {config['threshold']:.4f} (fitted on the fold's dev set)")
    answers = predict(pd.DataFrame({"image": [path.read_bytes() for path in args.images]}))
    for path, p_cat, label in zip(args.images, answers["p_cat"], answers["label"], strict=True):
        print(f"{path}\tP(cat) = {p_cat:.9g}\t{label}")


if __name__ == "__main__":
    main()
