"""Few-shot evaluation of image variations (seed 004, Sec. 7 and 8.2).

Given the N_g test pictures of each group g, K conditioning pictures per group (drawn from the
test pictures unless given) and a pipeline, generate N_g pictures per group (N_g / K per
conditioning picture, the remainder to the first ones) and compare all the generated pictures
with all the test pictures: Fréchet distance, precision and recall (``pipelines.metrics``) on
features of a configurable extractor, by default the pipeline's own frozen encoder (its global
token). With K = 1 these are the paper's one-shot FID, precision and recall; a model that copies
its conditioning picture gets a low one-shot recall (Sec. 7).

``few_shot_report`` runs it on the test pictures of a data folder (grouped by ``character`` in a
RetriBooru-style folder, by sub-folder in a ``group/picture`` folder), for the pipeline and for
``CopyBaseline``, the model that returns its conditioning picture, as the paper's point of
comparison.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from pipelines.metrics import frechet_distance, precision_recall
from pipelines.semantica.model import image_features

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

Extractor = Callable[[Sequence[PIL.Image.Image]], torch.Tensor]


def encoder_extractor(pipe, batch_size: int = 32) -> Extractor:
    """Features (N, D) of pictures from the global token of ``pipe``'s frozen encoder."""
    return lambda images: image_features(pipe.image_encoder, pipe.feature_extractor, images, batch_size)


