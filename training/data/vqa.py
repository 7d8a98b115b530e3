"""Answering questions about pictures, for clustering outfits (seed 002, A.1) and the VQA score.

RetriBooru asks InstructBLIP (Vicuna-7B) "List top two colors of the character's clothes" and
clusters pictures whose answers match exactly. Two backends answer here:

- ``InstructBlipAnswerer``: transformers' InstructBLIP or BLIP-2, any Hub id or folder
  (``Salesforce/instructblip-vicuna-7b`` as in the paper);
- ``ColorAnswerer``: the offline stand-in for the demo. It is not a VQA model: whatever the
  question, it names the two colours (or as many as the question asks: "top three colors") that cover most of the clothes region (the figure below the
  head; skin, the hair's colour, and black thinner than outlines left out) from a fixed palette,
  most covered first, as "red and white".
"""

from __future__ import annotations

import colorsys
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image

CLOTHES_QUESTION = "List top two colors of the character's clothes"
_COUNTS = {"one": 1, "two": 2, "three": 3, "four": 4}  # how many colours a question asks for

# hue bands (degrees) of the saturated colours; black, white and grey come from value and saturation
_HUES = (("red", 0, 15), ("orange", 15, 40), ("yellow", 40, 70), ("green", 70, 170), ("aqua", 170, 200),
         ("blue", 200, 255), ("purple", 255, 290), ("pink", 290, 345), ("red", 345, 361))


def color_name(r: int, g: int, b: int) -> str | None:
    """A palette name for one colour; ``None`` for skin tones (not clothes)."""
    h, s, v = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    deg = h * 360
    if v < 0.22:
        return "black"
    if s < 0.14:
        return "white" if v > 0.85 else "grey"
    if 12 <= deg <= 40 and s < 0.4 and v > 0.75:
        return None  # skin
    if 15 <= deg <= 45 and v < 0.6:
        return "brown"
    return next(name for name, lo, hi in _HUES if lo <= deg < hi)


def normalise_answer(text: str) -> str:
    """Lower case, punctuation and extra spaces removed: the form answers are matched in.
    The order of words is kept (Algorithm 1 is order-sensitive)."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


class ColorAnswerer:
    """Names the two dominant palette colours of a clothes region (see the module docstring).

    Hair that falls below the head (long hair, twintails) is not clothes: given the face crop, the
    colour that dominates its top rows (the hair) is left out of the clothes' colours."""

    def __init__(self, min_share: float = 0.05, min_black_share: float = 0.3):
        self.min_share = min_share
        self.min_black_share = min_black_share  # thinner black is outlines and shoes, not a garment
        self._cache: dict[tuple[int, int, int], str | None] = {}

    def votes(self, picture: Image.Image) -> Counter[str]:
        """Opaque pixels per palette colour (skin left out)."""
        rgba = np.asarray(picture.convert("RGBA"))
        pixels = rgba[rgba[..., 3] > 127][:, :3] // 8 * 8  # quantised, transparent background dropped
        colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        votes: Counter[str] = Counter()
        for c, n in zip(map(tuple, colours.tolist()), counts.tolist()):
            if c not in self._cache:
                self._cache[c] = color_name(*c)
            name = self._cache[c]
            if name is not None:
                votes[name] += n
        return votes

    def hair_color(self, face: Image.Image | None) -> str | None:
        if face is None:
            return None
        top = face.crop((0, 0, face.width, max(1, face.height * 2 // 5)))
        votes = self.votes(top)
        votes.pop("black", None)  # outlines and pupils
        return votes.most_common(1)[0][0] if votes else None

    def answer(self, clothes: Image.Image | None, questions: Sequence[str], face: Image.Image | None = None) -> list[str]:
        if clothes is None:
            return ["unknown"] * len(questions)
        votes = self.votes(clothes)
        hair = self.hair_color(face)
        if hair is not None:
            votes.pop(hair, None)
        if votes["black"] < self.min_black_share * sum(votes.values()):
            votes.pop("black", None)
        total = sum(votes.values())
        out = []
        for q in questions:
            k = next((n for word, n in _COUNTS.items() if re.search(rf"\b{word}\b", q.lower())), 2)
            top = [name for name, n in votes.most_common(k) if total and n / total >= self.min_share]
            out.append(", ".join(top[:-1]) + " and " + top[-1] if len(top) > 1 else (top[0] if top else "unknown"))
        return out


class InstructBlipAnswerer:
    """transformers' InstructBLIP (or BLIP-2) answering each question about the whole picture."""

    def __init__(self, model, processor, max_new_tokens: int = 16, device: str = "cpu"):
        self.model, self.processor = model.eval().to(device), processor
        self.max_new_tokens, self.device = max_new_tokens, device

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> InstructBlipAnswerer:
        from transformers import AutoProcessor, Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

        processor = AutoProcessor.from_pretrained(name_or_path)
        try:
            model = InstructBlipForConditionalGeneration.from_pretrained(name_or_path)
        except (ValueError, OSError):
            model = Blip2ForConditionalGeneration.from_pretrained(name_or_path)
        return cls(model, processor, **kwargs)

    def answer(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        import torch

        out = []
        for q in questions:
            inputs = self.processor(images=image.convert("RGB"), text=q, return_tensors="pt").to(self.device)
            with torch.no_grad():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            out.append(self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip())
        return out
