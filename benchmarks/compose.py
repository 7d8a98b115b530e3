"""Latency of one composition with the demo family on this CPU.

    python -m benchmarks.compose [--zoo assets/demo-zoo] [--runs 7]

One 64 px picture from 4 references (2 face, 2 clothes), 20 DPM-Solver++ steps with
classifier-free guidance, the same references each run (as in a session where the user changes
only the prompt or the seed; the first run, which fills the feature cache, is reported apart).
Goal ([08]): a median of at most 3 s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from pipelines.retrinet import Reference
from pipelines.zoo import DEMO_ZOO, ModelZoo, ZooSpec


def references(size: int = 64) -> list[Reference]:
    colours = [(230, 120, 150), (120, 150, 230), (240, 200, 60), (90, 180, 120)]
    return [Reference(Image.new("RGB", (size, size), c), concept)
            for c, concept in zip(colours, ("face", "face", "clothes", "clothes"))]


def run(zoo_folder, runs: int = 7, steps: int = 20) -> dict[str, float]:
    zoo = ModelZoo(ZooSpec.demo(zoo_folder), device="cpu")
    t0 = time.perf_counter()
    pipe = zoo.retrinet()
    load = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    refs = references()
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        pipe("1girl, solo, standing, outdoors", refs, num_inference_steps=steps, guidance_scale=5.0, height=64,
             width=64, generator=torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - t0)
    return {"load_seconds": load, "first_seconds": times[0], "median_seconds": statistics.median(times[1:]),
            "threads": torch.get_num_threads(), "steps": steps}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.compose", description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", default=str(DEMO_ZOO))
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(args) -> dict[str, float]:
    r = run(args.zoo, args.runs)
    print(f"demo composition, 64 px, 4 references, {r['steps']} steps with guidance: median {r['median_seconds']:.2f} s "
          f"(first {r['first_seconds']:.2f} s, loading {r['load_seconds']:.2f} s; {r['threads']} threads; goal 3 s)")
    return r


if __name__ == "__main__":
    main(parse_args())
