"""Model families: what the studio generates, scores and cuts with, loaded lazily.

Two families of the same classes (DESIGN.md, "Two model families, one code path"):

- ``demo`` (the default): the tiny models in ``assets/demo-zoo/``, trained on Toybooru by
  ``python -m training.demo_zoo``; no network (``HF_HUB_OFFLINE=1`` works);
- ``sd15``: Stable Diffusion 1.5, CLIP ViT-L/14, DINOv2, an anime head detector, SAM and the
  user's RetriNet / Semantica weights, from Hub ids or folders named in a JSON config file
  (``configs/sd15.json`` is the documented example).

A family is a ``ZooSpec`` (where each model comes from); a ``ModelZoo`` loads each model the
first time it is asked for (thread-safe; never at import), on the device and dtype it picked
(CUDA in fp16 when present, else the CPU in fp32). Anything that cannot be found raises
``ValueError`` naming the config key and the missing id or file; a model that is simply not
configured (no RetriNet weights yet) raises ``MissingModel``, which the studio turns into "train
one in the Train tab".

The config file's keys are the fields of ``ZooSpec`` (``configs/sd15.json`` is the documented
example; keys starting with "_" are comments):

- ``family``: "demo" or "sd15"; ``clip``, ``detector``: required; ``retrinet``,
  ``stable_diffusion``, ``semantica``, ``sam``: optional (null: not configured);
- ``sam_type`` ("vit_b" / "vit_l" / "vit_h"), ``head_class`` (the detector's class for heads),
  ``image_encoder`` (informational);
- ``trust_pickle``: the keys whose files may be Python pickles, e.g. ``["detector"]``, or ``true``
  for all of them (default: none). Only safetensors load otherwise: diffusers and transformers
  models are loaded with ``use_safetensors=True``, and a ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``
  detector or SAM checkpoint raises ``ValueError`` saying how to opt in. A trusted key loads with a
  ``PickleWarning`` and with ``torch.load(weights_only=True)`` wherever the library allows:
  diffusers and transformers read ``.bin`` weights that way, a SAM checkpoint is read as a state
  dict that way, and an ultralytics YOLO ``.pt`` through ultralytics' restricted loader
  (``weights_only=True`` against an allow-list of its classes, ultralytics 8.4+; an older
  ultralytics unpickles it in full, and the warning says so). Unpickling runs whatever code a
  file holds: trust only files from sources you trust (a Hub file can change after you trusted it).
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO_ZOO = ROOT / "assets" / "demo-zoo"
FAMILIES = ("demo", "sd15")
# the config keys whose files ``trust_pickle`` may let be pickles
TRUSTABLE = ("retrinet", "stable_diffusion", "semantica", "clip", "detector", "sam")


class MissingModel(ValueError):
    """A model the family does not configure (for example RetriNet weights not trained yet)."""


@dataclass(frozen=True)
class ZooSpec:
    """Where each model of a family comes from: a local folder / file or a Hub id (None: not configured)."""

    family: str
    retrinet: str | None  # a RetriNetPipeline folder, or a train_retrinet output (retrinet/ [+ unet/])
    stable_diffusion: str | None  # base model for a train_retrinet output (vae, text encoder, unet, scheduler)
    semantica: str | None  # a SemanticaPipeline folder
    clip: str  # CLIPModel + CLIPProcessor for CLIP-I / CLIP-T / face embeddings
    detector: str  # a demo-zoo detector folder, a YOLO .pt path, or owner/repo/file.pt on the Hub
    sam: str | None = None  # a segment-anything checkpoint; None: YOLO-seg masks
    sam_type: str = "vit_b"
    head_class: str = "head"  # the detector's class name for heads (or faces)
    image_encoder: str | None = None  # Semantica's frozen encoder (informational; the pipeline folder holds it)
    trust_pickle: tuple[str, ...] = ()  # keys whose files may be pickles (see the module docstring); default none

    def __post_init__(self):
        trust = self.trust_pickle
        if trust is True:
            trust = TRUSTABLE
        elif trust is False or trust is None:
            trust = ()
        elif isinstance(trust, str) or not all(isinstance(k, str) for k in trust):
            raise ValueError(f"trust_pickle must be true, false or a list of config keys, got {trust!r}")
        unknown = sorted(set(trust) - set(TRUSTABLE))
        if unknown:
            raise ValueError(f"trust_pickle names {', '.join(unknown)}, not model keys "
                             f"(expected some of {', '.join(TRUSTABLE)})")
        object.__setattr__(self, "trust_pickle", tuple(k for k in TRUSTABLE if k in trust))

    def trusts(self, key: str) -> bool:
        """Whether the config lets ``key``'s files be pickles."""
        return key in self.trust_pickle

    @classmethod
    def demo(cls, folder: str | os.PathLike = DEMO_ZOO) -> ZooSpec:
        f = Path(folder)
        return cls("demo", retrinet=str(f / "retrinet"), stable_diffusion=None, semantica=str(f / "semantica"),
                   clip=str(f / "clip"), detector=str(f / "detector"), image_encoder=str(f / "clip"))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ZooSpec:
        """A JSON config file; relative paths in it are relative to the file."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"cannot read the model config {path}: {e.strerror or e}") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"the model config {path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"the model config {path} must be a JSON object")
        raw = {k: v for k, v in raw.items() if not k.startswith("_")}  # "_comment" keys document the file
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown keys in {path}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        for key in ("family", "clip", "detector"):
            if not raw.get(key):
                raise ValueError(f"{path} must set {key!r}")
        if raw["family"] not in FAMILIES:
            raise ValueError(f"{path}: family {raw['family']!r} is not one of {', '.join(FAMILIES)}")

        def local(v):
            if isinstance(v, str) and (v.startswith((".", "/", "~")) or (path.parent / v).exists()):
                return str((path.parent / Path(v).expanduser()).resolve())
            return v

        values = {k: (v if k == "trust_pickle" else local(v)) for k, v in raw.items()}
        values.setdefault("retrinet", None)
        values.setdefault("stable_diffusion", None)
        values.setdefault("semantica", None)
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def pick_device(device: str | None = None) -> tuple[str, Any]:
    """``device`` (default: CUDA when present, else the CPU) and its dtype (fp16 on CUDA, else fp32)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return device, (torch.float16 if device.startswith("cuda") else torch.float32)


