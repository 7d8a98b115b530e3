"""CLIP-I and CLIP-T through transformers' ``CLIPModel`` (seed 001, Sec. 3.1; seed 000, Sec. 6.1).

- CLIP-I: cosine between the image embeddings of a generated picture and each of its references,
  averaged over the references;
- CLIP-T: cosine between the picture's and its prompt's embeddings (torchmetrics' ``CLIPScore`` is
  100 times this, clamped at 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image


def _pooled(out) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5 returns an output


class ClipScorer:
    """Embeds pictures and texts with a ``CLIPModel`` and its ``CLIPProcessor``; batches ``batch_size``."""

    def __init__(self, model, processor, batch_size: int = 64, device: str | torch.device = "cpu"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model, self.processor = model.eval().to(device), processor
        self.batch_size, self.device = batch_size, torch.device(device)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> ClipScorer:
        from transformers import CLIPModel, CLIPProcessor

        return cls(CLIPModel.from_pretrained(name_or_path), CLIPProcessor.from_pretrained(name_or_path), **kwargs)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm embeddings (N, D) of PIL pictures."""
        if not len(images):
            raise ValueError("no picture to embed")
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[i:i + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(_pooled(self.model.get_image_features(pixel_values=pixels)))
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings (N, D) of texts (truncated to the model's length)."""
        if not len(texts):
            raise ValueError("no text to embed")
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.processor(text=list(texts[i:i + self.batch_size]), return_tensors="pt", padding=True,
                                 truncation=True)
            out.append(_pooled(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                            attention_mask=tok["attention_mask"].to(self.device))))
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)

    def clip_t(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """(N,) cosine of each picture with its prompt."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} pictures for {len(prompts)} prompts")
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)

    def clip_i(self, images: Sequence[Image.Image], references: Sequence[Sequence[Image.Image]]) -> torch.Tensor:
        """(N,) cosine of each picture with each of its references, averaged over the references."""
        if len(images) != len(references):
            raise ValueError(f"{len(images)} pictures for {len(references)} lists of references")
        if any(len(r) == 0 for r in references):
            raise ValueError("a picture has no reference")
        g = self.image_embeds(images)
        flat = [im for refs in references for im in refs]
        e = self.image_embeds(flat)
        out, start = [], 0
        for i, refs in enumerate(references):
            out.append((e[start:start + len(refs)] @ g[i]).mean())
            start += len(refs)
        return torch.stack(out)

    def scores(self, images: Sequence[Image.Image], references: Sequence[Sequence[Image.Image]],
               prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP-I, CLIP-T), each (N,), embedding every picture once (a sweep cell's scoring)."""
        if not (len(images) == len(references) == len(prompts)):
            raise ValueError(f"{len(images)} pictures, {len(references)} lists of references and {len(prompts)} "
                             "prompts; one of each per picture")
        if any(len(r) == 0 for r in references):
            raise ValueError("a picture has no reference")
        flat = [im for refs in references for im in refs]
        e = self.image_embeds([*images, *flat])
        g, r = e[:len(images)], e[len(images):]
        clip_i, start = [], 0
        for i, refs in enumerate(references):
            clip_i.append((r[start:start + len(refs)] @ g[i]).mean())
            start += len(refs)
        return torch.stack(clip_i), (g * self.text_embeds(prompts)).sum(-1)
