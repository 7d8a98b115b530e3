"""Concept references: cut a picture into the concepts "face", "clothes" and "figure".

The rules are RetriBooru's (seed 002, A.4; seed 001, Sec. 5):

- **face**: the head bounding box.
- **clothes**: the figure with every row above the lower border of the head box removed
  (rows ``y < y_max`` go), tightened to the figure mask.
- **figure**: the whole picture, unchanged.
- In concept composition each reference becomes "face" or "clothes" with equal probability;
  a "clothes" reference whose head box ends below two thirds of the height (``y_max > 2/3 H``:
  the character is upside-down or the picture is a face close-up) stays whole and is captioned
  "figure". So does one with no figure pixel below the head.

References have their background removed by the figure mask, and every picture that enters a
model is resized with its aspect kept and padded to a square (``resize_and_pad``), so that a
"valid area" mask can tell the padding apart (seed 001, Eq. 3).

Boxes are ``[x0, y0, x1, y1]`` in pixels, with ``x1`` and ``y1`` exclusive, as in PIL.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from PIL import Image

CONCEPTS = ("face", "clothes", "figure")
# a "clothes" reference whose head box ends lower than this share of the height stays whole
CLOTHES_MAX_HEAD_BOTTOM = 2 / 3

Box = tuple[int, int, int, int]


def check_box(face_bbox: Sequence[float], width: int, height: int) -> Box:
    """Round ``face_bbox`` to pixels, clamp it to the picture, and reject empty boxes."""
    if len(face_bbox) != 4:
        raise ValueError(f"a face box has 4 numbers [x0, y0, x1, y1], got {len(face_bbox)}")
    x0, y0, x1, y1 = (int(round(v)) for v in face_bbox)
    x0, x1 = max(0, x0), min(width, x1)
    y0, y1 = max(0, y0), min(height, y1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"face box {list(face_bbox)} is empty inside a {width}x{height} picture")
    return x0, y0, x1, y1


def resolve_concept(concept: str, face_bbox: Sequence[float], width: int, height: int,
                    mask: Image.Image | None = None) -> str:
    """The concept a reference really gets: "clothes" falls back to "figure" by the 2/3 rule."""
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; expected one of {', '.join(CONCEPTS)}")
    if concept != "clothes":
        return concept
    y_max = check_box(face_bbox, width, height)[3]
    if y_max > CLOTHES_MAX_HEAD_BOTTOM * height:
        return "figure"
    if mask is not None and mask.crop((0, y_max, width, height)).getbbox() is None:
        return "figure"  # nothing of the figure lies below the head
    return "clothes"


def composition_concept(face_bbox: Sequence[float], width: int, height: int, rng: random.Random,
                        mask: Image.Image | None = None) -> str:
    """Concept composition: "face" or "clothes" with equal probability, then the 2/3 rule."""
    return resolve_concept(rng.choice(("face", "clothes")), face_bbox, width, height, mask)


def concept_box(concept: str, face_bbox: Sequence[float], width: int, height: int,
                mask: Image.Image | None = None) -> Box:
    """The crop box of ``concept`` (already resolved) in a ``width`` x ``height`` picture."""
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; expected one of {', '.join(CONCEPTS)}")
    if concept == "figure":
        return 0, 0, width, height
    box = check_box(face_bbox, width, height)
    if concept == "face":
        return box
    y_max = box[3]
    if y_max >= height:
        raise ValueError("no clothes below a head box that reaches the bottom of the picture")
    region = (0, y_max, width, height)
    if mask is not None:
        inner = mask.crop(region).getbbox()
        if inner is None:
            raise ValueError("no figure pixel below the head box; use the 'figure' concept")
        region = (inner[0], y_max + inner[1], inner[2], y_max + inner[3])
    return region


def remove_background(image: Image.Image, mask: Image.Image, fill=(255, 255, 255)) -> Image.Image:
    """``image`` with every pixel outside the figure ``mask`` (L, 0/255) set to ``fill``."""
    if image.size != mask.size:
        raise ValueError(f"image is {image.size[0]}x{image.size[1]} but its mask is {mask.size[0]}x{mask.size[1]}")
    out = Image.new("RGB", image.size, fill)
    out.paste(image.convert("RGB"), (0, 0), mask.convert("L"))
    return out


def crop_concept(image: Image.Image, mask: Image.Image, face_bbox: Sequence[float], concept: str,
                 fill=(255, 255, 255)) -> tuple[Image.Image, Image.Image, str]:
    """Cut ``concept`` out of ``image``: background removed, cropped by the rules above.

    Returns the reference picture, its mask, and the concept it really got ("clothes" may
    become "figure").
    """
    w, h = image.size
    concept = resolve_concept(concept, face_bbox, w, h, mask)
    box = concept_box(concept, face_bbox, w, h, mask)
    clean = remove_background(image, mask, fill)
    return clean.crop(box), mask.convert("L").crop(box), concept


def _fit(width: int, height: int, size: int) -> tuple[float, int, int, int, int]:
    """Scale, new size and offset that ``resize_and_pad`` uses for a ``width`` x ``height`` picture."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if width < 1 or height < 1:
        raise ValueError(f"cannot resize an empty {width}x{height} picture")
    scale = size / max(width, height)
    nw, nh = max(1, round(width * scale)), max(1, round(height * scale))
    return scale, nw, nh, (size - nw) // 2, (size - nh) // 2


def resize_and_pad(image: Image.Image, size: int, fill=(255, 255, 255),
                   resample: Image.Resampling = Image.Resampling.BICUBIC) -> tuple[Image.Image, Box]:
    """Resize ``image`` so that its longer side is ``size``, keep the aspect, centre it on a
    ``size`` x ``size`` canvas filled with ``fill``. Returns the canvas and the valid area box."""
    _, nw, nh, x0, y0 = _fit(*image.size, size)
    canvas = Image.new(image.mode, (size, size), fill)
    canvas.paste(image.resize((nw, nh), resample), (x0, y0))
    return canvas, (x0, y0, x0 + nw, y0 + nh)


def scale_box(box: Sequence[float], width: int, height: int, size: int) -> Box:
    """Map a box of a ``width`` x ``height`` picture into the canvas of ``resize_and_pad(.., size)``,
    rounded outwards so that the mapped box covers the original."""
    scale, _, _, x0, y0 = _fit(width, height, size)
    eps = 1e-6  # so that float noise never grows a box by a whole pixel
    return (math.floor(x0 + box[0] * scale + eps), math.floor(y0 + box[1] * scale + eps),
            math.ceil(x0 + box[2] * scale - eps), math.ceil(y0 + box[3] * scale - eps))
