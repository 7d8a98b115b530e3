"""How fast the studio scores pictures: CLIP-I and CLIP-T with the demo-size CLIP.

    python -m benchmarks.metrics [--clip assets/demo-zoo/clip] [--pictures 5000]

Scores ``--pictures`` 64 px pictures, each against one reference (CLIP-I) and its prompt
(CLIP-T), as a sweep cell or the evaluation command does, and prints the time and the rate.
With no trained CLIP folder it uses a demo-size CLIP (``pipelines.components.DEMO_CLIP_*``) with
random weights: the same shapes cost the same time. Goal ([06]): 5,000 pictures in at most 60 s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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
            "threads": torch.get_num_threads(), "clip": folder if clip else "demo"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.metrics", description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", default=None, help="a CLIPModel folder (default: the demo family's, or its size)")
    p.add_argument("--pictures", type=int, default=5000)
    args = p.parse_args(argv)
    if args.pictures < 1:
        p.error("--pictures must be at least 1")
    return args


def main(args) -> dict[str, float]:
    r = run(args.clip, args.pictures)
    print(f"CLIP-I + CLIP-T of {r['pictures']} pictures of 64 px: {r['seconds']:.1f} s "
          f"({r['pictures_per_second']:.0f} pictures/s, {r['threads']} threads; goal: 5,000 in 60 s)")
    return r


if __name__ == "__main__":
    main(parse_args())
