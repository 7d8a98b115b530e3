"""The RetriBooru loader: training samples for RetriNet, as the papers make them.

Reads any folder in RetriBooru's schema (``annotations.jsonl`` + ``images/`` + ``masks/``; what
``training.data.toybooru`` writes, and later the dataset builder) and yields, per target
picture, N reference pictures with their concept words (seed 002, A.4; seed 001, Sec. 3.1 and 5):

- task ``recon``: N references from the target's ``similar`` list, each the whole "figure";
- task ``compose``: N references, each cut to "face" or "clothes" with equal probability
  ("clothes" stays "figure" when the head box ends below 2/3 of the height), see
  ``pipelines.concepts``;
- task ``multitask``: each sample is ``recon`` or ``compose`` with equal probability;
- setting ``b``: references are other pictures of the target's cluster (leakage-free);
- setting ``a``: references are augmentations of the target itself (the usual, leaky set-up).

References have their background removed by the figure mask. Every picture is resized with its
aspect kept and padded to a square; the valid-area mask marks what is not padding and the face
mask marks the head box (the two masks of seed 001, Eq. 3).

Bad records never crash an epoch: a record whose JSON is broken or incomplete, whose picture or
mask is missing, or that has no usable ``similar`` entry under setting ``b`` is skipped at start
and counted in ``dataset.skipped``; a file found corrupt while loading is skipped then, the
sample is replaced by the next good one, and the count grows. The counts are logged once, when
the dataset is built, and a later corrupt file is logged once, when first met.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pipelines.concepts import (
    check_box,
    composition_concept,
    concept_box,
    concept_region,
    crop_concept,
    resize_and_pad,
    scale_box,
)

logger = logging.getLogger(__name__)

TASKS = ("recon", "compose", "multitask")
SETTINGS = ("a", "b")
REQUIRED_KEYS = ("id", "file", "mask_file", "width", "height", "tags", "face_bbox", "similar")
WHITE = (255, 255, 255)


def read_annotations(root: str | Path) -> tuple[list[dict[str, Any]], Counter]:
    """Parse ``root/annotations.jsonl``; return the well-formed records and a count of the rest."""
    path = Path(root) / "annotations.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no annotations.jsonl; is it a RetriBooru-style folder?")
    records, skipped = [], Counter()
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skipped["broken_json"] += 1
                continue
            if not _well_formed(rec) or rec["id"] in seen:
                skipped["bad_record"] += 1
                continue
            seen.add(rec["id"])
            records.append(rec)
    return records, skipped


def _well_formed(rec: Any) -> bool:
    if not isinstance(rec, dict) or any(k not in rec for k in REQUIRED_KEYS):
        return False
    if not (isinstance(rec["similar"], list) and isinstance(rec["tags"], list)):
        return False
    try:
        check_box(rec["face_bbox"], int(rec["width"]), int(rec["height"]))
    except (TypeError, ValueError):
        return False
    return True


def prompt_from_tags(tags: list[str]) -> str:
    """A Danbooru-style prompt: the tags, underscores as spaces, comma separated."""
    return ", ".join(t.replace("_", " ") for t in tags)


PROMPT_TAGS = ("all", "neutral")


def neutral_tags(rec: dict[str, Any]) -> list[str]:
    """The record's tags without any identity attribute: no hair, eyes or clothes words (its
    ``cloth_tags`` and every tag naming hair or eyes), only what the picture shows around the
    character (count, pose, framing, background)."""
    cloth = set(rec.get("cloth_tags", []))
    return [t for t in rec["tags"] if t not in cloth and not t.endswith(("_hair", "_eyes", "hair", "twintails"))]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], the diffusers convention."""
    return TF.pil_to_tensor(image.convert("RGB")).float().div(127.5).sub(1.0)


def prepare_reference(image: Image.Image, mask: Image.Image, face_bbox, concept: str,
                      resolution: int) -> tuple[Image.Image, str]:
    """A reference as the model sees it: background removed, cut to ``concept`` by the rules of
    ``pipelines.concepts`` (which may turn "clothes" into "figure"), resized and padded to a
    ``resolution`` square. Returns the picture and the concept it really got."""
    crop, _, concept = crop_concept(image, mask, face_bbox, concept, WHITE)
    padded, _ = resize_and_pad(crop, resolution, WHITE)
    return padded, concept


