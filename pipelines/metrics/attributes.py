"""An attribute classifier: the judge of the demo family's report.

A small convolutional network with one linear head per attribute (hair colour, eye colour,
outfit colour, pattern, ...), trained on Toybooru's ground truth by
``training.train_judge``. It judges generated pictures without using the generator's own
CLIP, so a generator cannot score well by fooling the model it was trained with.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from PIL import Image
from torch import nn


class AttributeClassifier(ModelMixin, ConfigMixin):
    """``forward(pixels in [-1, 1], (B, 3, R, R)) -> {attribute: logits (B, classes)}``."""

    @register_to_config
    def __init__(self, attributes: dict[str, list[str]], resolution: int = 64, width: int = 16):
        super().__init__()
        if not attributes or any(len(v) < 2 for v in attributes.values()):
            raise ValueError("every attribute needs at least two classes")
        chans = [3, width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1), nn.BatchNorm2d(b), nn.ReLU(),
                       nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        # mean and max pooling: a small figure's colours must not drown in the background's
        self.heads = nn.ModuleDict({name: nn.Linear(2 * chans[-1], len(classes))
                                    for name, classes in attributes.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(pixels)  # (B, C, R/4, R/4)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, 2C)
        return {name: head(h) for name, head in self.heads.items()}

    def loss(self, pixels: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(pixels)
        return sum(F.cross_entropy(logits[k], labels[k]) for k in self.config.attributes) / len(self.config.attributes)

    @torch.no_grad()
    def predict(self, images: list[Image.Image] | torch.Tensor, batch_size: int = 256) -> list[dict[str, str]]:
        """The most likely class of every attribute for each picture (PIL, or a [-1, 1] tensor)."""
        if isinstance(images, torch.Tensor):
            pixels = images
        else:
            if not images:
                return []
            r = self.config.resolution
            pixels = torch.stack([torch.from_numpy(np.array(im.convert("RGB").resize((r, r), Image.Resampling.BICUBIC)))
                                  .permute(2, 0, 1) for im in images]).float().div(127.5).sub(1.0)
        out: list[dict[str, str]] = []
        was = self.training
        self.eval()
        for s in range(0, len(pixels), batch_size):
            logits = self(pixels[s:s + batch_size].to(self.device, self.dtype))
            idx = {k: v.argmax(-1).tolist() for k, v in logits.items()}
            out += [{k: self.config.attributes[k][idx[k][i]] for k in idx} for i in range(len(next(iter(idx.values()))))]
        self.train(was)
        return out
