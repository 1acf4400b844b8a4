"""--quick: the experiment of config.py at smoke size for a CPU; only what differs is set here.

A small backbone without pretrained weights (nothing to download), 64 px images and a capped subset make one
training take seconds; a network trained from scratch has nothing to protect, so it fine-tunes with larger steps.
"""

from dataclasses import replace

from config import config as default
from settings import Categorical, Float

config = replace(
    default,
    data=replace(default.data, image_size=64, max_images=600),
    model=replace(default.model, backbone="resnet18", pretrained=False, head_hidden=Categorical([32, 64, 128])),
    training=replace(
        default.training, warmup_epochs=2, finetune_epochs=3, finetune_lr=Float(3e-4, 3e-3, log=True), patience=2
    ),
)
