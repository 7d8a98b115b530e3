"""A 3 x 3 sweep with 2 seeds on the demo family: the studio's time against the same 18 pictures made
one by one with no shared reference features.

    python -m benchmarks.sweep [--quick]

Three ways to make the same pictures, interleaved cell by cell (the order rotated every cell) so
that the shared machine's load falls on all three alike:

- **studio**: ``studio.sweep`` (``plan`` and its runner, which is what ``studio.sweep.run`` does):
  each cell one pipeline call for its 2 seeds (the references' features shared by both pictures and
  both guidance branches), the retrieval features cached across cells, every cell scored (CLIP-I,
  CLIP-T, DF-L2, VQA, SWD); the references are cut by the concept extractor first (its cache emptied);
- **studio, no feature cache**: the same sweep with the pipeline's ``retrieval_cache`` disabled;
- **one by one**: each of the 18 pictures alone (``num_images_per_prompt=1``) with a fresh
  ``retrieval_cache``, not scored: what a user gets by pressing Generate 18 times.

Goal ([11]): the studio's time at most 0.6 of one by one.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from functools import partial
from typing import Any

from benchmarks import common

NAME = "sweep"
TITLE = "Sweep"
COMMAND = "python -m benchmarks.sweep"
GOAL = 0.6
PROMPT = "1girl, solo, standing, outdoors"


def _setup(quick: bool):
    from studio.engine import EXAMPLES, Engine

    folder = EXAMPLES / "kimara_samasa"
    refs = [(str(folder / f"{c}.png"), c) for c in ("face", "clothes", "figure")]
    engine = Engine(workspace=tempfile.mkdtemp(prefix="bench-sweep-"))
    pipe = engine._model("retrinet")
    pipe.set_progress_bar_config(disable=True)
    if quick:
        grid = {"guidance": "3, 7", "retrieval_scales": "0.5, 1.5", "seeds": 2, "steps": 4}
    else:
        grid = {"guidance": "3, 5, 7", "retrieval_scales": "0.5, 1, 1.5", "seeds": 2, "steps": 20}
    return engine, pipe, refs, grid


def bench(quick: bool = False, rounds: int | None = None) -> dict[str, Any]:
    import torch

    import studio.sweep as sw
    from pipelines.retrinet.pipeline import _FeatureCache

    torch.set_num_threads(2)
    engine, pipe, refs, grid = _setup(quick)
    rounds = rounds or (1 if quick else 2)
    scoring = {"studio": 0.0, "nocache": 0.0}
    which = ["studio"]

    class TimedScorer(sw._Scorer):  # the scoring's share of the studio's time
        def __init__(self, *a, **k):
            t0 = time.perf_counter()
            super().__init__(*a, **k)
            scoring[which[0]] += time.perf_counter() - t0

        def __call__(self, images):
            t0 = time.perf_counter()
            out = super().__call__(images)
            scoring[which[0]] += time.perf_counter() - t0
            return out

    original_scorer, original_cache = sw._Scorer, pipe.retrieval_cache
    sw._Scorer = TimedScorer
    per_round = []
    try:
        # warm-up: load every model (RetriNet, CLIP, detector) so that no variant pays for loading
        sw.run(engine, sw.SweepRequest(references=refs, prompt=PROMPT, guidance="3", retrieval_scales="1", seeds=1,
                                       steps=2))
        for r in range(rounds):
            t = {"studio": 0.0, "nocache": 0.0, "single": 0.0}
            scoring.update(studio=0.0, nocache=0.0)
            req = sw.SweepRequest(references=refs, prompt=PROMPT, seed=r, **grid)
            engine._crops.clear()
            studio_cache = _FeatureCache(1 << 30)
            pipe.retrieval_cache = studio_cache
            which[0] = "studio"
            t0 = time.perf_counter()
            sweep_a, runner_a = sw.plan(engine, req)
            t["studio"] += time.perf_counter() - t0
            engine._crops.clear()
            pipe.retrieval_cache = _FeatureCache(0)
            which[0] = "nocache"
            t0 = time.perf_counter()
            _, runner_b = sw.plan(engine, req)
            t["nocache"] += time.perf_counter() - t0
            cells_a, cells_b = runner_a(), runner_b()
            read = [engine._reference(i, p, c) for i, (p, c) in enumerate(refs)]
            seeds = [r + k for k in range(grid["seeds"])]

            def studio_cell(cache=studio_cache, cells=cells_a):
                pipe.retrieval_cache, which[0] = cache, "studio"
                next(cells)

            def nocache_cell(cells=cells_b):
                pipe.retrieval_cache, which[0] = _FeatureCache(0), "nocache"  # every step computes its features
                next(cells)

            def single_pictures(g, s, read=read, seeds=seeds):
                for seed in seeds:
                    pipe.retrieval_cache = _FeatureCache(1 << 30)  # nothing shared with any other picture
                    pipe(PROMPT, read, num_inference_steps=grid["steps"],
                         guidance_scale=g, retrieval_scale=s, num_images_per_prompt=1,
                         generator=[torch.Generator().manual_seed(seed)])

            for i, (g, s) in enumerate(sweep_a.cells):
                jobs = [("studio", studio_cell), ("nocache", nocache_cell), ("single", partial(single_pictures, g, s))]
                k = i % 3
                for name, fn in jobs[k:] + jobs[:k]:
                    t[name] += common.timed(fn)
            per_round.append({**t, "scoring": scoring["studio"], "scoring_nocache": scoring["nocache"],
                              "cells": len(sweep_a.done), "pictures": sum(len(c.pictures) for c in sweep_a.done),
                              "cache": dict(sweep_a.cache)})
            print(f"round {r + 1}: studio {t['studio']:.1f} s (scoring {scoring['studio']:.1f} s), no feature cache "
                  f"{t['nocache']:.1f} s, one by one {t['single']:.1f} s", file=sys.stderr)
    finally:
        sw._Scorer, pipe.retrieval_cache = original_scorer, original_cache

    def med(f):
        return statistics.median(f(x) for x in per_round)

    out = {
        "grid": grid, "rounds": per_round, "pictures": per_round[0]["pictures"], "cells": per_round[0]["cells"],
        "studio_s": med(lambda x: x["studio"]), "single_s": med(lambda x: x["single"]),
        "nocache_s": med(lambda x: x["nocache"]),
        "nocache_unscored_s": med(lambda x: x["nocache"] - x["scoring_nocache"]), "scoring_s": med(lambda x: x["scoring"]),
        "ratio": med(lambda x: x["studio"] / x["single"]),
        "ratio_unscored": med(lambda x: (x["studio"] - x["scoring"]) / x["single"]),
        "ratio_nocache_unscored": med(lambda x: (x["nocache"] - x["scoring_nocache"]) / x["single"]),
        "cache_ratio": med(lambda x: (x["studio"] - x["scoring"]) / (x["nocache"] - x["scoring_nocache"])),
        "scoring_share": med(lambda x: x["scoring"] / x["studio"]),
        "cache": per_round[0]["cache"],
    }
    if not quick:
        pred = sd15_prediction(out["cells"], grid["seeds"])
        out["sd15_predicted"], out["sd15_encoder_share"] = pred["ratio"], pred["encoder_share"]
    ok = out["ratio"] <= GOAL
    out["summary"] = [
        common.summary(f"{grid['guidance'].count(',') + 1} x {grid['retrieval_scales'].count(',') + 1} sweep, "
                       f"{grid['seeds']} seeds, {grid['steps']} steps (demo family), scored: studio / one by one",
                       f"{out['ratio']:.3f}", f"at most {GOAL}", ok,
                       "" if ok else _why(out)),
        common.summary("the same, scoring left out", f"{out['ratio_unscored']:.3f}", f"at most {GOAL}",
                       out["ratio_unscored"] <= GOAL, "" if out["ratio_unscored"] <= GOAL else _why(out)),
    ]
    return out


def _why(r: dict[str, Any]) -> str:
    bound = r.get("sd15_predicted")
    return (f"a sweep saves what pictures share: the retrieval encoder (the feature cache: the generation takes "
            f"{r['cache_ratio']:.2f} of its time without it) and the per-call work of batching 2 seeds; at the demo "
            f"size 2 seeds still cost about 1.5x one, and scoring adds {r['scoring_share']:.0%}"
            + (f"; at SD 1.5 size, where rows cost linearly, the FLOP count predicts {bound:.2f}" if bound else ""))


def sd15_prediction(cells: int, seeds: int, n: int = 3) -> dict[str, float]:
    """The sweep over one by one at SD 1.5 size, by FLOPs (meta device, 512 px): one by one pays a RetriNet step
    with the encoder per picture; the sweep pays a batch of ``seeds`` per cell and the encoder once per timestep."""
    import torch

    from benchmarks.retrinet_step import build, inputs, retrinet_step

    unet, retrinet, cfg = build("sd15", "meta")
    with torch.no_grad():
        one = inputs(cfg, 1, n, 64, "meta")
        many = inputs(cfg, seeds, n, 64, "meta")
        f_one = common.count_flops(lambda: retrinet_step(unet, retrinet, *one, n))
        f_many = common.count_flops(lambda: retrinet_step(unet, retrinet, *many, n))
        f_enc = common.count_flops(lambda: retrinet(one[2], 500, one[3], n))
    sweep = cells * (f_many - f_enc) + f_enc
    return {"ratio": sweep / (cells * seeds * f_one), "encoder_share": f_enc / f_one}


def section(r: dict[str, Any]) -> str:
    g = r["grid"]
    rows = [["studio (`studio.sweep`), scored", f"{r['studio_s']:.1f} s", f"**{r['ratio']:.3f}**"],
            ["studio, without its scoring", f"{r['studio_s'] - r['scoring_s']:.1f} s", f"{r['ratio_unscored']:.3f}"],
            ["studio without the feature cache, without scoring", f"{r['nocache_unscored_s']:.1f} s",
             f"{r['ratio_nocache_unscored']:.2f}"],
            ["one picture at a time, nothing shared, not scored", f"{r['single_s']:.1f} s", "1"]]
    c = r["cache"]
    return f"""## {TITLE}

