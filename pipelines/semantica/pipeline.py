"""``SemanticaPipeline``: variations of a picture, text-free (seed 004, Sec. 3 and 5; App. H and J).

The conditioning picture goes once per call through the frozen image encoder and the conditioner
(see ``pipelines.semantica.model``); the UNet denoises a latent of the VAE while reading it.
Guidance follows the paper (seed 004, Sec. 6.1, App. H and J):

    eps = eps_c + w (eps_c - eps_u),   w >= 0,

so w = 0 is the conditional prediction alone (the unconditional branch is then not computed),
and larger w takes more specific details of the conditioning picture (App. J, Fig. 14).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import (AsymmetricAutoencoderKL, AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from transformers import CLIPVisionModel, Dinov2Model

from pipelines.semantica.model import SemanticaConditioner, encode_images, process_images


@dataclass
class SemanticaPipelineOutput(BaseOutput):
    """``images``: PIL pictures, a numpy array (N, H, W, 3) or latents, as ``output_type`` asks;
    the pictures of each conditioning picture are consecutive."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class SemanticaPipeline(DiffusionPipeline):
    """Generate variations of conditioning pictures with Semantica.

    Components: ``unet``, ``vae``, any diffusers ``scheduler``, the frozen ``image_encoder``
    (``Dinov2Model`` or ``CLIPVisionModel``), its image processor ``feature_extractor`` and the
    ``conditioner``. The folder round-trips through ``save_pretrained`` / ``from_pretrained``.
    """

    model_cpu_offload_seq = "image_encoder->conditioner->unet->vae"
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]

    prepare_latents = StableDiffusionPipeline.prepare_latents
    prepare_extra_step_kwargs = StableDiffusionPipeline.prepare_extra_step_kwargs

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL | AsymmetricAutoencoderKL,
                 scheduler: KarrasDiffusionSchedulers,
                 image_encoder: Dinov2Model | CLIPVisionModel, feature_extractor, conditioner: SemanticaConditioner):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, image_encoder=image_encoder,
                              feature_extractor=feature_extractor, conditioner=conditioner)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ inputs

    def check_inputs(self, image, height: int, width: int, num_inference_steps: int, guidance_scale: float,
                     num_images_per_prompt: int, output_type: str) -> list[PIL.Image.Image]:
        """The conditioning pictures as a list; ``ValueError`` on anything malformed."""
        images = [image] if isinstance(image, PIL.Image.Image) else image
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError(f"image must be a PIL image or a non-empty list of them, got {type(image).__name__}")
        for im in images:
            if not isinstance(im, PIL.Image.Image):
                raise ValueError(f"a conditioning image must be a PIL image, got {type(im).__name__}")  # noqa: TRY004
        f = self.vae_scale_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height} x {width}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer of at least 1, got {num_inference_steps}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or \
                math.isnan(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale}")
        if math.isinf(guidance_scale):
            raise ValueError("guidance_scale must be finite")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or \
                num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer of at least 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"unknown output_type {output_type!r}; expected pil, np, pt or latent")
        return list(images)

    # ------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def encode_image(self, images: Sequence[PIL.Image.Image], num_images_per_prompt: int, device: torch.device,
                     do_guidance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The UNet's ``encoder_hidden_states`` (B, T, C) and ``class_labels`` (B, C_t) or None for
        B = len(images) * num_images_per_prompt, the unconditional rows first when ``do_guidance``
        (then B doubles)."""
        pixels = process_images(self.feature_extractor, images).to(device)  # (G, 3, S, S)
        tokens, pooled = encode_images(self.image_encoder, pixels)  # (G, T, D), (G, D)
        tokens = tokens.repeat_interleave(num_images_per_prompt, 0)
        pooled = pooled.repeat_interleave(num_images_per_prompt, 0)
        ehs, labels = self.conditioner(tokens, pooled)
        if do_guidance:
            drop = torch.ones(tokens.shape[0], dtype=torch.bool, device=device)
            ehs_u, labels_u = self.conditioner(tokens, pooled, drop)
            ehs = torch.cat([ehs_u, ehs])  # (2B, T, C)
            labels = torch.cat([labels_u, labels]) if labels is not None else None
        dtype = self.unet.dtype
        return ehs.to(dtype), labels.to(dtype) if labels is not None else None

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | list[PIL.Image.Image],
        num_images_per_prompt: int = 1,
        guidance_scale: float = 0.5,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        height: int | None = None,
        width: int | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        eta: float = 0.0,
    ):
        """Generate ``num_images_per_prompt`` variations of each conditioning picture ``image``.

        ``guidance_scale`` is the paper's w >= 0 (0.5 in its ablations, Sec. 6.1): 0 uses the
        conditional prediction alone. ``height`` / ``width`` default to the UNet's sample size.
        """
        # 0. Default size: the UNet's
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor

        # 1. Check inputs
        images = self.check_inputs(image, height, width, num_inference_steps, guidance_scale, num_images_per_prompt,
                                   output_type)
        bad = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(bad)} are not among {self._callback_tensor_inputs}")
        device = self._execution_device
        do_guidance = guidance_scale > 0
        batch = len(images) * num_images_per_prompt

        # 2. Encode the conditioning pictures, once per call
        encoder_hidden_states, class_labels = self.encode_image(images, num_images_per_prompt, device, do_guidance)

        # 3. Prepare timesteps
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)

        # 4. Prepare latent variables
        latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width,
                                       encoder_hidden_states.dtype, device, generator, latents)

        # 5. Prepare extra step kwargs
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 6. Denoising loop
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                latent_model_input = torch.cat([latents] * 2) if do_guidance else latents  # (2B or B, C, h, w)
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                noise_pred = self.unet(latent_model_input, t, encoder_hidden_states=encoder_hidden_states,
                                       class_labels=class_labels, return_dict=False)[0]
                if do_guidance:
                    noise_uncond, noise_cond = noise_pred.chunk(2)
                    noise_pred = noise_cond + guidance_scale * (noise_cond - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    local = {"latents": latents}
                    out = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    latents = (out or {}).get("latents", latents)
                progress_bar.update()

        # 7. Decode
        if output_type == "latent":
            images = latents
        else:
            images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False,
                                     generator=generator)[0]
            images = self.image_processor.postprocess(images, output_type=output_type,
                                                      do_denormalize=[True] * images.shape[0])
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return SemanticaPipelineOutput(images=images)
