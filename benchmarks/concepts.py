"""How well and how fast the concept extractor works, against Toybooru's ground truth.

    python -m benchmarks.concepts [--detector assets/demo-zoo/detector] [--data DIR]

Without ``--data`` it draws a Toybooru with a seed the detector never saw (its test split holds
characters no training picture shows). Prints the median head-box IoU, the median figure-mask
IoU, the share of pictures whose crop rule matches the annotations, and the median CPU time of
``extract`` per picture.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.concepts import (CLOTHES_MAX_HEAD_BOTTOM, RULE_CUT, RULE_LOW_HEAD, RULE_NOTHING_BELOW,
                                ConceptExtractor)
from pipelines.detector import DEMO_DETECTOR
from training.data.retribooru import read_annotations



def box_iou(a, b) -> float:
    if a is None or b is None:
        return 0.0
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 127, b > 127
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def expected_rule(record: dict, mask: np.ndarray) -> str:
    """The rule the annotations call for (seed 002, A.4)."""
    y_max, h = record["face_bbox"][3], record["height"]
    if y_max > CLOTHES_MAX_HEAD_BOTTOM * h:
        return RULE_LOW_HEAD
    return RULE_CUT if (mask[y_max:] > 127).any() else RULE_NOTHING_BELOW


def evaluate(extractor: ConceptExtractor, data: str | Path, split: str | None = "test",
             limit: int | None = None) -> dict:
    """Median IoUs, rule accuracy and median milliseconds per picture over ``split``."""
    data = Path(data)
    records, _ = read_annotations(data)
    records = [r for r in records if split is None or r.get("split") == split][:limit]
    if not records:
        raise ValueError(f"{data} has no picture in split {split!r}")
    boxes, masks, rules, ms = [], [], [], []
    for r in records:
        image = Image.open(data / r["file"]).convert("RGB")
        truth = np.asarray(Image.open(data / r["mask_file"]).convert("L"))
        t0 = time.perf_counter()
        crops = extractor.extract(image)
        ms.append((time.perf_counter() - t0) * 1000)
        boxes.append(box_iou(crops.head_box, r["face_bbox"]))
        masks.append(mask_iou(np.asarray(crops.mask), truth))
        rules.append(crops.rule == expected_rule(r, truth))
    return {"pictures": len(records), "head_iou": statistics.median(boxes), "mask_iou": statistics.median(masks),
            "rule_accuracy": sum(rules) / len(rules), "ms_per_picture": statistics.median(ms)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--detector", default=str(DEMO_DETECTOR))
    p.add_argument("--data", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: the per-picture cost on one core)")
    return p.parse_args(argv)


def main(args) -> dict:
    torch.set_num_threads(args.threads)
    extractor = ConceptExtractor.from_pretrained(args.detector)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from training.data.toybooru import generate

            data = generate(Path(tmp) / "tb", 400, seed=101, size=128)
        result = evaluate(extractor, data, args.split)
    print(f"{result['pictures']} pictures: median head-box IoU {result['head_iou']:.3f}, median figure-mask IoU "
          f"{result['mask_iou']:.3f}, right crop rule {result['rule_accuracy']:.1%}, median "
          f"{result['ms_per_picture']:.1f} ms per picture ({args.threads} thread)")
    return result


if __name__ == "__main__":
    main(parse_args())
