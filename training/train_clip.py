"""Train a (small) ``CLIPModel`` contrastively on pictures and their tag captions.

    accelerate launch -m training.train_clip --data DIR --output-dir OUT --resolution 64

CLIP's symmetric InfoNCE loss (Radford et al., 2021; ``CLIPModel(return_loss=True)``) over the
pictures of a RetriBooru-style folder and captions made from their tags, a random part of the
tags left out of each caption (``--tag-dropout``) so short prompts also land near their
pictures. With ``--hard-negatives [K]`` each caption also meets, as negatives for its own picture
only, K copies of it (1 when K is not given), each with the attribute words of a different pair of
its tags swapped ("green kimono, blue sash" against "blue kimono, green sash"): NegCLIP's swap
negatives (Yuksekgonul et al., 2023, "When and why vision-language models behave like
bags-of-words"), which a tower that reads its caption as a bag of words cannot rank below the
truth. ``--pattern-words`` adds replace negatives for the patterns (NegCLIP's other kind): a caption naming
one of them also meets itself with that pattern replaced by another ("plaid kimono" for "striped kimono"),
first among its K. The tokenizer is ``--tokenizer`` or, by default, a word-level ``CLIPTokenizer`` built
from the folder's tag vocabulary (``pipelines.components.write_word_tokenizer``). The model,
its tokenizer and an image processor that matches the training transform are saved to
``OUT/clip``, loadable with ``CLIPModel`` / ``CLIPProcessor.from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from pipelines.components import DEMO_CLIP_PROJECTION, DEMO_CLIP_TEXT, DEMO_CLIP_VISION, write_word_tokenizer
from training.core import (Trainer, add_training_arguments, check_training_arguments, prepare_optimisation, start_run,
                           trainer_config)
from training.data.images import TaggedImages, caption_words, collate_images

logger = logging.getLogger("train_clip")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="accelerate launch -m training.train_clip", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a RetriBooru-style folder")
    p.add_argument("--split", default="train", help="split to train on ('none': every record)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--tokenizer", default=None, help="a CLIPTokenizer folder (default: built from the tags)")
    p.add_argument("--clip-config", default=None, help="JSON file of CLIPConfig arguments (default: the demo's)")
    p.add_argument("--tag-dropout", type=float, default=0.2)
    p.add_argument("--hard-negatives", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="add to each picture's negatives K copies of its caption (1 if K is not given), each with "
                        "the attribute words of two tags swapped (default: none)")
    p.add_argument("--pattern-words", default=None, metavar="W1,W2,...",
                   help="with --hard-negatives: draw first, for a caption naming one of these patterns (tag words, "
                        "e.g. striped,plaid,polka_dot), negatives that replace it with another")
    add_training_arguments(p, learning_rate=5e-4, batch_size=128, max_train_steps=1000, checkpointing_steps=100)
    args = p.parse_args(argv)
    check_training_arguments(p, args)
    if not 0 <= args.tag_dropout < 1:
        p.error("--tag-dropout must be in [0, 1)")
    if args.hard_negatives < 0:
        p.error("--hard-negatives must not be negative")
    args.patterns = tuple(w.strip().replace("_", " ") for w in (args.pattern_words or "").split(",") if w.strip())
    if args.pattern_words is not None and (not args.hard_negatives or len(args.patterns) < 2):
        p.error("--pattern-words needs --hard-negatives and at least two pattern words")
    return args


def build_clip(args, tokenizer: CLIPTokenizer) -> CLIPModel:
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if args.clip_config:
        try:
            kwargs = json.loads(Path(args.clip_config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read --clip-config {args.clip_config}: {e}") from e
    else:
        kwargs = {"text_config": dict(DEMO_CLIP_TEXT), "vision_config": dict(DEMO_CLIP_VISION),
                  "projection_dim": DEMO_CLIP_PROJECTION}
    kwargs["text_config"] = {**kwargs.get("text_config", {}), "vocab_size": len(tokenizer), **ids}
    kwargs["vision_config"] = {**kwargs.get("vision_config", {}), "image_size": args.resolution}
    return CLIPModel(CLIPConfig(**kwargs))


def image_processor(resolution: int) -> CLIPImageProcessor:
    """CLIP's preprocessing at ``resolution`` (its mean and std; resizing is a no-op on
    ``resolution``-pixel squares, which is what training sees)."""
    return CLIPImageProcessor(size={"shortest_edge": resolution}, crop_size={"height": resolution, "width": resolution})


def tokenize_captions(tokenizer: CLIPTokenizer, captions: list[str]):
    """``captions`` as token ids and attention mask, padded to the longest (at most the tokenizer's
    ``model_max_length``, truncated beyond).

    The contrastive loss reads only the text tower's output at each caption's end token, and the
    tower's attention is causal, so the padding after it changes nothing: padded to the longest
    caption (about 40 of 77 tokens for Toybooru's tags) gives the loss and gradients of padding to 77,
    at about 0.7 times the step time of the demo CLIP (BENCHMARKS, "The demo family's training").
    """
    if isinstance(captions, str) or not captions:
        raise ValueError("captions must be a non-empty list of strings")
    return tokenizer(list(captions), padding="longest", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")


def attribute_words(words: list[str], min_nouns: int = 3) -> frozenset[str]:
    """The attribute words of a tag vocabulary (``caption_words``' list): the first words of its
    two-word tags that come before at least ``min_nouns`` different nouns. On Toybooru: the colours,
    ``plaid`` and ``striped``; not ``long`` (only ``long hair``) or ``arms`` (``arms up``)."""
    nouns: dict[str, set[str]] = defaultdict(set)
    for tag in words:
        parts = tag.split()
        if len(parts) == 2:
            nouns[parts[0]].add(parts[1])
    return frozenset(w for w, n in nouns.items() if len(n) >= min_nouns)


def swap_attributes(caption: str, attributes: frozenset[str], rng: random.Random, count: int = 1) -> list[str]:
    """Up to ``count`` copies of ``caption`` (comma-separated tags), each with the attribute words of
    two of its two-word tags of different attributes and different nouns swapped, distinct pairs
    drawn by ``rng`` among those whose swap names a tag the caption does not have (none when every
    swap of it is still true)."""
    tags = caption.split(", ")
    split = [t.split() for t in tags]
    candidates = [i for i, w in enumerate(split) if len(w) == 2 and w[0] in attributes]
    pairs = [(i, j) for n, i in enumerate(candidates) for j in candidates[n + 1:]
             if split[i][0] != split[j][0] and split[i][1] != split[j][1]]
    rng.shuffle(pairs)
    found: list[str] = []
    for i, j in pairs:
        swapped = list(tags)
        swapped[i], swapped[j] = f"{split[j][0]} {split[i][1]}", f"{split[i][0]} {split[j][1]}"
        # "red dress, blue skirt, blue dress, red skirt": every swap is true; two pairs may also swap alike
        negative = ", ".join(swapped)
        if not set(swapped) <= set(tags) and negative not in found:
            found.append(negative)
            if len(found) == count:
                break
    return found


def replace_patterns(caption: str, patterns: tuple[str, ...], rng: random.Random, count: int = 1) -> list[str]:
    """Up to ``count`` copies of ``caption`` (comma-separated tags), each with the pattern word of one of its tags
    ("striped kimono") replaced by another of ``patterns`` ("plaid kimono"; words as the captions write them,
    "polka dot"), drawn by ``rng`` among the replacements that name a tag the caption does not have. A swap
    negative moves a pattern word to another garment; only a replacement asks which pattern it is."""
    if not patterns:
        return []
    tags = caption.split(", ")
    options = [(i, f"{q} {tag[len(p) + 1:]}") for i, tag in enumerate(tags) for p in patterns
               if tag.startswith(p + " ") for q in patterns if q != p and f"{q} {tag[len(p) + 1:]}" not in tags]
    rng.shuffle(options)
    return [", ".join([*tags[:i], new, *tags[i + 1:]]) for i, new in options[:count]]


def hard_negatives(captions: list[str], attributes: frozenset[str], seed: int,
                   count: int = 1, patterns: tuple[str, ...] = ()) -> tuple[list[str], list[list[bool]]]:
    """``count`` hard negatives of each caption, drawn from the caption and ``seed`` alone (so a resumed run
    draws what the first did): first pattern replacements (``replace_patterns``, with ``patterns``), then swaps
    (``swap_attributes``); as ``count`` blocks of ``len(captions)``, the caption itself where it has fewer, and
    (count, len(captions)) flags of which are real."""
    drawn = []
    for c in captions:
        rng = random.Random(zlib.crc32(c.encode()) ^ seed)
        replaced = replace_patterns(c, patterns, rng, count)
        drawn.append(replaced + swap_attributes(c, attributes, rng, count - len(replaced)) if len(replaced) < count
                     else replaced)
    negatives = [d[k] if k < len(d) else c for k in range(count) for c, d in zip(captions, drawn)]
    return negatives, [[k < len(d) for d in drawn] for k in range(count)]


class ContrastiveLoss(torch.nn.Module):
    """CLIP's loss on pictures in [-1, 1] and token ids, inside one ``forward`` (for DDP).

    With ``negatives`` (a boolean mask of K x B, or of B for K = 1): ``input_ids`` holds (1 + K)B
    captions, the pictures' own in the first B and their k-th hard negatives in block k + 1, and the
    picture-to-text half of the loss ranks each picture's caption among all (1 + K)B (the negatives
    that are not real masked out); the text-to-picture half is CLIP's, over the first B captions."""

    def __init__(self, clip: CLIPModel, processor: CLIPImageProcessor):
        super().__init__()
        self.clip = clip
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                negatives: torch.Tensor | None = None) -> torch.Tensor:
        x = ((pixels + 1) / 2 - self.mean) / self.std  # what CLIPImageProcessor does to a [0, 255] picture
        if negatives is None:
            return self.clip(input_ids=input_ids, attention_mask=attention_mask, pixel_values=x, return_loss=True).loss
        b = pixels.shape[0]
        flags = negatives.reshape(1, -1) if negatives.dim() == 1 else negatives
        if flags.dim() != 2 or flags.shape[1] != b or input_ids.shape[0] != (1 + flags.shape[0]) * b:
            raise ValueError(f"hard negatives need (1 + K) x {b} captions and K x {b} flags, got "
                             f"{input_ids.shape[0]} captions and flags of shape {tuple(negatives.shape)}")
        out = self.clip(input_ids=input_ids, attention_mask=attention_mask, pixel_values=x)
        keep = torch.cat([torch.ones(b, dtype=torch.bool, device=flags.device), flags.bool().flatten()])
        logits = out.logits_per_image.masked_fill(~keep, float("-inf"))  # (B, (1 + K)B)
        target = torch.arange(b, device=logits.device)
        return (torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.cross_entropy(out.logits_per_text[:b], target)) / 2


