"""Train the demo family's concept detector: an ultralytics YOLO-seg model that finds ``head``
boxes and segments ``figure`` masks, trained from its yaml on a RetriBooru-style folder.

    python -m training.train_detector --data TOYBOORU_DIR --out DIR [--epochs 40 --imgsz 256]

RetriBooru annotates head boxes with a YOLO detector and figure masks with a segmenter (seed 002,
A.1); the demo family needs both offline, so it trains one small model for the two. The run is
ultralytics' own (no pretrained weights, plots off, nothing downloaded) and resumable: run the same
command again after an interruption and it continues from ``DIR/run/weights/last.pt``.

At the end the best weights are exported to ``DIR/export`` as ``model.safetensors`` + ``model.yaml``
+ ``config.json`` (no pickle), which ``pipelines.concepts.ConceptExtractor.from_pretrained`` loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.detector import export_yolo  # noqa: E402
from training.data.retribooru import read_annotations  # noqa: E402

NAMES = {0: "head", 1: "figure"}


def mask_polygon(mask: np.ndarray, epsilon: float = 0.7) -> np.ndarray | None:
    """The largest outer contour of a 0/255 mask as an (K, 2) pixel polygon, or None."""
    import cv2

    contours, _ = cv2.findContours((mask > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea)
    c = cv2.approxPolyDP(c, epsilon, True).reshape(-1, 2)
    return c if len(c) >= 3 else None


def to_yolo(data: str | Path, out: str | Path, val_split: str = "test", max_val: int | None = None) -> Path:
    """Write ultralytics' segmentation format for ``data``: ``head`` boxes as 4-corner polygons,
    ``figure`` masks as their outer contour; the ``val_split`` pictures (at most ``max_val``, so that
    the per-epoch validation stays cheap) validate. Returns the data yaml."""
    data, out = Path(data), Path(out)
    records, skipped = read_annotations(data)
    if not records:
        raise ValueError(f"{data}: no usable record")
    if out.exists():
        shutil.rmtree(out)
    for sub in ("images/train", "images/val", "labels/train", "labels/val"):
        (out / sub).mkdir(parents=True)
    counts = {"train": 0, "val": 0}
    for r in records:
        part = "val" if r.get("split") == val_split else "train"
        if part == "val" and max_val is not None and counts["val"] >= max_val:
            continue
        src = data / r["file"]
        if not src.is_file() or not (data / r["mask_file"]).is_file():
            continue
        w, h = r["width"], r["height"]
        x0, y0, x1, y1 = r["face_bbox"]
        lines = [f"0 {x0 / w:.6f} {y0 / h:.6f} {x1 / w:.6f} {y0 / h:.6f} {x1 / w:.6f} {y1 / h:.6f} {x0 / w:.6f} {y1 / h:.6f}"]
        poly = mask_polygon(np.asarray(Image.open(data / r["mask_file"]).convert("L")))
        if poly is not None:
            lines.append("1 " + " ".join(f"{x / w:.6f} {y / h:.6f}" for x, y in poly))
        name = Path(r["file"]).stem
        os.symlink(src.resolve(), out / "images" / part / f"{name}{src.suffix}")
        (out / "labels" / part / f"{name}.txt").write_text("\n".join(lines) + "\n")
        counts[part] += 1
    if not counts["train"] or not counts["val"]:
        raise ValueError(f"{data}: {counts['train']} training and {counts['val']} validation pictures; both are needed")
    yaml = out / "data.yaml"
    yaml.write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames:\n"
                    + "".join(f"  {k}: {v}\n" for k, v in NAMES.items()))
    return yaml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train_detector", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a RetriBooru-style folder (Toybooru)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="yolo11n-seg.yaml", help="ultralytics model yaml (built from scratch)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-val", type=int, default=200, help="validation pictures (from the test split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.imgsz < 32 or args.batch < 1:
        p.error("--epochs, --batch must be positive and --imgsz at least 32")
    return args


def main(args: argparse.Namespace) -> Path:
    from ultralytics import YOLO

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "run" / "weights" / "last.pt"
    if last.is_file() and _unfinished(last):  # an interrupted run: continue it
        YOLO(str(last)).train(resume=True)
    elif not (out / "run" / "weights" / "best.pt").is_file():
        yaml = to_yolo(args.data, out / "yolo-data", max_val=args.max_val)
        YOLO(args.model, task="segment").train(data=str(yaml), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=args.workers,
                    device=args.device, seed=args.seed, deterministic=True, plots=False, amp=False, pretrained=False,
                    project=str(out), name="run", exist_ok=True, verbose=False, fliplr=0.5, mosaic=0.5,
                    close_mosaic=5, patience=1000)
    best = out / "run" / "weights" / "best.pt"
    # YOLO-seg's masks come from a 4x coarser prototype: the demo extractor snaps them to the outlines
    export = export_yolo(best, out / "export", NAMES, imgsz=args.imgsz, extractor={"refine": True})
    (export / "training.json").write_text(json.dumps({k: v for k, v in vars(args).items()}, indent=1))
    print(f"exported {best} to {export}")
    return export


def _unfinished(last: Path) -> bool:
    """Whether an ultralytics ``last.pt`` is from a run that did not reach its last epoch."""
    import torch

    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    return ckpt.get("epoch", -1) != -1


if __name__ == "__main__":
    main(parse_args())
