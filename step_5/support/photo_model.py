"""The registered model: photos in, P(cat) and a label out. It is one fold's refit model with the preprocessing and
the threshold that fold's runs logged, saved by register.py as an MLflow model from code (this file travels inside
it, with pets.py, so it loads without this repository): predict.py and `mlflow models serve` load it.

Input: a column `image` of image files' bytes (over HTTP: base64 strings). Output: `p_cat` (float32, the model's
sigmoid) and `label` ("cat" when p_cat >= the threshold fitted on the fold's dev set, else "dog"). Images are
decoded as in training (pets.load_image), scaled and normalised with the values the run logged, and predicted in
batches of the run's batch size on the run's thread count and CPU code paths: the same batches give the same bits
as the run's own prediction tables. An image over Pillow's pixel limit (a decompression bomb) is refused in one
sentence, before it is decoded (over HTTP: status 400).
"""

from __future__ import annotations

import io
import os

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from torchvision.transforms import v2

from support.pets import IMAGENET_MEAN, IMAGENET_STD, TooLarge, load_image

# A record from before the code paths were recorded: MKL in its reproducible mode on the CPU's own paths
NATIVE_CODE_PATHS = {"MKL_CBWR": "AUTO", "MKL_DYNAMIC": "FALSE"}
# How a photo becomes the model's input, as pets.load_image and training.PetImages (unaugmented) make it; the size is
# data.image_size of the resolved config. Logged with every root run of step 5: this model reads it from the run.
PREPROCESSING = {"colour": "RGB", "resize": "bilinear", "divide_by": 255, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
SUPPORTED = {key: PREPROCESSING[key] for key in ("colour", "resize")}  # a record asking for more is refused


def use_code_paths(config: dict) -> None:
    """The CPU code paths the run computed on (MKL's branch, oneDNN's and torch's caps: `config["code_paths"]`), set
    before this process's first computation, when MKL, oneDNN and torch read them: then a served answer equals the
    run's logged score bit for bit."""
    for name, value in config.get("code_paths", NATIVE_CODE_PATHS).items():
        if value == "unset":
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class PetPhotos(mlflow.pyfunc.PythonModel):
    """A fold's refit model behind the preprocessing its run logged (`config`: see registry.photo_config)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        device = torch.device(context.model_config.get("device", "cpu"))
        use_code_paths(context.model_config)
        self.setup(mlflow.pytorch.load_model(context.artifacts["refit_model"]), context.model_config, device)

    def setup(self, model: torch.nn.Module, config: dict, device: torch.device) -> None:
        """Use `model` (the refit run's torch model) with `config`; also for a model loaded from a runs:/ URI."""
        for key, value in SUPPORTED.items():
            if config[key] != value:
                raise ValueError(f"the run's preprocessing has {key}={config[key]!r}; this model supports {value!r}")
        torch.set_num_threads(int(config["num_threads"]))  # another thread count adds floats in another order
        self.model, self.config, self.device = model.to(device), config, device

    def images(self, files: list[bytes]) -> torch.Tensor:
        """The model's input for image files' bytes: decoded at the run's size, scaled, normalised."""
        size, divide_by, mean, std = (self.config[key] for key in ("image_size", "divide_by", "mean", "std"))
        try:
            decoded = [load_image(io.BytesIO(file), size).float() / divide_by for file in files]
        except TooLarge as error:  # refused before decoding: over HTTP a 400 that says why, not a server out of memory
            raise MlflowException.invalid_parameter_value(str(error)) from None
        return torch.stack([v2.functional.normalize(image, mean, std) for image in decoded])

    @torch.no_grad()
    def predict(self, context: object, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        files = [bytes(image) for image in model_input["image"]]
        batch = int(self.config["batch_size"])
        scores = [
            torch.sigmoid(self.model(self.images(files[i : i + batch]).to(self.device))).reshape(-1).cpu().numpy()
            for i in range(0, len(files), batch)
        ]
        p_cat = np.concatenate(scores) if scores else np.empty(0, np.float32)
        labels = np.where(p_cat >= self.config["threshold"], "cat", "dog")
        return pd.DataFrame({"p_cat": p_cat, "label": labels})


mlflow.models.set_model(PetPhotos())