def main(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output_dir)
    accelerator = start_run(args)
    split = None if args.split == "none" else args.split
    dataset = TaggedImages(args.data, split, args.resolution, tag_dropout=args.tag_dropout, seed=args.seed)
    if args.tokenizer:
        try:
            tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the tokenizer {args.tokenizer}: {e}") from e
    else:
        folder = out / "tokenizer"
        if not (folder / "vocab.json").is_file():
            if accelerator.is_main_process:
                write_word_tokenizer(folder, caption_words(args.data))
            accelerator.wait_for_everyone()
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    processor = image_processor(args.resolution)
    clip = build_clip(args, tokenizer)
    signature = {"clip": json.loads(clip.config.to_json_string()), "num_processes": accelerator.num_processes,
                 "train_batch_size": args.train_batch_size,
                 "gradient_accumulation_steps": args.gradient_accumulation_steps}
    signature["clip"].pop("transformers_version", None)
    if args.hard_negatives:
        signature["hard_negatives"] = args.hard_negatives
        if args.patterns:
            signature["pattern_words"] = list(args.patterns)
        attributes = attribute_words(caption_words(args.data))
        if not attributes:
            raise ValueError(f"--hard-negatives: the tags of {args.data} have no attribute word to swap "
                             "(no first word of three two-word tags)")
        logger.info("hard negatives swap %d attribute words: %s", len(attributes), ", ".join(sorted(attributes)))
    model = ContrastiveLoss(clip, processor)
    model, optimizer, lr_scheduler = prepare_optimisation(accelerator, args, model)
    model.train()

    def loss_fn(batch):
        captions, negatives = batch["caption"], None
        if args.hard_negatives:
            swapped, valid = hard_negatives(captions, attributes, args.seed, args.hard_negatives, args.patterns)
            captions, negatives = [*captions, *swapped], torch.tensor(valid, device=accelerator.device)
        tok = tokenize_captions(tokenizer, captions)
        return model(batch["pixel_values"].to(accelerator.device), tok.input_ids.to(accelerator.device),
                     tok.attention_mask.to(accelerator.device), negatives)

    trainer = Trainer(accelerator, trainer_config(args), dataset, collate_images, [model], optimizer, lr_scheduler,
                      loss_fn, signature)
    start = trainer.resume(args.resume_from_checkpoint)
    logger.info("training CLIP on %d pictures from step %d to %d", len(dataset), start, args.max_train_steps)
    state = trainer.train()
    result: dict[str, Any] = {"global_step": state.global_step, "output_dir": str(out)}
    if accelerator.is_main_process:
        clip = accelerator.unwrap_model(model).clip
        clip.save_pretrained(out / "clip")
        CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out / "clip")
    accelerator.wait_for_everyone()
    return result


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        logger.error("%s", e)
        sys.exit(f"error: {e}")
