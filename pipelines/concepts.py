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
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

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


def concept_region(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """Where the reference cut at ``box`` of a ``width`` x ``height`` picture lies in that picture's square frame.

    Both are made square as ``resize_and_pad`` makes them, centred with their aspect kept: the picture's frame
    is a square of side ``max(width, height)``, the reference's a square of side ``max(box width, box height)``
    around the box's centre. Returns that square as ``(x0, y0, x1, y1)`` in units of the frame (the whole
    picture: about ``(0, 0, 1, 1)``), what ``RetriNetModel``'s ``reference_regions`` takes.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if width < 1 or height < 1:
        raise ValueError(f"cannot place a region in an empty {width}x{height} picture")
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box {list(box)} is empty")
    frame, side = max(width, height), max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2 + (frame - width) / 2, (y0 + y1) / 2 + (frame - height) / 2
    return ((cx - side / 2) / frame, (cy - side / 2) / frame, (cx + side / 2) / frame, (cy + side / 2) / frame)


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


# ---------------------------------------------------------------------- the extractor

RULE_CUT = "face from the head box, clothes below its lower border"
RULE_LOW_HEAD = "head border below 2/3 of the height, so figure only"
RULE_NOTHING_BELOW = "no figure below the head, so figure only"
RULE_NO_HEAD = "no head found, so the whole picture is the figure"
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass
class ConceptCrops:
    """What ``ConceptExtractor.extract`` makes of one picture."""

    image: Image.Image  # the picture as read (RGB, EXIF orientation applied)
    head_box: Box | None
    mask: Image.Image  # figure mask, L 0/255, the picture's size
    face: Image.Image | None
    clothes: Image.Image | None
    figure: Image.Image
    rule: str
    head_confidence: float | None
    figure_confidence: float | None
    num_figures: int

    def crops(self) -> dict[str, Image.Image]:
        """The concepts that could be cut, by name."""
        return {k: v for k, v in (("face", self.face), ("clothes", self.clothes), ("figure", self.figure))
                if v is not None}

    def region(self, concept: str) -> tuple[float, float, float, float] | None:
        """Where the crop of ``concept`` lies in the picture's square frame (``concept_region``): what a RetriNet
        trained with ``retrieval_regions`` reads beside the crop. None when that concept could not be cut."""
        if concept not in CONCEPTS:
            raise ValueError(f"unknown concept {concept!r}; expected one of {', '.join(CONCEPTS)}")
        w, h = self.image.size
        if concept == "figure":
            return concept_region((0, 0, w, h), w, h)
        if concept == "face" and self.face is not None and self.head_box is not None:
            return concept_region(self.head_box, w, h)
        if concept == "clothes" and self.clothes is not None and self.head_box is not None:
            return concept_region(concept_box("clothes", self.head_box, w, h, self.mask), w, h)
        return None


def load_image(image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any picture (PIL, path, bytes, HxWx3 / HxW array) as RGB with its EXIF rotation applied;
    transparent pixels become white. Raises ``ValueError`` for what is not a usable picture."""
    import io

    import numpy as np
    from PIL import ImageOps, UnidentifiedImageError

    try:
        if isinstance(image, (str, os.PathLike)):
            image = Image.open(image)
        elif isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, np.ndarray):
            if image.ndim not in (2, 3) or image.size == 0:
                raise ValueError(f"an array picture is H x W or H x W x 3, got shape {image.shape}")
            image = Image.fromarray(image.astype(np.uint8))
        if not isinstance(image, Image.Image):
            raise ValueError(f"not a picture: {type(image).__name__}")
        w, h = image.size  # read from the header: nothing is decoded before the size is known to be sane
        if w < 1 or h < 1:
            raise ValueError(f"empty picture ({w}x{h})")
        if w * h > max_pixels:
            raise ValueError(f"picture of {w}x{h} pixels is larger than the limit of {max_pixels} pixels")
        image.load()
    except Image.DecompressionBombError as e:  # Pillow's own limit, met before ours when reading the header
        raise ValueError(f"picture too large: {e}") from e
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"not a picture: {e}") from e
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16-bit and float pictures: to 8 bits
        x = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and x.max(initial=0) <= 1:
            x = x * 255  # a float picture in 0..1
        elif x.max(initial=0) > 255:
            x = x / 257  # 16 bits: 65535 -> 255
        image = Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8), "L")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def refine_mask(image: Image.Image, mask: Image.Image, head_box: Sequence[int] | None = None, grow: int = 4,
                tolerance: int = 6) -> Image.Image:
    """Snap a coarse figure mask to the picture's edges.

    A segmentation model's mask (YOLO-seg's comes from a 4x coarser prototype) misses thin limbs and
    strays past outlines. The background is flood-filled, with a colour ``tolerance``, from the
    picture's border pixels that lie well outside the mask (grown by ``grow`` pixels, with the head
    box added); near the mask, whatever the fill cannot reach, because an outline or a change of
    colour stops it, is the figure. Anime figures on plain or simple backgrounds are what this
    suits; it is off unless asked for.
    """
    import cv2
    import numpy as np

    m = np.asarray(mask.convert("L")) > 127
    if head_box is not None:
        x0, y0, x1, y1 = (int(v) for v in head_box)
        m = m.copy()
        m[max(0, y0):y1, max(0, x0):x1] = True
    if not m.any():
        return mask.convert("L")
    h, w = m.shape
    band = cv2.dilate(m.astype(np.uint8), np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)) > 0
    border = np.zeros_like(band)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    seeds = border & ~band  # sure background: the picture's edge, away from the figure
    fill = np.zeros((h + 2, w + 2), np.uint8)
    pixels = np.array(image.convert("RGB"))  # writable: OpenCV asks for it even with FLOODFILL_MASK_ONLY
    flags = 4 | cv2.FLOODFILL_MASK_ONLY | (255 << 8)
    for y, x in zip(*np.nonzero(seeds)):
        if fill[y + 1, x + 1] == 0:
            cv2.floodFill(pixels, fill, (int(x), int(y)), 0, (tolerance,) * 3, (tolerance,) * 3, flags)
    if not fill.any():  # no background to start from: keep the model's mask
        return Image.fromarray((m * 255).astype(np.uint8), "L")
    figure = band & (fill[1:-1, 1:-1] != 255)
    return Image.fromarray((figure * 255).astype(np.uint8), "L")


