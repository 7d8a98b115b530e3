"""Pairs of pictures for Semantica (seed 004, Sec. 5 and App. C).

Semantica learns to denoise one picture while it reads another picture of the same group (a web
page in the paper). A candidate pair is two different pictures of one group; it is kept only if
the cosine similarity of the frozen encoder's global tokens lies in ``[min_similarity,
max_similarity]`` (0.3 and 0.9 for DINOv2, App. C): below, the pictures are unrelated; above,
near duplicates, which teach copying instead of variation.

Sources:

- a RetriBooru-style folder (``annotations.jsonl``; read with ``training.data.retribooru``): the
  group of a picture is its ``character`` together with its ``similar`` list (either direction);
  ``split`` selects the records (None: all);
- any folder of ``group/picture`` files (png, jpg, jpeg, webp, bmp): the sub-folder is the group;
  a ``split`` sub-folder (``root/train/group/picture``) is used when it exists.

The global tokens are computed in batches and cached in ``cache_dir/pair_embeddings.pt``, keyed by
the encoder (its config, processor and a fingerprint of its weights) and the files (path, size,
time), so a resumed run reads them instead of computing them again. Pictures that cannot be
decoded are left out and counted.

``PairDataset`` yields one sample per target picture that kept a partner; the condition is one of
its kept partners, drawn from (seed, epoch, index) so a resumed run sees the same samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from pipelines.semantica.model import image_features, process_images
from training.data.retribooru import CorruptFile, read_annotations, to_tensor
from training.files import replacing_file

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_FILE = "pair_embeddings.pt"


@dataclass(frozen=True)
class Picture:
    """One picture of the pair pool."""

    id: str
    path: Path
    group: str


def open_picture(path: Path) -> Image.Image:
    """An RGB picture; ``CorruptFile`` if it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for broken files
        raise CorruptFile(f"{path}: cannot read the picture ({e})") from e


# ---------------------------------------------------------------------- sources

def retribooru_pictures(root: str | Path, split: str | None) -> tuple[list[Picture], list[tuple[int, int]]]:
    """Pictures of a RetriBooru-style folder and their candidate pairs (i < j): same ``character``,
    or one in the other's ``similar`` list."""
    root = Path(root)
    records, skipped = read_annotations(root)
    if not records:
        raise ValueError(f"{root}: no usable record in annotations.jsonl")
    if split is not None:
        if not any("split" in r for r in records):
            raise ValueError(f"{root} has no 'split' field; use split none to take every record")
        records = [r for r in records if r.get("split") == split]
        if not records:
            raise ValueError(f"{root} has no record in split {split!r}")
    missing = [r for r in records if not (root / r["file"]).is_file()]
    if missing:
        logger.warning("%s: %d records without their picture are left out", root, len(missing))
    records = [r for r in records if (root / r["file"]).is_file()]
    if skipped:
        logger.warning("%s: skipped %d malformed records", root, sum(skipped.values()))
    index = {r["id"]: i for i, r in enumerate(records)}
    pictures = [Picture(r["id"], root / r["file"], str(r.get("character") or r["id"])) for r in records]
    pairs: set[tuple[int, int]] = set()
    by_character = defaultdict(list)
    for i, r in enumerate(records):
        if r.get("character"):
            by_character[r["character"]].append(i)
        for s in r["similar"]:
            j = index.get(s)
            if j is not None and j != i:
                pairs.add((min(i, j), max(i, j)))
    for members in by_character.values():
        pairs.update((a, b) for n, a in enumerate(members) for b in members[n + 1:])
    return pictures, sorted(pairs)


