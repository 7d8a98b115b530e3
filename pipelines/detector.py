"""Ultralytics YOLO models stored without pickle: ``model.safetensors`` + ``model.yaml`` + ``config.json``.

Ultralytics saves ``.pt`` files (pickles of whole models). The demo family ships its detector as
safetensors plus the model's yaml, and rebuilds the model from the yaml on load, so the repository
holds no pickle.

**Untrusted files.** Unpickling a file can run any code it holds, so only safetensors load by
default, the demo detector included:

- a detector folder (``export_yolo``'s) loads its weights with safetensors, and its ``model.yaml``
  is checked first: ultralytics ``eval()``s the yaml's ``activation`` and calls the layer names it
  finds, so only ``torch.nn`` activations and model layers (``nn.Module`` classes) are let through,
  and the model is built by ultralytics' restricted (no-eval) path where it has one;
- a YOLO ``.pt`` (one from the Hub, say) or a SAM ``.pth`` / ``.pt`` / ``.bin`` checkpoint raises
  ``ValueError`` unless it is marked trusted (``trusted=True`` here; ``"trust_pickle"`` in a model
  config, see ``pipelines.zoo``), and then loads with a ``PickleWarning`` and with
  ``torch.load(weights_only=True)``: SAM checkpoints are state dicts read that way; a YOLO ``.pt``
  holds whole modules, which ultralytics (8.4 and later) reads with ``weights_only=True`` against an
  allow-list of its own classes (its restricted loader, used here). An older ultralytics has no
  such loader and unpickles the file in full: the warning says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

# the demo family's detector, trained by `python -m training.train_detector` on Toybooru
DEMO_DETECTOR = Path(__file__).resolve().parents[1] / "assets" / "demo-zoo" / "detector"

# weights files that are Python pickles (torch.save, ultralytics, older Hub checkpoints)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
OPT_IN = ('pass trusted=True in Python, or list the model\'s key in "trust_pickle" in the model config '
          '(e.g. "trust_pickle": ["detector"])')


class PickleWarning(UserWarning):
    """A pickle-based weights file is being loaded because it was marked trusted."""


def is_pickle(path: str | os.PathLike) -> bool:
    return Path(str(path)).suffix.lower() in PICKLE_SUFFIXES


def check_trusted(path: str | os.PathLike, trusted: bool, what: str, how: str = "") -> None:
    """Refuse a pickle-based weights file unless ``trusted``; warn when it is loaded because it is.

    ``how``: what the loader does to limit the risk (for the warning)."""
    suffix = Path(str(path)).suffix.lower()
    if not trusted:
        raise ValueError(f"{path} is a {suffix} file, a Python pickle: unpickling can run any code the file holds, "
                         f"so {what} files other than safetensors are refused by default. If you trust its "
                         f"source, {OPT_IN}; or convert it once to safetensors "
                         "(pipelines.detector.to_safetensors for state dicts, export_yolo for YOLO .pt files)")
    warnings.warn(f"loading {what} {path}, a {suffix} pickle, because it is marked trusted{'; ' + how if how else ''}",
                  PickleWarning, stacklevel=3)


# ---------------------------------------------------------------------- ultralytics, restricted

_RESTRICTED = threading.Lock()


def ultralytics_restricted_loading() -> bool:
    """Whether this ultralytics can read a ``.pt`` with ``torch.load(weights_only=True)`` against an
    allow-list of its classes and build models from yaml without ``eval`` (ultralytics 8.4+, torch 2.6+)."""
    import inspect

    from ultralytics.nn import tasks

    safe = getattr(tasks, "_SafeLoad", None)
    return (safe is not None and bool(getattr(safe, "SUPPORTED", False)) and hasattr(tasks, "SAFE_LOAD")
            and "safe_only" in inspect.signature(tasks.torch_safe_load).parameters)


@contextlib.contextmanager
def _restricted_ultralytics():
    """Ultralytics' restricted loading (its ``ULTRALYTICS_SAFE_LOAD`` switch) for the calls inside;
    a no-op where this ultralytics has none. Other threads meanwhile load restricted too, which is
    only stricter."""
    if not ultralytics_restricted_loading():
        yield False
        return
    from ultralytics.nn import tasks

    with _RESTRICTED:
        before = tasks.SAFE_LOAD
        tasks.SAFE_LOAD = True
        try:
            yield True
        finally:
            tasks.SAFE_LOAD = before


def _read_ultralytics_checkpoint(weights: str | os.PathLike) -> dict:
    """An ultralytics ``.pt`` as a dict, with ultralytics' restricted (``weights_only=True``) loader
    where there is one, else by a full unpickle."""
    from ultralytics.nn.tasks import torch_safe_load

    if ultralytics_restricted_loading():
        try:
            return torch_safe_load(str(weights), safe_only=True)[0]
        except TypeError as e:
            raise ValueError(f"{weights}: {str(e).splitlines()[0]}") from e
    import torch

    return torch.load(weights, map_location="cpu", weights_only=False)


def _literal(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_literal(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def check_yolo_spec(spec: dict, source: str | os.PathLike) -> None:
    """Refuse a YOLO model yaml that would run code when ultralytics builds it: an ``activation``
    other than a ``torch.nn`` class called with literals, or a layer that is not an ``nn.Module``
    class (``parse_model`` calls whatever name it finds in its module)."""
    import ast

    import torch
    import torchvision
    from ultralytics.nn import tasks

    def refuse(why: str) -> ValueError:
        return ValueError(f"{source}: refused, {why} (a model yaml may name torch.nn activations and model layers only)")

    if not isinstance(spec, dict):
        raise refuse("not a mapping")
    act = spec.get("activation")
    if act is not None:
        try:
            call = ast.parse(str(act).strip(), mode="eval").body
            ok = isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            names, node = [], call.func if ok else None
            while isinstance(node, ast.Attribute):
                names.append(node.attr)
                node = node.value
            ok = ok and isinstance(node, ast.Name) and [*names[1:], node.id] in (["nn"], ["nn", "torch"])
            klass = getattr(torch.nn, names[0], None) if ok else None
            ok = ok and isinstance(klass, type) and issubclass(klass, torch.nn.Module)
            ok = ok and all(_literal(ast.literal_eval(a)) for a in call.args) and                 all(_literal(ast.literal_eval(k.value)) for k in call.keywords)
        except (SyntaxError, ValueError):
            ok = False
        if not ok:
            raise refuse(f"activation {act!r} is not a torch.nn activation called with literals")
    backbone, head = spec.get("backbone"), spec.get("head", [])
    if not (isinstance(backbone, list) and backbone and isinstance(head, list)):
        raise refuse("no list of backbone / head layers")
    layers = backbone + head
    for layer in layers:
        if not (isinstance(layer, list) and len(layer) == 4 and isinstance(layer[2], str)):
            raise refuse(f"layer {layer!r} is not [from, repeats, module, args]")
        name = layer[2]
        if name.startswith("nn."):
            obj = getattr(torch.nn, name[3:], None)
        elif name.startswith("torchvision.ops."):
            obj = getattr(torchvision.ops, name[16:], None)
        else:
            obj = vars(tasks).get(name)
        if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
            raise refuse(f"layer module {name!r} is not a model layer")
        if not (_literal(layer[0]) and _literal(layer[1]) and isinstance(layer[3], list) and _literal(layer[3])):
            raise refuse(f"layer {layer!r} has arguments that are not plain values")


def export_yolo(weights: str | os.PathLike, folder: str | os.PathLike, names: dict[int, str], imgsz: int,
                extractor: dict | None = None) -> Path:
    """Write a trained ultralytics ``.pt`` as ``folder/{model.safetensors, model.yaml, config.json}``;
    ``extractor``: options ``ConceptExtractor.from_pretrained`` applies unless told otherwise.

    Meant for your own training output (``training.train_detector``): the ``.pt`` is read with
    ultralytics' restricted ``weights_only=True`` loader where ultralytics has one, else unpickled."""
    import yaml
    from safetensors.torch import save_file

    # our own training output; read with weights_only=True where ultralytics can
    ckpt = _read_ultralytics_checkpoint(weights)
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
    """Rebuild an ultralytics ``YOLO`` from a folder written by ``export_yolo``: the yaml is checked
    (``check_yolo_spec``), the model built from it (restricted where ultralytics can), the weights
    read with safetensors. No pickle is read and no code from the folder runs."""
    import yaml
    from safetensors.torch import load_file
    from ultralytics import YOLO

    folder = Path(folder)
    for name in ("model.yaml", "model.safetensors", "config.json"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} is not a detector folder: {name} is missing")
    try:
        config = json.loads((folder / "config.json").read_text())
        spec = yaml.safe_load((folder / "model.yaml").read_text())
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder} is not a detector folder: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("names"), dict):
        raise ValueError(f"{folder}/config.json has no class names")
    task = config.get("task", "segment")
    if task not in ("segment", "detect"):
        raise ValueError(f"{folder}/config.json: task {task!r} is not 'segment' or 'detect'")
    check_yolo_spec(spec, folder / "model.yaml")
    with _restricted_ultralytics():
        model = YOLO(str(folder / "model.yaml"), task=task, verbose=False)
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

    ``model``: a ``YOLO``; a detector folder (``export_yolo``'s: safetensors); or, only with
    ``trusted=True``, an ultralytics ``.pt`` file, local or ``"owner/repo/file.pt"`` on the Hub (see
    ``open_yolo``).
    """

    def __init__(self, model, head_class: str = "head", figure_class: str | None = "figure",
                 confidence: float = 0.25, imgsz: int | None = None, *, trusted: bool = False):
        if isinstance(model, (str, os.PathLike)):
            model = open_yolo(model, trusted=trusted)
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
    def from_checkpoint(cls, model_type: str, checkpoint: str | os.PathLike | None, *,
                        trusted: bool = False) -> SamSegmenter:
        """``vit_b`` / ``vit_l`` / ``vit_h`` from a checkpoint path (``None``: random weights).

        A ``.safetensors`` checkpoint loads as is; the official ``.pth`` files (pickles) only with
        ``trusted=True``, and then as a state dict by ``torch.load(weights_only=True)``:
        segment-anything's own loader (a plain ``torch.load``) is never used."""
        from segment_anything import sam_model_registry

        if model_type not in sam_model_registry:
            raise ValueError(f"unknown SAM model {model_type!r}; expected one of {sorted(sam_model_registry)}")
        state = load_state_dict(checkpoint, trusted=trusted, what="SAM checkpoint") if checkpoint else None
        sam = sam_model_registry[model_type](checkpoint=None)
        if state is not None:
            try:
                sam.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ValueError(f"{checkpoint} is not a SAM {model_type} checkpoint: {str(e).splitlines()[0]}") from e
        return cls(sam.eval())

    def __call__(self, image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
        import torch

        with torch.no_grad():
            self.predictor.set_image(np.asarray(image.convert("RGB")))
            masks, scores, _ = self.predictor.predict(box=np.asarray(box, dtype=np.float32), multimask_output=False)
        return Image.fromarray((masks[0] * 255).astype(np.uint8), "L")


def load_state_dict(path: str | os.PathLike, *, trusted: bool = False, what: str = "weights") -> dict:
    """A state dict from ``.safetensors``, or, only when ``trusted``, from a pickle (``.pth``, ``.pt``,
    ``.bin``, ``.ckpt``) read by ``torch.load(weights_only=True)``, with a ``PickleWarning``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error type
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if not is_pickle(path):
        raise ValueError(f"{path}: {what} files are .safetensors (or, trusted, {', '.join(PICKLE_SUFFIXES)})")
    check_trusted(path, trusted, what, "read with torch.load(weights_only=True)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refusals are UnpicklingError, damaged files RuntimeError
        raise ValueError(f"{path}: torch.load(weights_only=True) refused it ({str(e).splitlines()[0]}); "
                         "it holds more than tensors") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"{path} does not hold a state dict (names to tensors)")
    return state


def to_safetensors(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert a pickled state dict (a SAM ``.pth``, say) that you trust to ``dst`` in safetensors, which
    then loads with no trust needed. It is read with ``torch.load(weights_only=True)``."""
    from safetensors.torch import save_file

    state = load_state_dict(src, trusted=True, what="weights")
    dst = Path(dst)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst))
    return dst