class ConceptExtractor:
    """Find the head and the figure in a picture and cut the concepts by RetriBooru's rules.

    ``detector(image) -> (heads, figures)`` (see ``pipelines.detector.YoloDetector``); the figure
    mask comes from ``segmenter(image, box)`` when one is given (SAM), else from the detector's own
    figure mask (YOLO-seg), else the whole picture. With several figures the largest is used.
    """

    def __init__(self, detector, segmenter=None, fill: str = "white", max_pixels: int = DEFAULT_MAX_PIXELS,
                 refine: bool = False):
        if fill not in ("white", "transparent"):
            raise ValueError(f"fill must be 'white' or 'transparent', got {fill!r}")
        self.detector, self.segmenter, self.fill, self.max_pixels = detector, segmenter, fill, max_pixels
        self.refine = refine  # snap the mask to the picture's edges (``refine_mask``)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, segmenter=None, **kwargs) -> ConceptExtractor:
        """A detector folder written by ``pipelines.detector.export_yolo`` (the demo family's)."""
        from pipelines.detector import YoloDetector, load_yolo

        model, config = load_yolo(folder)
        kwargs = {**config.get("extractor", {}), **kwargs}  # the folder's recommended options, then the caller's
        return cls(YoloDetector(model, imgsz=config.get("imgsz")), segmenter, **kwargs)

    def _cut(self, image: Image.Image, mask: Image.Image, box: Sequence[int] | None) -> Image.Image:
        if self.fill == "transparent":
            out = image.convert("RGBA")
            out.putalpha(mask)
        else:
            out = remove_background(image, mask)
        return out.crop(tuple(box)) if box is not None else out

    def extract(self, image) -> ConceptCrops:
        image = load_image(image, self.max_pixels)
        w, h = image.size
        heads, figures = self.detector(image)
        figure = max(figures, key=lambda d: (d.area, d.confidence)) if figures else None
        head = None
        if heads:
            inside = [d for d in heads if figure is None or _centre_in(d.box, figure.box)]
            head = max(inside or heads, key=lambda d: d.confidence)
        if self.segmenter is not None:
            mask = self.segmenter(image, figure.box if figure else (0, 0, w, h))
        elif figure is not None and figure.mask is not None:
            mask = figure.mask
        else:
            mask = Image.new("L", (w, h), 255)
        if self.refine and (figure is not None or self.segmenter is not None):
            mask = refine_mask(image, mask, head.box if head is not None else None)
        fig = self._cut(image, mask, None)
        common = dict(image=image, mask=mask, figure=fig, num_figures=len(figures),
                      figure_confidence=figure.confidence if figure else None)
        if head is None:
            return ConceptCrops(head_box=None, face=None, clothes=None, rule=RULE_NO_HEAD, head_confidence=None,
                                **common)
        try:
            box = check_box(head.box, w, h)
        except ValueError:
            return ConceptCrops(head_box=None, face=None, clothes=None, rule=RULE_NO_HEAD, head_confidence=None,
                                **common)
        face = self._cut(image, mask, box)
        concept = resolve_concept("clothes", box, w, h, mask)
        if concept == "clothes":
            clothes, rule = self._cut(image, mask, concept_box("clothes", box, w, h, mask)), RULE_CUT
        else:
            clothes = None
            rule = RULE_LOW_HEAD if box[3] > CLOTHES_MAX_HEAD_BOTTOM * h else RULE_NOTHING_BELOW
        return ConceptCrops(head_box=box, face=face, clothes=clothes, rule=rule, head_confidence=head.confidence,
                            **common)


def _centre_in(box: Sequence[int], outer: Sequence[int]) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return outer[0] <= cx <= outer[2] and outer[1] <= cy <= outer[3]