def folder_pictures(root: str | Path, split: str | None = None) -> tuple[list[Picture], list[tuple[int, int]]]:
    """Pictures of a ``group/picture`` folder and their candidate pairs (i < j, same group)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    if split is not None and (root / split).is_dir():
        root = root / split
    elif split is not None:
        logger.info("%s has no %r sub-folder: every group folder is used", root, split)
    groups = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not groups:
        raise ValueError(f"{root} has no group folders; expected {root}/<group>/<picture> files or annotations.jsonl")
    pictures: list[Picture] = []
    pairs: list[tuple[int, int]] = []
    for g in groups:
        files = sorted(p for p in g.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not p.name.startswith("."))
        start = len(pictures)
        pictures += [Picture(f"{g.name}/{p.name}", p, g.name) for p in files]
        pairs += [(a, b) for a in range(start, len(pictures)) for b in range(a + 1, len(pictures))]
    if not pairs:
        raise ValueError(f"no group folder of {root} holds two pictures ({', '.join(IMAGE_SUFFIXES)}); "
                         f"a pair needs two pictures of one group")
    return pictures, pairs


def list_pictures(root: str | Path, split: str | None) -> tuple[list[Picture], list[tuple[int, int]]]:
    """Pictures and candidate pairs of either source (``annotations.jsonl`` decides)."""
    root = Path(root)
    if (root / "annotations.jsonl").is_file():
        pictures, pairs = retribooru_pictures(root, split)
    else:
        pictures, pairs = folder_pictures(root, split)
    if not pairs:
        raise ValueError(f"{root}: no two pictures share a group (split={split!r})")
    return pictures, pairs


# ---------------------------------------------------------------------- embeddings and the filter

def _fingerprint(encoder, processor, pictures: Sequence[Picture]) -> str:
    h = hashlib.sha1()
    h.update(json.dumps(encoder.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(json.dumps(processor.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in encoder.state_dict().items():
            v = p.detach().float().flatten()
            h.update(f"{name}{tuple(p.shape)}{v.double().sum().item():.10e}".encode())
            h.update(v[:64].cpu().numpy().tobytes())
    for pic in pictures:
        st = pic.path.stat() if pic.path.exists() else None
        h.update(f"{pic.id}|{pic.path}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()


def embed_pictures(pictures: Sequence[Picture], encoder, processor, cache_dir: str | Path | None = None,
                   batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm global tokens (N, D) of ``pictures`` (zero rows for unreadable ones) and which are
    readable (N,) bool; read from, or written to, ``cache_dir/pair_embeddings.pt``."""
    cache = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    key = _fingerprint(encoder, processor, pictures)
    if cache is not None and cache.is_file():
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                logger.info("read the pair embeddings of %d pictures from %s", len(pictures), cache)
                return saved["features"], saved["readable"]
        except (OSError, RuntimeError, EOFError, KeyError, AttributeError) as e:
            logger.warning("ignoring the unreadable embedding cache %s (%s)", cache, e)
    d = encoder.config.hidden_size
    features = torch.zeros(len(pictures), d)  # (N, D)
    readable = torch.zeros(len(pictures), dtype=torch.bool)
    for start in range(0, len(pictures), batch_size):
        images, rows = [], []
        for i in range(start, min(start + batch_size, len(pictures))):
            try:
                images.append(open_picture(pictures[i].path))
                rows.append(i)
            except CorruptFile as e:
                logger.warning("left out of the pairs: %s", e)
        if images:
            feats = image_features(encoder, processor, images, batch_size=len(images))  # (b, D)
            features[rows] = torch.nn.functional.normalize(feats, dim=-1)
            readable[rows] = True
    if cache is not None:
        with replacing_file(cache) as tmp:
            torch.save({"key": key, "features": features, "readable": readable}, tmp)
    return features, readable


def check_thresholds(min_similarity: float, max_similarity: float) -> None:
    if not -1.0 <= min_similarity <= max_similarity <= 1.0:
        raise ValueError(f"similarity thresholds must satisfy -1 <= min <= max <= 1, got min {min_similarity} "
                         f"and max {max_similarity}")


def filter_pairs(pairs: Sequence[tuple[int, int]], features: torch.Tensor, min_similarity: float = 0.3,
                 max_similarity: float = 0.9,
                 readable: torch.Tensor | None = None) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """The pairs whose cosine similarity lies in [min_similarity, max_similarity], and how many
    each rule removed: ``unreadable`` (a picture could not be read), ``below_min_similarity``,
    ``above_max_similarity``. ``features`` (N, D) need not be normalised."""
    check_thresholds(min_similarity, max_similarity)
    counts = {"candidate_pairs": len(pairs), "unreadable": 0, "below_min_similarity": 0, "above_max_similarity": 0}
    if not pairs:
        return [], {**counts, "kept_pairs": 0}
    idx = torch.tensor(pairs, dtype=torch.long)  # (P, 2)
    f = torch.nn.functional.normalize(torch.as_tensor(features).double(), dim=-1)
    cos = (f[idx[:, 0]] * f[idx[:, 1]]).sum(-1)  # (P,)
    ok = torch.ones(len(pairs), dtype=torch.bool) if readable is None else readable[idx[:, 0]] & readable[idx[:, 1]]
    below, above = ok & (cos < min_similarity), ok & (cos > max_similarity)
    keep = ok & ~below & ~above
    counts.update(unreadable=int((~ok).sum()), below_min_similarity=int(below.sum()),
                  above_max_similarity=int(above.sum()), kept_pairs=int(keep.sum()))
    return [p for p, k in zip(pairs, keep.tolist()) if k], counts


