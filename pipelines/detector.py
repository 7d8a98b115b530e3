"""Ultralytics YOLO models stored without pickle: ``model.safetensors`` + ``model.yaml`` + ``config.json``.

Ultralytics saves ``.pt`` files (pickles of whole models). The demo family ships its detector as
safetensors plus the model's yaml, and rebuilds the model from the yaml on load, so the repository
holds no pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

# the demo family's detector, trained by `python -m training.train_detector` on Toybooru
DEMO_DETECTOR = Path(__file__).resolve().parents[1] / "assets" / "demo-zoo" / "detector"


def export_yolo(weights: str | os.PathLike, folder: str | os.PathLike, names: dict[int, str], imgsz: int,
                extractor: dict | None = None) -> Path:
    """Write a trained ultralytics ``.pt`` as ``folder/{model.safetensors, model.yaml, config.json}``;
    ``extractor``: options ``ConceptExtractor.from_pretrained`` applies unless told otherwise."""
    import torch
    import yaml
    from safetensors.torch import save_file

    ckpt = torch.load(weights, map_location="cpu", weights_only=False)  # our own training output
    model = (ckpt.get("ema") or ckpt["model"]).float()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from ultralytics.nn.tasks import guess_model_scale

    spec = {k: v for k, v in model.yaml.items() if k not in ("yaml_file",)}
    spec["nc"] = len(names)
    spec["scale"] = spec.get("scale") or guess_model_scale(model.yaml.get("yaml_file", "")) or "n"
    (folder / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    config = {"names": {str(k): v for k, v in names.items()}, "imgsz": imgsz, "task": "segment",
              "extractor": dict(extractor or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def load_yolo(folder: str | os.PathLike):
    """Rebuild an ultralytics ``YOLO`` from a folder written by ``export_yolo``."""
    from safetensors.torch import load_file
    from ultralytics import YOLO

    folder = Path(folder)
    for name in ("model.yaml", "model.safetensors", "config.json"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} is not a detector folder: {name} is missing")
    config = json.loads((folder / "config.json").read_text())
    model = YOLO(str(folder / "model.yaml"), task=config.get("task", "segment"), verbose=False)
    missing, unexpected = model.model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not fit model.yaml ({len(missing)} missing, {len(unexpected)} unexpected)")
    model.model.names = {int(k): v for k, v in config["names"].items()}
    model.model.eval()
    return model, config


# ---------------------------------------------------------------------- backends

from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


@dataclass
class Detection:
    """One object found in a picture: box ``(x0, y0, x1, y1)`` in pixels, confidence, and its mask
    (L, 0/255, picture size) when the model segments."""

    box: tuple[int, int, int, int]
    confidence: float
    mask: Image.Image | None = None

    @property
    def area(self) -> int:
        return max(0, self.box[2] - self.box[0]) * max(0, self.box[3] - self.box[1])


def _class_ids(names: dict[int, str], wanted: str | None) -> set[int]:
    if wanted is None:
        return set()
    ids = {i for i, n in names.items() if n == wanted}
    if not ids:
        raise ValueError(f"the model has no class {wanted!r}; it has {sorted(names.values())}")
    return ids


class YoloDetector:
    """Heads (and, for a YOLO-seg model with a figure class, figures with masks) by ultralytics.

    ``model``: a ``YOLO``, a local ``.pt`` path, or ``"owner/repo/file.pt"`` on the Hub.
    """

    def __init__(self, model, head_class: str = "head", figure_class: str | None = "figure",
                 confidence: float = 0.25, imgsz: int | None = None):
        from ultralytics import YOLO

        if isinstance(model, (str, os.PathLike)):
            model = YOLO(resolve_weights(str(model)))
        self.model = model
        names = {int(k): v for k, v in model.names.items()}
        self.head_ids = _class_ids(names, head_class)
        self.figure_ids = _class_ids(names, figure_class) if figure_class in names.values() else set()
        self.confidence, self.imgsz = confidence, imgsz

    def __call__(self, image: Image.Image) -> tuple[list[Detection], list[Detection]]:
        kw = {"imgsz": self.imgsz} if self.imgsz else {}
        result = self.model.predict(np.asarray(image)[:, :, ::-1], conf=self.confidence, verbose=False,
                                    retina_masks=True, **kw)[0]  # ultralytics reads arrays as BGR
        heads, figures = [], []
        boxes = result.boxes
        masks = result.masks.data.cpu().numpy() if result.masks is not None else None
        for i in range(len(boxes)):
            cls = int(boxes.cls[i])
            box = tuple(int(round(v)) for v in boxes.xyxy[i].tolist())
            conf = float(boxes.conf[i])
            if cls in self.head_ids:
                heads.append(Detection(box, conf))
            elif cls in self.figure_ids:
                mask = None
                if masks is not None:
                    m = masks[i] > 0.5
                    mask = Image.fromarray((m * 255).astype(np.uint8), "L")
                    if mask.size != image.size:
                        mask = mask.resize(image.size, Image.Resampling.NEAREST)
                figures.append(Detection(box, conf, mask))
        return heads, figures


class SamSegmenter:
    """segment-anything's ``SamPredictor`` prompted with the figure's box."""

    def __init__(self, sam):
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(sam)

    @classmethod
    def from_checkpoint(cls, model_type: str, checkpoint: str | None) -> SamSegmenter:
        """``vit_b`` / ``vit_l`` / ``vit_h`` from a checkpoint path (``None``: random weights)."""
        from segment_anything import sam_model_registry

        if model_type not in sam_model_registry:
            raise ValueError(f"unknown SAM model {model_type!r}; expected one of {sorted(sam_model_registry)}")
        return cls(sam_model_registry[model_type](checkpoint=checkpoint).eval())

    def __call__(self, image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
        import torch

        with torch.no_grad():
            self.predictor.set_image(np.asarray(image.convert("RGB")))
            masks, scores, _ = self.predictor.predict(box=np.asarray(box, dtype=np.float32), multimask_output=False)
        return Image.fromarray((masks[0] * 255).astype(np.uint8), "L")


def resolve_weights(spec: str) -> str:
    """A local file, or ``owner/repo/path/in/repo.pt`` fetched with huggingface_hub."""
    if Path(spec).is_file():
        return spec
    parts = spec.split("/")
    if len(parts) >= 3:
        from huggingface_hub import hf_hub_download

        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    raise ValueError(f"{spec} is neither a file nor owner/repo/file on the Hub")