def _load(what: str, key: str, ref: str | None, loader):
    """Run ``loader(ref)``; turn a missing file / id into a ValueError that names ``key`` and ``ref``."""
    if not ref:
        raise MissingModel(f"no {what} is configured (set {key!r} in the model config)")
    try:
        return loader(ref)
    except MissingModel:
        raise
    except (OSError, ValueError, FileNotFoundError, KeyError, pickle.UnpicklingError) as e:
        # UnpicklingError: torch.load(weights_only=True) refused what a trusted pickle holds
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (" The Hub is offline (HF_HUB_OFFLINE=1): download it first, or point the config at a local folder."
                if offline and not Path(ref).exists() else "")
        raise ValueError(f"cannot load the {what} from {ref!r} (config key {key!r}): "
                         f"{(str(e).splitlines()[0] if str(e) else type(e).__name__).rstrip('.')}.{hint}") from e


class ModelZoo:
    """Lazily loaded models of one family, shared by every request (never mutated per request)."""

    def __init__(self, spec: ZooSpec, device: str | None = None):
        self.spec = spec
        self.device, self.dtype = pick_device(device)
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, family: str = "demo", config: str | os.PathLike | None = None,
             device: str | None = None) -> ModelZoo:
        """The ``demo`` family from ``assets/demo-zoo``, or the family a config file describes."""
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
        if config is not None:
            spec = ZooSpec.from_file(config)
            if spec.family != family:
                raise ValueError(f"--zoo {family} but {config} describes the {spec.family!r} family")
        elif family == "demo":
            spec = ZooSpec.demo()
        else:
            raise ValueError("the sd15 family needs a config file (--config), e.g. configs/sd15.json")
        return cls(spec, device)

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.spec), "device": self.device, "dtype": str(self.dtype).replace("torch.", "")}

    def _get(self, name: str, build):
        with self._lock:
            if name not in self._models:
                self._models[name] = build()
            return self._models[name]

    def _safetensors(self, key: str) -> dict[str, Any]:
        """``from_pretrained`` options for ``key``: safetensors only, unless the config trusts its pickles
        (then the library's choice: safetensors when present, else ``.bin`` read with weights_only=True)."""
        if not self.spec.trusts(key):
            return {"use_safetensors": True}
        warnings.warn(f"config key {key!r} is trusted with pickles: .bin weights load if no safetensors are found "
                      "(read with torch.load(weights_only=True))", _pickle_warning(), stacklevel=3)
        return {}

    # ------------------------------------------------------------------ the models

    def retrinet(self):
        """A ``RetriNetPipeline`` on this zoo's device."""
        return self._get("retrinet", self._build_retrinet)

    def _build_retrinet(self):
        from pipelines.retrinet import RetriNetPipeline

        def build(ref: str):
            folder = Path(ref)
            if (folder / "model_index.json").is_file():
                pipe = RetriNetPipeline.from_pretrained(folder, dtype=self.dtype, **self._safetensors("retrinet"))
            elif (folder / "retrinet" / "config.json").is_file():
                pipe = self._retrinet_from_training_output(folder)
            elif folder.exists():
                raise ValueError(f"{folder} is neither a RetriNetPipeline folder (model_index.json) nor a "
                                 "training output (retrinet/config.json)")
            else:
                raise FileNotFoundError(f"no such folder {folder}")
            return pipe.to(self.device)

        return _load("RetriNet pipeline", "retrinet", self.spec.retrinet, build)

    def _retrinet_from_training_output(self, folder: Path):
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel

        from pipelines.retrinet import RetriNetModel, RetriNetPipeline

        base = _load("base Stable Diffusion", "stable_diffusion", self.spec.stable_diffusion,
                     lambda ref: StableDiffusionPipeline.from_pretrained(ref, dtype=self.dtype,
                                                                         safety_checker=None,
                                                                         requires_safety_checker=False,
                                                                         **self._safetensors("stable_diffusion")))
        own = self._safetensors("retrinet")
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=self.dtype, **own) \
            if (folder / "unet" / "config.json").is_file() else base.unet
        retrinet = RetriNetModel.from_pretrained(folder / "retrinet", dtype=self.dtype, **own)
        return RetriNetPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
                                retrinet=retrinet, scheduler=base.scheduler)

    def semantica(self):
        """A ``SemanticaPipeline`` on this zoo's device."""

        def build(ref: str):
            from pipelines.semantica import SemanticaPipeline

            if not (Path(ref) / "model_index.json").is_file() and Path(ref).exists():
                raise ValueError(f"{ref} is not a SemanticaPipeline folder (no model_index.json)")
            return SemanticaPipeline.from_pretrained(ref, dtype=self.dtype,
                                                     **self._safetensors("semantica")).to(self.device)

        return self._get("semantica", lambda: _load("Semantica pipeline", "semantica", self.spec.semantica, build))

    def clip(self):
        """A ``ClipScorer`` (CLIP-I, CLIP-T, face embeddings)."""
        from pipelines.metrics import ClipScorer

        def build(ref: str):
            from transformers import CLIPModel, CLIPProcessor

            return ClipScorer(CLIPModel.from_pretrained(ref, **self._safetensors("clip")),
                              CLIPProcessor.from_pretrained(ref), device=self.device)

        return self._get("clip", lambda: _load("CLIP model", "clip", self.spec.clip, build))

    def extractor(self):
        """A ``ConceptExtractor``: the detector, and SAM when configured."""
        from pipelines.concepts import ConceptExtractor

        def build(ref: str):
            segmenter = None
            if self.spec.sam:
                from pipelines.detector import SamSegmenter

                segmenter = _load("SAM checkpoint", "sam", self.spec.sam,
                                  lambda ck: SamSegmenter.from_checkpoint(self.spec.sam_type, _existing(ck),
                                                                          trusted=self.spec.trusts("sam")))
            if Path(ref).is_dir():
                return ConceptExtractor.from_pretrained(ref, segmenter=segmenter)
            from pipelines.detector import YoloDetector

            return ConceptExtractor(YoloDetector(ref, head_class=self.spec.head_class,
                                                 trusted=self.spec.trusts("detector")), segmenter)

        return self._get("extractor", lambda: _load("concept detector", "detector", self.spec.detector, build))

    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._models)


def _pickle_warning() -> type[Warning]:
    from pipelines.detector import PickleWarning

    return PickleWarning


def _existing(path: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file {path}")
    return path