# ---------------------------------------------------------------------- the data set

class PairDataset(Dataset):
    """Items: ``pixel_values`` (3, R, R) in [-1, 1], the target (resized and centre-cropped for the
    VAE); ``condition_pixel_values`` (3, S, S), another picture of its group as the encoder's
    processor prepares it; ``id`` and ``condition_id``. Use ``training.data.retribooru.collate``."""

    def __init__(self, pictures: Sequence[Picture], pairs: Sequence[tuple[int, int]], processor, resolution: int,
                 seed: int = 0):
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
        if not pairs:
            raise ValueError("no pair to train on")
        self.pictures, self.processor, self.resolution, self.seed = list(pictures), processor, resolution, seed
        partners: dict[int, set[int]] = defaultdict(set)
        for a, b in pairs:
            partners[a].add(b)
            partners[b].add(a)
        self.partners = {t: sorted(p) for t, p in partners.items()}
        self.targets = sorted(self.partners)
        self.epoch = 0
        self.skipped: Counter = Counter()
        self._bad: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.targets)

    def _load(self, i: int) -> Image.Image | None:
        if i in self._bad:
            return None
        try:
            return open_picture(self.pictures[i].path)
        except CorruptFile as e:
            self._bad.add(i)
            self.skipped["corrupt_file"] += 1
            logger.warning("%s", e)
            return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        for attempt in range(len(self)):
            t = self.targets[(index + attempt) % len(self)]
            rng = random.Random(f"{self.seed}/{self.epoch}/{index}/{attempt}")
            target = self._load(t)
            pool = [p for p in self.partners[t] if p not in self._bad]
            rng.shuffle(pool)
            cond = next(((p, im) for p in pool if (im := self._load(p)) is not None), None)
            if target is None or cond is None:
                continue
            fitted = ImageOps.fit(target, (self.resolution, self.resolution), Image.Resampling.BICUBIC)
            return {
                "pixel_values": to_tensor(fitted),  # (3, R, R)
                "condition_pixel_values": process_images(self.processor, [cond[1]])[0],  # (3, S, S)
                "id": self.pictures[t].id,
                "condition_id": self.pictures[cond[0]].id,
            }
        raise RuntimeError(f"every picture of the pairs is unreadable ({dict(self.skipped)})")


def make_pair_dataset(root: str | Path, split: str | None, encoder, processor, resolution: int,
                      min_similarity: float = 0.3, max_similarity: float = 0.9, cache_dir: str | Path | None = None,
                      batch_size: int = 32, seed: int = 0) -> tuple[PairDataset, dict[str, Any]]:
    """The filtered pairs of ``root`` as a ``PairDataset``, and the report of the filter (logged)."""
    check_thresholds(min_similarity, max_similarity)
    pictures, pairs = list_pictures(root, split)
    features, readable = embed_pictures(pictures, encoder, processor, cache_dir, batch_size)
    kept, counts = filter_pairs(pairs, features, min_similarity, max_similarity, readable)
    report = {"pictures": len(pictures), "groups": len({p.group for p in pictures}), **counts,
              "min_similarity": min_similarity, "max_similarity": max_similarity}
    logger.info("%s: %d pictures in %d groups, %d candidate pairs: %d unreadable, %d below %.2f, %d above %.2f, "
                "%d kept", root, report["pictures"], report["groups"], counts["candidate_pairs"], counts["unreadable"],
                counts["below_min_similarity"], min_similarity, counts["above_max_similarity"], max_similarity,
                counts["kept_pairs"])
    if not kept:
        raise ValueError(f"{root}: no pair left with a similarity in [{min_similarity}, {max_similarity}] "
                         f"({counts['below_min_similarity']} below, {counts['above_max_similarity']} above, "
                         f"{counts['unreadable']} unreadable of {counts['candidate_pairs']})")
    dataset = PairDataset(pictures, kept, processor, resolution, seed)
    report["targets"] = len(dataset)
    return dataset, report