{common.header(r, COMMAND)}

Guidance {g['guidance']} x retrieval scale {g['retrieval_scales']}, {g['seeds']} seeds per cell ({r['pictures']}
pictures of 64 px, {g['steps']} DPM-Solver++ steps, the 3 references of `assets/examples/kimara_samasa`). The three
ways of making them ran interleaved cell by cell (the order rotated each cell); times are medians over
{len(r['rounds'])} round(s), ratios the medians of each round's ratio. Goal: the studio at most {GOAL} of one by one.

{common.table(["how", "time", "ratio to one by one"], rows)}

- Scoring (CLIP-I, CLIP-T, DF-L2 and the VQA stand-in on every picture, the references' side once) is
  {r['scoring_share']:.0%} of the studio's time.
- The feature cache: the retrieval encoder ran for the first cell's timesteps only ({c.get('misses')} misses,
  {c.get('hits')} hits in the round shown); the sweep's generation with the cache takes
  **{r['cache_ratio']:.2f}** of its time without it.
- Sharing the references' features between the 2 seeds and both guidance branches of a cell (one pipeline call per
  cell instead of one per picture) is the rest: {r['ratio_nocache_unscored']:.2f} of one by one without the cache.{_sd15(r)}"""


def _sd15(r: dict[str, Any]) -> str:
    if not r.get("sd15_predicted"):
        return ""
    return (f"\n- At SD 1.5 size (512 px, 3 references), where a UNet row costs the same in a batch as alone, the "
            f"FLOP count predicts the same sweep at **{r['sd15_predicted']:.2f}** of one by one: the retrieval "
            f"encoder is {r['sd15_encoder_share']:.0%} of a picture's step, and that is all a sweep of this design "
            f"can save there; reaching {GOAL} would need cells that share more (several cells' pictures in one "
            f"batch, or fewer references' tokens).")


if __name__ == "__main__":
    common.cli(sys.modules[__name__])
