"""Semantica's conditioning: a frozen image encoder, and what the UNet reads of it (seed 004, Sec. 3.2-3.4).

The frozen encoder is a transformers ``Dinov2Model`` (the ``sd15`` family: DINOv2-base, width 768,
Stable Diffusion 1.5's cross-attention width) or a ``CLIPVisionModel`` (the ``demo`` family: the
vision tower of the demo CLIP, loadable from a saved full ``CLIPModel`` folder). Of a picture it
gives

- the **tokens**: ``last_hidden_state`` (B, 1 + P, D), CLS first, then the P patch tokens. DINOv2
  ends with its layer norm; CLIP's tower does not, so its ``post_layernorm`` (the norm CLIP puts
  on its pooled token) is applied to every token, which makes both encoders' tokens alike;
- the **global token**: ``pooler_output`` (B, D), the normalised CLS token of both.

``SemanticaConditioner`` turns them into what a diffusers ``UNet2DConditionModel`` reads:

- ``conditioning="tokens"`` (the paper's better option, Sec. 3.4 and 6.2): the UNet cross-attends
  to the tokens (with or without CLS, ``include_cls``), through a learned linear projection to its
  ``cross_attention_dim`` when the widths differ (none for DINOv2-base and SD 1.5);
- ``conditioning="global"`` (FiLM, kept for comparison): "we normalize the CLS token, embed it with
  a dense projection and add it to the timescale embedding" (Sec. 3.4). The conditioner holds the
  layer norm and the dense projection (zero-initialised, so the UNet starts as the pretrained
  one); the addition is diffusers' own: the UNet is given ``class_embed_type="identity"`` and the
  projected token is passed as ``class_labels``, which the UNet adds to its time embedding before
  every ResNet block reads it (a shift, or FiLM's scale and shift with
  ``resnet_time_scale_shift="scale_shift"``). The cross-attention layers then read only the
  unconditional token.

Conditioning dropout (for guidance, Sec. 7 and App. J) replaces a sample's conditioning by the
"unconditional" one: a token (and, for ``global``, a time-embedding vector) that is learned
(``unconditional="learned"``, initialised at zero) or fixed at zero (``"zero"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, Dinov2Model, PreTrainedModel

CONDITIONINGS = ("tokens", "global")
UNCONDITIONALS = ("learned", "zero")
ENCODER_CLASSES = {"dinov2": Dinov2Model, "clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel}


# ---------------------------------------------------------------------- the frozen encoder

def load_image_encoder(name_or_path: str, revision: str | None = None):
    """The frozen encoder (eval mode, no gradients) and its image processor, from a folder or Hub id.

    The class follows the config's ``model_type``: ``dinov2`` -> ``Dinov2Model``; ``clip`` (a full
    ``CLIPModel`` folder, whose vision tower is taken) or ``clip_vision_model`` -> ``CLIPVisionModel``.
    """
    kw = {"revision": revision} if revision else {}
    try:
        model_type = AutoConfig.from_pretrained(name_or_path, **kw).model_type
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the image encoder from {name_or_path}: {e}") from e
    if model_type not in ENCODER_CLASSES:
        raise ValueError(f"image encoder {name_or_path} is a {model_type!r} model; expected one of "
                         f"{', '.join(ENCODER_CLASSES)}")
    try:
        encoder = ENCODER_CLASSES[model_type].from_pretrained(name_or_path, **kw)
        processor = AutoImageProcessor.from_pretrained(name_or_path, **kw)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the image encoder from {name_or_path}: {e}") from e
    encoder.requires_grad_(False)
    return encoder.eval(), processor


def _final_norm(encoder: PreTrainedModel) -> nn.Module | None:
    """CLIP's ``post_layernorm`` (wherever this transformers version puts it); None for DINOv2."""
    if encoder.config.model_type != "clip_vision_model":
        return None
    for name, module in encoder.named_modules():
        if name.split(".")[-1] == "post_layernorm":
            return module
    raise ValueError("this CLIPVisionModel has no post_layernorm")


def encode_images(encoder: PreTrainedModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, 1 + P, D), CLS first, and the global token (B, D) of processed pictures."""
    if encoder.config.model_type not in ENCODER_CLASSES:
        raise ValueError(f"unsupported image encoder {type(encoder).__name__}; expected Dinov2Model or CLIPVisionModel")
    out = encoder(pixel_values=pixel_values.to(device=encoder.device, dtype=encoder.dtype))
    tokens = out.last_hidden_state  # (B, 1+P, D)
    norm = _final_norm(encoder)
    if norm is not None:
        tokens = norm(tokens)
    return tokens, out.pooler_output  # (B, 1+P, D), (B, D)


def process_images(processor, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
    """(N, 3, S, S) pixel values of RGB pictures, as the encoder's image processor prepares them."""
    return processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values


@torch.no_grad()
def image_features(encoder: PreTrainedModel, processor, images: Sequence[PIL.Image.Image],
                   batch_size: int = 32) -> torch.Tensor:
    """(N, D) float32 global tokens of ``images``, computed ``batch_size`` at a time: what the pair
    filter compares (cosine) and the default features of the few-shot metrics."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out = [encode_images(encoder, process_images(processor, images[i:i + batch_size]))[1].float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty(0, encoder.config.hidden_size)


# ---------------------------------------------------------------------- the UNet

def time_embed_dim(unet: UNet2DConditionModel) -> int:
    """Width of the UNet's time embedding (what ``class_labels`` is added to)."""
    return unet.time_embedding.linear_2.out_features