def few_shot_scores(pipe, test_pictures: Mapping[str, Sequence[PIL.Image.Image]],
                    conditioning: Mapping[str, Sequence[PIL.Image.Image]] | None = None, shots: int = 1,
                    extractor: Extractor | None = None, guidance_scale: float = 0.5, num_inference_steps: int = 25,
                    height: int | None = None, width: int | None = None, seed: int = 0, k: int = 3,
                    batch_size: int = 8) -> dict[str, Any]:
    """K-shot FID, precision and recall of ``pipe`` on ``test_pictures`` (group -> pictures).

    ``conditioning`` (group -> K pictures) defaults to ``shots`` pictures drawn from each group's
    test pictures with ``seed``. ``k``: the neighbours of precision and recall. Returns ``fid``,
    ``precision``, ``recall``, ``shots`` (K), ``num_real``, ``num_generated`` and the
    ``generated`` pictures (group -> list).
    """
    if not test_pictures:
        raise ValueError("no test pictures given")
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    rng = random.Random(seed)
    extractor = extractor or encoder_extractor(pipe)
    generated: dict[str, list[PIL.Image.Image]] = {}
    real: list[PIL.Image.Image] = []
    n_shots = None
    for gi, (group, pictures) in enumerate(test_pictures.items()):
        pictures = list(pictures)
        if conditioning is not None:
            if group not in conditioning:
                raise ValueError(f"no conditioning pictures for group {group!r}")
            cond = list(conditioning[group])
        else:
            if len(pictures) < shots:
                raise ValueError(f"group {group!r} has {len(pictures)} test pictures, fewer than {shots} shots")
            cond = rng.sample(pictures, shots)
        if not cond or len(cond) > len(pictures):
            raise ValueError(f"group {group!r}: {len(cond)} conditioning pictures for {len(pictures)} test pictures")
        if n_shots is not None and len(cond) != n_shots:
            raise ValueError(f"every group needs the same number of conditioning pictures ({n_shots} and {len(cond)})")
        n_shots = len(cond)
        real += pictures
        counts = [len(pictures) // len(cond) + (i < len(pictures) % len(cond)) for i in range(len(cond))]
        out: list[PIL.Image.Image] = []
        for ci, (picture, count) in enumerate(zip(cond, counts)):
            for start in range(0, count, batch_size):
                n = min(batch_size, count - start)
                gen = torch.Generator().manual_seed(seed * 1_000_003 + gi * 10_007 + ci * 101 + start)
                out += pipe(picture, num_images_per_prompt=n, guidance_scale=guidance_scale,
                            num_inference_steps=num_inference_steps, generator=gen, height=height,
                            width=width).images
        generated[group] = out
    fake = [im for ims in generated.values() for im in ims]
    real_f, fake_f = extractor(real), extractor(fake)  # (N, D) each
    precision, recall = precision_recall(real_f, fake_f, k=k)
    return {"fid": frechet_distance(real_f, fake_f), "precision": precision, "recall": recall, "shots": n_shots,
            "num_real": len(real), "num_generated": len(fake), "generated": generated}


class CopyBaseline:
    """A "variation" model that returns its conditioning picture, resized to the output size: the
    copying that reconstruction-trained models tend to (Sec. 4) and that one-shot recall exposes."""

    def __init__(self, size: int = 64):
        self.size = size

    def __call__(self, image: PIL.Image.Image, num_images_per_prompt: int = 1, height: int | None = None,
                 width: int | None = None, **kwargs):
        copy = image.convert("RGB").resize((width or self.size, height or self.size), PIL.Image.Resampling.BICUBIC)
        return type("CopyOutput", (), {"images": [copy.copy() for _ in range(num_images_per_prompt)]})()


def read_groups(root: str | Path, split: str | None = "test") -> dict[str, list[Path]]:
    """Picture files by group: ``character`` of the records of ``split`` in a RetriBooru-style
    folder, or the sub-folders of a ``group/picture`` folder (of ``root/split`` when it exists)."""
    root = Path(root)
    groups: dict[str, list[Path]] = defaultdict(list)
    if (root / "annotations.jsonl").is_file():
        for line in (root / "annotations.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("character") and rec.get("file") and \
                    (split is None or rec.get("split") == split) and (root / rec["file"]).is_file():
                groups[str(rec["character"])].append(root / rec["file"])
    elif root.is_dir():
        base = root / split if split is not None and (root / split).is_dir() else root
        for g in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(p for p in g.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            if files:
                groups[g.name] = files
    else:
        raise ValueError(f"{root} is not a folder")
    if not groups:
        raise ValueError(f"{root}: no grouped pictures in split {split!r}")
    return dict(groups)


def few_shot_report(pipeline, data: str | Path, split: str | None = "test", seed: int = 0, groups: int | None = None,
                    pictures_per_group: int = 10, shots: int = 1, guidance_scale: float = 0.5,
                    num_inference_steps: int = 25) -> dict[str, Any]:
    """K-shot FID, precision and recall of ``pipeline`` (a ``SemanticaPipeline`` or its folder) and
    of ``CopyBaseline`` on up to ``pictures_per_group`` test pictures of up to ``groups`` groups of
    ``data`` (drawn with ``seed``; 10 per class as in Sec. 8.2), on the pipeline encoder's features.
    A JSON-ready dict: ``semantica`` and ``copy`` (``fid``, ``precision``, ``recall``), ``shots``,
    ``groups``, ``num_real``, ``guidance_scale``."""
    if isinstance(pipeline, (str, Path)):
        from pipelines.semantica.pipeline import SemanticaPipeline

        pipeline = SemanticaPipeline.from_pretrained(pipeline)
        pipeline.set_progress_bar_config(disable=True)
    rng = random.Random(seed)
    found = {g: files for g, files in read_groups(data, split).items() if len(files) > shots}
    if not found:
        raise ValueError(f"{data}: no group with more than {shots} test pictures")
    names = sorted(found)
    if groups is not None:
        names = sorted(rng.sample(names, min(groups, len(names))))
    test = {}
    for g in names:
        files = rng.sample(found[g], min(pictures_per_group, len(found[g])))
        test[g] = [_open_rgb(f) for f in files]
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    extractor = encoder_extractor(pipeline)
    common = {"shots": shots, "extractor": extractor, "seed": seed, "height": size, "width": size}
    ours = few_shot_scores(pipeline, test, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                           **common)
    copy = few_shot_scores(CopyBaseline(size), test, **common)
    keys = ("fid", "precision", "recall")
    return {"semantica": {k: ours[k] for k in keys}, "copy": {k: copy[k] for k in keys}, "shots": shots,
            "groups": len(test), "num_real": ours["num_real"], "guidance_scale": guidance_scale}


def _open_rgb(path: Path) -> PIL.Image.Image:
    with PIL.Image.open(path) as im:
        return im.convert("RGB")