def reference_region(image: Image.Image, mask: Image.Image, face_bbox, concept: str) -> tuple[float, ...]:
    """Where ``prepare_reference``'s picture of ``concept`` (already resolved) lies in its source picture's square
    frame (``pipelines.concepts.concept_region``)."""
    w, h = image.size
    return concept_region(concept_box(concept, face_bbox, w, h, mask), w, h)


def box_mask(box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """A (1, size, size) tensor that is 1 inside ``box`` and 0 outside."""
    m = torch.zeros(1, size, size)
    x0, y0, x1, y1 = box
    m[:, max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 1.0
    return m


@dataclass
class Reference:
    """One prepared reference: the padded picture, the concept word it is captioned with, and where it lies in
    its source picture's square frame (``reference_region``)."""

    image: Image.Image
    concept: str
    source_id: str
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


class CorruptFile(ValueError):
    """A picture or mask that exists but cannot be decoded, or disagrees with its record."""


def open_record(root: str | Path, rec: dict[str, Any]) -> tuple[Image.Image, Image.Image]:
    """A record's picture (RGB) and figure mask (L); ``CorruptFile`` if they cannot be read or their
    sizes disagree with each other or with the record."""
    root = Path(root)
    try:
        with Image.open(root / rec["file"]) as im:
            image = im.convert("RGB")
        with Image.open(root / rec["mask_file"]) as m:
            mask = m.convert("L")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for broken files
        raise CorruptFile(f"{rec['id']}: cannot read its picture or mask ({e})") from e
    if image.size != mask.size or image.size != (rec["width"], rec["height"]):
        raise CorruptFile(f"{rec['id']}: picture {image.size}, mask {mask.size} and record "
                          f"({rec['width']}, {rec['height']}) disagree on the size")
    return image, mask


class RetriBooruDataset(Dataset):
    """Samples for RetriNet training from a RetriBooru-style folder.

    Each item is a dict: ``id``; ``pixel_values`` (3, R, R) in [-1, 1], the target;
    ``valid_mask`` and ``face_mask`` (1, R, R) in {0, 1}; ``prompt``; ``reference_pixel_values``
    (N, 3, R, R) in [-1, 1]; ``concepts`` and ``reference_ids`` (N strings each);
    ``reference_regions`` (N, 4), where each reference lies in its source picture's square frame
    (``reference_region``); ``task`` ("recon" or "compose"). Use ``collate`` as the DataLoader's ``collate_fn``.

    ``prompt_tags``: "all" (the prompt is every tag of the target) or "neutral" (``neutral_tags``:
    no hair, eyes or clothes words, so what the character looks like can only come from the
    references).

    Randomness (which references, which concepts, which augmentations) depends only on
    ``seed``, the epoch set by ``set_epoch`` and the index, so a resumed run sees the same
    samples as an uninterrupted one.
    """

    def __init__(self, root: str | Path, split: str | None = "train", task: str = "recon",
                 setting: str = "b", num_references: int = 4, resolution: int = 256, seed: int = 0,
                 prompt_tags: str = "all"):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; expected 'a' (augmented target) or 'b' (other pictures)")
        if not 1 <= num_references <= 16:
            raise ValueError(f"{num_references} references asked for; between 1 and 16 are supported")
        if not 8 <= resolution <= 4096:
            raise ValueError(f"resolution {resolution} is outside 8..4096")
        if prompt_tags not in PROMPT_TAGS:
            raise ValueError(f"unknown prompt_tags {prompt_tags!r}; expected 'all' or 'neutral'")
        self.prompt_tags = prompt_tags
        self.root = Path(root)
        self.task, self.setting, self.seed = task, setting, seed
        self.num_references, self.resolution = num_references, resolution
        self.epoch = 0
        self._bad: set[str] = set()  # ids whose files turned out corrupt while loading

        records, self.skipped = read_annotations(self.root)
        total = len(records) + sum(self.skipped.values())
        if not records:
            raise ValueError(f"{root}: no usable record in annotations.jsonl ({total} lines)")
        if split is not None:
            if not any("split" in r for r in records):
                raise ValueError(f"{root} has no 'split' field; pass split=None to use every record")
            if split not in {r.get("split") for r in records}:
                raise ValueError(f"{root} has no record in split {split!r}")
        self.by_id = {}
        for r in records:
            if not ((self.root / r["file"]).is_file() and (self.root / r["mask_file"]).is_file()):
                self.skipped["missing_file"] += 1
                continue
            self.by_id[r["id"]] = r
        self.records = []
        for r in self.by_id.values():
            if split is not None and r.get("split") != split:
                continue
            if setting == "b" and not self._similar(r):
                self.skipped["no_similar"] += 1
                continue
            self.records.append(r)
        if self.skipped:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
            logger.warning("%s: skipped %d of %d records (%s)", self.root, sum(self.skipped.values()), total, reasons)
        if not self.records:
            raise ValueError(f"{root}: no usable record for split={split!r}, setting={setting!r}")
        self._augment = v2.Compose([
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.85, 1.1), fill=255),
            v2.ColorJitter(brightness=0.1, contrast=0.1),
        ])

    # ------------------------------------------------------------------ helpers

    def _similar(self, rec: dict[str, Any]) -> list[str]:
        return [s for s in rec["similar"] if s != rec["id"] and s in self.by_id and s not in self._bad]

    def _load(self, rec: dict[str, Any]) -> tuple[Image.Image, Image.Image]:
        return open_record(self.root, rec)

    def _mark_bad(self, rec_id: str, err: Exception) -> None:
        if rec_id in self._bad:
            return
        self._bad.add(rec_id)
        self.skipped["corrupt_file"] += 1
        if self.skipped["corrupt_file"] == 1:
            logger.warning("%s: corrupt file skipped (%s); later ones are counted in dataset.skipped", self.root, err)

    def set_epoch(self, epoch: int) -> None:
        """Change the random draw of references and concepts, as a sampler's ``set_epoch`` does."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    # ------------------------------------------------------------------ samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        for attempt in range(len(self)):
            rec = self.records[(index + attempt) % len(self)]
            if rec["id"] in self._bad:
                continue
            try:
                sample = self._sample(rec, random.Random(f"{self.seed}/{self.epoch}/{index}/{attempt}"))
            except CorruptFile as e:
                self._mark_bad(rec["id"], e)
                continue
            if sample is not None:
                return sample
            self.skipped["no_similar"] += 1
            self._bad.add(rec["id"])
        raise RuntimeError(f"{self.root}: every record is corrupt or unusable ({dict(self.skipped)})")

    def _sample(self, rec: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
        image, mask = self._load(rec)
        size = self.resolution
        task = self.task if self.task != "multitask" else rng.choice(("recon", "compose"))

        target, valid = resize_and_pad(image, size, WHITE)
        face = scale_box(rec["face_bbox"], *image.size, size)

        refs = self._references(rec, image, mask, task, rng)
        if refs is None:
            return None
        return {
            "id": rec["id"],
            "pixel_values": to_tensor(target),  # (3, R, R)
            "valid_mask": box_mask(valid, size),  # (1, R, R)
            "face_mask": box_mask(face, size),  # (1, R, R)
            "prompt": prompt_from_tags(rec["tags"] if self.prompt_tags == "all" else neutral_tags(rec)),
            "reference_pixel_values": torch.stack([to_tensor(r.image) for r in refs]),  # (N, 3, R, R)
            "concepts": [r.concept for r in refs],
            "reference_regions": torch.tensor([r.region for r in refs], dtype=torch.float32),  # (N, 4)
            "reference_ids": [r.source_id for r in refs],
            "task": task,
        }

    def _references(self, rec, image, mask, task, rng) -> list[Reference] | None:
        n = self.num_references
        if self.setting == "a":
            sources = [(rec, image, mask)] * n
        else:
            pool = self._similar(rec)
            rng.shuffle(pool)
            loaded = []
            for sid in pool:
                try:
                    loaded.append((self.by_id[sid], *self._load(self.by_id[sid])))
                except CorruptFile as e:
                    self._mark_bad(sid, e)
                if len(loaded) == n:
                    break
            if not loaded:
                return None
            # without replacement while the cluster allows it, then cycling through it again
            sources = [loaded[i % len(loaded)] for i in range(n)]
        refs = []
        for src, im, m in sources:
            w, h = im.size
            concept = "figure" if task == "recon" else composition_concept(src["face_bbox"], w, h, rng, m)
            padded, concept = prepare_reference(im, m, src["face_bbox"], concept, self.resolution)
            region = reference_region(im, m, src["face_bbox"], concept)
            if self.setting == "a":
                padded = self._augmented(padded, rng)
            refs.append(Reference(padded, concept, src["id"], region))
        return refs

    def _augmented(self, image: Image.Image, rng: random.Random) -> Image.Image:
        # torchvision's transforms draw from torch's global generator: seed a private fork of it
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(63))
            return self._augment(image)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and keep per-sample lists as lists (``concepts`` is B lists of N words)."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
