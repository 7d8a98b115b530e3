"""Data benchmarks for BENCHMARKS.md: Toybooru's drawing rate and the loader's cost per sample,
the latter as a ratio to just decoding the same PNG files (the floor any loader pays).

    python -m benchmarks.data
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from training.data.retribooru import RetriBooruDataset
from training.data.toybooru import generate


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for size, n in ((128, 400), (256, 200)):
            t0 = time.perf_counter()
            generate(Path(tmp) / f"tb{size}", n, seed=0, size=size)
            print(f"toybooru {size} px: {n / (time.perf_counter() - t0):.0f} pictures/s (one core)")
        root = Path(tmp) / "tb128"
        for task in ("recon", "compose"):
            for setting in ("b", "a"):
                ds = RetriBooruDataset(root, "train", task=task, setting=setting, num_references=4, resolution=256)
                m = min(len(ds), 150)
                t0 = time.perf_counter()
                for i in range(m):
                    ds[i]
                t_load = (time.perf_counter() - t0) / m
                t0 = time.perf_counter()
                for i in range(m):  # the floor: decode the target, its mask, and 4 references with masks
                    rec = ds.records[i]
                    ids = [rec["id"]] + rec["similar"][:4]
                    for rid in ids:
                        r = ds.by_id[rid]
                        Image.open(root / r["file"]).convert("RGB")
                        Image.open(root / r["mask_file"]).convert("L")
                t_decode = (time.perf_counter() - t0) / m
                print(f"loader {task:7s} setting {setting}, N=4, 256 px: {t_load * 1000:.1f} ms/sample, "
                      f"{t_load / t_decode:.1f}x the PNG decoding alone")


if __name__ == "__main__":
    main()
