"""Pictures and their tag captions from a RetriBooru-style folder, for the demo family's VAE,
CLIP and text-to-image models.

Every picture of the split is decoded once and kept in memory as uint8 (10,000 pictures of
64 px are 120 MB), so a step costs no PNG decoding. The random choices of a sample (horizontal
flip, which tags are dropped) depend only on (seed, epoch, index): a resumed run sees the same
samples as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from training.data.retribooru import CorruptFile, open_record, prompt_from_tags, read_annotations

logger = logging.getLogger(__name__)


class TaggedImages(Dataset):
    """Items: ``pixel_values`` (3, R, R) in [-1, 1], ``caption`` (str), ``id``, ``index``,
    ``face_mask`` (1, R, R): 1 inside the record's face box (resized and flipped with the picture),
    and ``flipped`` (whether the picture was mirrored).

    ``tag_dropout``: each tag is left out of the caption with this probability (so the model also
    follows short prompts); ``flip``: mirror half of the samples (Toybooru's tags do not say left
    or right).
    """

    def __init__(self, root: str | Path, split: str | None = "train", resolution: int = 64,
                 tag_dropout: float = 0.0, flip: bool = True, seed: int = 0):
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
        if not 0 <= tag_dropout < 1:
            raise ValueError(f"tag_dropout must be in [0, 1), got {tag_dropout}")
        self.root, self.resolution = Path(root), resolution
        self.tag_dropout, self.flip, self.seed, self.epoch = tag_dropout, flip, seed, 0
        records, self.skipped = read_annotations(self.root)
        if split is not None:
            records = [r for r in records if r.get("split") == split]
        pictures, kept = [], []
        for rec in records:
            try:
                image, _ = open_record(self.root, rec)
            except CorruptFile as e:
                self.skipped["corrupt_file"] += 1
                logger.warning("%s", e)
                continue
            if image.size != (resolution, resolution):
                image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
            pictures.append(TF.pil_to_tensor(image))
            kept.append(rec)
        if not kept:
            raise ValueError(f"{root} has no readable picture in split {split!r}")
        self.records = kept
        self.pixels = torch.stack(pictures)  # (N, 3, R, R) uint8

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
        x = self.pixels[index].float().div(127.5).sub(1.0)
        flipped = bool(self.flip and torch.rand((), generator=g) < 0.5)
        if flipped:
            x = x.flip(-1)
        tags = self.records[index]["tags"]
        if self.tag_dropout:
            keep = torch.rand(len(tags), generator=g) >= self.tag_dropout
            tags = [t for t, k in zip(tags, keep.tolist()) if k]
        face = face_mask(self.records[index], self.resolution)
        if flipped:
            face = face.flip(-1)
        return {"pixel_values": x, "caption": prompt_from_tags(tags), "id": self.records[index]["id"], "index": index,
                "face_mask": face, "flipped": flipped}


def face_mask(rec: dict[str, Any], resolution: int) -> torch.Tensor:
    """(1, R, R): 1 inside ``rec``'s face box, scaled as the picture is resized to R x R (rounded
    outwards); all 0 for a record without one."""
    m = torch.zeros(1, resolution, resolution)
    box, w, h = rec.get("face_bbox"), rec.get("width"), rec.get("height")
    if not box or not w or not h:
        return m
    sx, sy = resolution / w, resolution / h
    x0, y0 = max(0, math.floor(box[0] * sx)), max(0, math.floor(box[1] * sy))
    x1, y1 = min(resolution, math.ceil(box[2] * sx)), min(resolution, math.ceil(box[3] * sy))
    m[:, y0:y1, x0:x1] = 1.0
    return m


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "face_mask": torch.stack([s["face_mask"] for s in samples]),
            "caption": [s["caption"] for s in samples], "id": [s["id"] for s in samples],
            "index": torch.tensor([s["index"] for s in samples]),
            "flipped": torch.tensor([s.get("flipped", False) for s in samples])}


def caption_words(root: str | Path) -> list[str]:
    """Every tag of a folder's records as caption text (for a word-level tokenizer)."""
    records, _ = read_annotations(root)
    return sorted({t.replace("_", " ") for r in records for t in r["tags"]})
