"""How fast the studio scores pictures: CLIP-I and CLIP-T with the demo-size CLIP.

    python -m benchmarks.metrics [--quick] [--clip assets/demo-zoo/clip] [--pictures 5000]

Scores ``--pictures`` 64 px pictures, each against one reference (CLIP-I) and its prompt
(CLIP-T), as a sweep cell or the evaluation command does, and prints the time and the rate.
With no trained CLIP folder it uses a demo-size CLIP (``pipelines.components.DEMO_CLIP_*``) with
random weights: the same shapes cost the same time. Goal ([06]): 5,000 pictures in at most 60 s.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks import common
from pipelines.metrics import ClipScorer
from pipelines.zoo import DEMO_ZOO


def demo_size_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    from pipelines.components import DEMO_CLIP_PROJECTION, DEMO_CLIP_TEXT, DEMO_CLIP_VISION, write_word_tokenizer
    from training.train_clip import image_processor

    tok = CLIPTokenizer.from_pretrained(write_word_tokenizer(folder / "tok", ["blue hair", "red shirt", "outdoors"]))
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    CLIPModel(CLIPConfig(text_config={**DEMO_CLIP_TEXT, "vocab_size": len(tok), **ids}, vision_config=DEMO_CLIP_VISION,
                         projection_dim=DEMO_CLIP_PROJECTION)).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor(64), tokenizer=tok).save_pretrained(folder)
    return folder


def run(clip: str | None, pictures: int, size: int = 64) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = clip or (str(DEMO_ZOO / "clip") if (DEMO_ZOO / "clip" / "config.json").is_file()
                          else str(demo_size_clip(Path(tmp))))
        scorer = ClipScorer.from_pretrained(folder, batch_size=256)
        rng = np.random.default_rng(0)
        palette = rng.integers(0, 256, (64, size, size, 3), dtype=np.uint8)
        images = [Image.fromarray(palette[i % 64]) for i in range(pictures)]
        refs = [[Image.fromarray(palette[(i + 1) % 64])] for i in range(pictures)]
        prompts = [f"1girl, solo, {c} hair, outdoors" for c in ("blue", "red", "green", "pink")] * (pictures // 4 + 1)
        t0 = time.perf_counter()
        clip_i, clip_t = scorer.scores(images, refs, prompts[:pictures])
        seconds = time.perf_counter() - t0
    assert clip_i.shape == clip_t.shape == (pictures,)
    return {"pictures": pictures, "seconds": seconds, "pictures_per_second": pictures / seconds,
            "threads": torch.get_num_threads(),
            "clip": clip or ("assets/demo-zoo/clip" if folder == str(DEMO_ZOO / "clip") else "demo size, random weights")}


NAME = "metrics"
TITLE = "Metrics"
COMMAND = "python -m benchmarks.metrics"
GOAL_SECONDS_PER_5000 = 60.0


def bench(quick: bool = False, clip: str | None = None, pictures: int | None = None) -> dict[str, float]:
    torch.set_num_threads(2)
    pictures = pictures or (300 if quick else 5000)
    r = run(clip, pictures)
    per_5000 = r["seconds"] * 5000 / pictures
    r["seconds_per_5000"] = per_5000
    r["summary"] = [common.summary(
        "CLIP-I + CLIP-T of 5,000 pictures of 64 px (demo CLIP)", f"{per_5000:.1f} s" +
        (f" (from {pictures})" if pictures != 5000 else ""), f"at most {GOAL_SECONDS_PER_5000:.0f} s",
        per_5000 <= GOAL_SECONDS_PER_5000, "" if per_5000 <= GOAL_SECONDS_PER_5000 else "an absolute time on a shared, "
        "loaded CPU")]
    return r


def section(r: dict) -> str:
    return f"""## {TITLE}

{common.header(r, COMMAND)}

CLIP-I (against one reference) and CLIP-T with the demo CLIP (`{r['clip']}`), {r['threads']} CPU threads: **{r['pictures']:,} pictures of 64 px in {r['seconds']:.1f} s**
({r['pictures_per_second']:.0f} pictures/s; {r['seconds_per_5000']:.1f} s per 5,000 against the goal of [06], at most
{GOAL_SECONDS_PER_5000:.0f} s). `ClipScorer.scores` embeds each picture once for both measures; most of the time is
the vision tower (CLIPImageProcessor's preprocessing is about a tenth)."""


def arguments(p) -> None:
    p.add_argument("--clip", default=None, help="a CLIPModel folder (default: the demo family's, or its size)")
    p.add_argument("--pictures", type=int, default=None)


if __name__ == "__main__":
    common.cli(sys.modules[__name__])
