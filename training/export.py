"""A pipeline folder from a training run's checkpoint or final models, for the studio and the reports.

A checkpoint of ``training.core`` holds Accelerate's state: the trained models' weights as
safetensors (RetriNet, and the UNet when it trained; Semantica's UNet and conditioner), the
optimiser, and ``trainer_state.json`` whose signature gives the models' configs. The rest (VAE,
text encoder, scheduler, image encoder) comes from the run's base. Only safetensors are read (never
the checkpoint's pickled RNG states, nor a base's ``.bin`` weights).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from training.checkpoints import STATE_FILE


def _signature(checkpoint: Path) -> dict[str, Any]:
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        return dict(state["signature"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{checkpoint}: {STATE_FILE} cannot be read ({e})") from e


def _config(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if not str(k).startswith("_")}


def _load_weights(checkpoint: Path, models: Mapping[str, Any]) -> set[str]:
    """Load each ``model*.safetensors`` of an Accelerate checkpoint into the model whose parameter
    names it holds; return the names of the models loaded."""
    from safetensors.torch import load_file

    loaded = set()
    for path in sorted(checkpoint.glob("model*.safetensors")):
        weights = load_file(path)
        for name, model in models.items():
            if set(weights) == set(model.state_dict()):
                try:
                    model.load_state_dict(weights, strict=True)
                except RuntimeError as e:
                    raise ValueError(f"{path.name} does not fit the {name}: {e}") from e
                loaded.add(name)
                break
        else:
            raise ValueError(f"{path} matches none of the models ({', '.join(models)})")
    return loaded


def _inference_scheduler(pretrained: str):
    """The base's scheduler, or DDIM when the base keeps the training one (DDPM)."""
    import diffusers

    try:
        config, *_ = diffusers.DDIMScheduler.load_config(pretrained, subfolder="scheduler", return_unused_kwargs=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the scheduler of the base {pretrained}: {e}") from e
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is None or cls is diffusers.DDPMScheduler or not hasattr(cls, "from_config"):
        cls = diffusers.DDIMScheduler
    return cls.from_config(config)


def export_retrinet(source: Path, pretrained: str | None, target: Path, unet: str | None = None) -> None:
    """A ``RetriNetPipeline`` folder from a checkpoint or a run's final ``retrinet/`` [+ ``unet/``];
    ``unet``: the UNet the run started from when it was not ``pretrained``'s (its ``--unet``), which
    a checkpoint holds only if the UNet trained."""
    if not pretrained:
        raise ValueError("the run's record names no base model")
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipelines.components import load_vae
    from pipelines.retrinet import RetriNetModel, RetriNetPipeline

    try:
        vae = load_vae(pretrained, subfolder="vae", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
        base_unet = None if unet else UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet",
                                                                           use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the base model {pretrained}: {e}") from e
    if base_unet is not None:
        unet = base_unet
    else:
        try:
            unet = UNet2DConditionModel.from_pretrained(unet, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the UNet {unet}: {e}") from e
    if (source / STATE_FILE).is_file():
        retrinet = RetriNetModel.from_config(_config(_signature(source).get("retrinet") or {}))
        loaded = _load_weights(source, {"RetriNet": retrinet, "UNet": unet})
        if "RetriNet" not in loaded:
            raise ValueError(f"{source} holds no RetriNet weights")
    else:
        retrinet = RetriNetModel.from_pretrained(source / "retrinet", use_safetensors=True)
        if (source / "unet" / "config.json").is_file():
            unet = UNet2DConditionModel.from_pretrained(source / "unet", use_safetensors=True)
    RetriNetPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, retrinet=retrinet,
                     scheduler=_inference_scheduler(pretrained)).save_pretrained(target)


def export_semantica(source: Path, pretrained: str | None, image_encoder: str | None, target: Path) -> None:
    """A ``SemanticaPipeline`` folder from a Semantica training checkpoint."""
    if not pretrained or not image_encoder:
        raise ValueError("the run's record names no base model or image encoder")
    from diffusers import UNet2DConditionModel

    from pipelines.components import load_vae
    from pipelines.semantica import SemanticaConditioner, SemanticaPipeline, load_image_encoder, prepare_unet

    config = _config(_signature(source).get("conditioner") or {})
    conditioner = SemanticaConditioner.from_config(config)
    try:
        vae = load_vae(pretrained, subfolder="vae", use_safetensors=True)
        unet = prepare_unet(UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", use_safetensors=True),
                            config.get("conditioning", "tokens"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the base model {pretrained}: {e}") from e
    encoder, processor = load_image_encoder(image_encoder)
    if "UNet" not in _load_weights(source, {"UNet": unet, "conditioner": conditioner}):
        raise ValueError(f"{source} holds no UNet weights")
    SemanticaPipeline(unet=unet, vae=vae, scheduler=_inference_scheduler(pretrained), image_encoder=encoder,
                      feature_extractor=processor, conditioner=conditioner).save_pretrained(target)