def open_yolo(spec: str | os.PathLike, *, trusted: bool = False):
    """An ultralytics ``YOLO`` from a detector folder (safetensors, always allowed), a model yaml
    (architecture only, checked), or an ultralytics ``.pt`` (local or ``owner/repo/file.pt`` on the
    Hub) when ``trusted``: refused before any download otherwise."""
    from ultralytics import YOLO

    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        return load_yolo(path)[0]
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        if not path.is_file():
            raise FileNotFoundError(f"no such file {path}")
        check_yolo_spec(yaml.safe_load(path.read_text()), path)
        with _restricted_ultralytics():
            return YOLO(str(path), verbose=False)
    if not is_pickle(spec):
        raise ValueError(f"{spec}: a detector is a folder written by pipelines.detector.export_yolo (model.safetensors "
                         "+ model.yaml + config.json), or, marked trusted, an ultralytics .pt file")
    restricted = ultralytics_restricted_loading()
    check_trusted(spec, trusted, "detector",
                  "ultralytics reads it with torch.load(weights_only=True) against an allow-list of its classes"
                  if restricted else "this ultralytics has no weights_only loader for .pt files: it is unpickled in "
                  "full, which can run code it holds (ultralytics 8.4+ reads it with weights_only=True)")
    if suffix != ".pt":
        raise ValueError(f"{spec}: ultralytics reads checkpoints from .pt files only")
    local = resolve_weights(spec)
    try:
        with _restricted_ultralytics():
            return YOLO(local)
    except TypeError as e:  # ultralytics' restricted loader refused a type outside its allow-list
        raise ValueError(f"{spec}: {str(e).splitlines()[0]}") from e


def resolve_weights(spec: str) -> str:
    """A local file, or ``owner/repo/path/in/repo.pt`` fetched with huggingface_hub."""
    if Path(spec).is_file():
        return spec
    parts = spec.split("/")
    if len(parts) >= 3:
        from huggingface_hub import hf_hub_download

        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    raise ValueError(f"{spec} is neither a file nor owner/repo/file on the Hub")