def prepare_unet(unet: UNet2DConditionModel, conditioning: str) -> UNet2DConditionModel:
    """``unet`` ready for ``conditioning``, changed in place: for ``global`` its config gets
    ``class_embed_type="identity"`` (no new weights: ``class_labels`` is added to the time
    embedding as it is), as diffusers' training scripts change ``conv_in`` and register it."""
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"unknown conditioning {conditioning!r}; expected one of {', '.join(CONDITIONINGS)}")
    c = unet.config
    other = {k: c.get(k) for k in ("num_class_embeds", "addition_embed_type", "encoder_hid_dim", "time_cond_proj_dim")
             if c.get(k) is not None}
    if other:
        raise ValueError(f"Semantica needs a Stable Diffusion 1.x / 2.x UNet; this one has {other}")
    wanted = "identity" if conditioning == "global" else None
    if c.class_embed_type == wanted:
        return unet
    if c.class_embed_type is not None:
        raise ValueError(f"a UNet with class_embed_type={c.class_embed_type!r} cannot take {conditioning!r} conditioning")
    unet.register_to_config(class_embed_type="identity")
    unet.class_embedding = nn.Identity()
    return unet


# ---------------------------------------------------------------------- the conditioner

class SemanticaConditioner(ModelMixin, ConfigMixin):
    """What a UNet reads of the frozen encoder's output; build it with ``from_models``.

    ``forward(tokens, pooled, drop)`` returns ``(encoder_hidden_states, class_labels)`` for
    ``unet(sample, t, encoder_hidden_states, class_labels=class_labels)``: (B, T, C_x) and None
    for ``tokens``; (B, 1, C_x) unconditional tokens and (B, C_t) for ``global``. Rows where
    ``drop`` is True get the unconditional conditioning.
    """

    @register_to_config
    def __init__(
        self,
        encoder_dim: int = 768,  # width of the frozen encoder's tokens
        cross_attention_dim: int = 768,  # the UNet's; the tokens are projected to it if it differs
        conditioning: str = "tokens",  # "tokens": cross-attention (Sec. 3.4); "global": CLS via the time embedding
        time_embed_dim: int = 1280,  # the UNet's time-embedding width (global only)
        include_cls: bool = True,  # tokens: cross-attend to CLS + patches (True) or to the patches only
        unconditional: str = "learned",  # the dropped conditioning: learned (starts at zero) or fixed zero
    ):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {conditioning!r}; expected one of {', '.join(CONDITIONINGS)}")
        if unconditional not in UNCONDITIONALS:
            raise ValueError(f"unknown unconditional {unconditional!r}; expected one of {', '.join(UNCONDITIONALS)}")
        for name, value in (("encoder_dim", encoder_dim), ("cross_attention_dim", cross_attention_dim),
                            ("time_embed_dim", time_embed_dim)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        tokens = conditioning == "tokens"
        self.proj = nn.Linear(encoder_dim, cross_attention_dim) if tokens and encoder_dim != cross_attention_dim \
            else nn.Identity()
        self._null("uncond_tokens", torch.zeros(1, 1, cross_attention_dim))  # (1, 1, C_x)
        if not tokens:
            self.global_norm = nn.LayerNorm(encoder_dim)
            self.global_proj = nn.Linear(encoder_dim, time_embed_dim)
            nn.init.zeros_(self.global_proj.weight)  # the UNet starts as the pretrained one
            nn.init.zeros_(self.global_proj.bias)
            self._null("uncond_global", torch.zeros(1, time_embed_dim))  # (1, C_t)

    def _null(self, name: str, value: torch.Tensor) -> None:
        if self.config.unconditional == "learned":
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    @classmethod
    def from_models(cls, image_encoder: PreTrainedModel, unet: UNet2DConditionModel, conditioning: str = "tokens",
                    include_cls: bool = True, unconditional: str = "learned") -> SemanticaConditioner:
        """A conditioner from ``image_encoder``'s width to ``unet``'s (call ``prepare_unet`` on it too)."""
        model = cls(encoder_dim=image_encoder.config.hidden_size, cross_attention_dim=unet.config.cross_attention_dim,
                    conditioning=conditioning, time_embed_dim=time_embed_dim(unet), include_cls=include_cls,
                    unconditional=unconditional)
        if model.dtype != unet.dtype or model.device != unet.device:
            model = model.to(device=unet.device, dtype=unet.dtype)
        return model

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor,
                drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``tokens`` (B, 1 + P, D) and ``pooled`` (B, D) from ``encode_images``; ``drop`` (B,) bool."""
        b = tokens.shape[0]
        if tokens.ndim != 3 or pooled.shape != (b, tokens.shape[2]):
            raise ValueError(f"tokens (B, T, D) and pooled (B, D) expected, got {tuple(tokens.shape)} and "
                             f"{tuple(pooled.shape)}")
        if tokens.shape[2] != self.config.encoder_dim:
            raise ValueError(f"tokens of width {tokens.shape[2]} given, this conditioner takes {self.config.encoder_dim}")
        dtype = self.uncond_tokens.dtype
        drop = torch.zeros(b, dtype=torch.bool, device=tokens.device) if drop is None else drop.to(tokens.device)
        if self.config.conditioning == "global":
            ehs = self.uncond_tokens.expand(b, 1, -1)  # (B, 1, C_x): cross-attention reads no picture
            labels = self.global_proj(self.global_norm(pooled.to(dtype)))  # (B, C_t)
            labels = torch.where(drop[:, None], self.uncond_global.expand_as(labels), labels)
            return ehs, labels
        if not self.config.include_cls:
            tokens = tokens[:, 1:]
        ehs = self.proj(tokens.to(dtype))  # (B, T, C_x)
        ehs = torch.where(drop[:, None, None], self.uncond_tokens.expand_as(ehs), ehs)
        return ehs, None
