"""Train a text-to-image ``UNet2DConditionModel`` with the Stable Diffusion objective.

    accelerate launch -m training.train_text_to_image --vae VAE_DIR --text-encoder CLIP_DIR \\
        --data DIR --output-dir OUT --resolution 64

The latent-diffusion objective of Rombach et al. (2022), as diffusers'
``examples/text_to_image/train_text_to_image.py`` trains it: the VAE and the text encoder are
frozen, the UNet predicts the noise added to a picture's latent at a random timestep, conditioned
on the last hidden states of the text encoder for the picture's tag caption. The caption is
replaced by "" with probability ``--caption-dropout`` (so classifier-free guidance works), tags
are dropped one by one with ``--tag-dropout`` (so short prompts work), and the loss is weighted
by timestep (``--timestep-weighting``): by default min(SNR, ``--snr-gamma``) / SNR (Hang et al.,
2023), which speeds up convergence; ``p2`` (Choi et al., 2022) moves more weight to the
high-noise timesteps; ``uniform`` (or ``--snr-gamma 0``) is the plain MSE.

Components come from ``--pretrained`` (a Stable Diffusion folder or Hub id, to fine-tune) or
from parts: ``--vae`` (an ``AutoencoderKL`` folder), ``--text-encoder`` (a ``CLIPTextModel`` or
whole ``CLIPModel`` folder, whose tokenizer is used unless ``--tokenizer``) and a new UNet
(``--unet-config``, by default the demo's with the text encoder's width). The result is a
``StableDiffusionPipeline`` folder, ``OUT/pipeline``, with a DPM-Solver++ scheduler.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from pipelines.components import DEMO_UNET, SD15_SCHEDULER, load_vae
from pipelines.retrinet import embed_texts
from training.core import (Trainer, add_training_arguments, check_training_arguments, prepare_optimisation, start_run,
                           WEIGHTINGS, timestep_weights, trainer_config, unweighted_last_step)
from training.data.images import TaggedImages, collate_images
from training.latents import LatentCache

logger = logging.getLogger("train_text_to_image")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="accelerate launch -m training.train_text_to_image",
                                description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("models")
    g.add_argument("--pretrained", default=None, help="a Stable Diffusion folder or Hub id to fine-tune")
    g.add_argument("--vae", default=None,
                   help="an AutoencoderKL (or AsymmetricAutoencoderKL) folder (with no --pretrained)")
    g.add_argument("--text-encoder", default=None, help="a CLIPTextModel or CLIPModel folder (with no --pretrained)")
    g.add_argument("--tokenizer", default=None, help="a CLIPTokenizer folder (default: the text encoder's)")
    g.add_argument("--unet-config", default=None, help="JSON file of UNet2DConditionModel arguments")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="a RetriBooru-style folder")
    g.add_argument("--split", default="train", help="split to train on ('none': every record)")
    g.add_argument("--resolution", type=int, default=64)
    g.add_argument("--caption-dropout", type=float, default=0.1)
    g.add_argument("--tag-dropout", type=float, default=0.1)
    g.add_argument("--timestep-weighting", choices=WEIGHTINGS, default="min-snr",
                   help="weight of each sample's loss by its timestep (training.core.timestep_weights)")
    g.add_argument("--snr-gamma", type=float, default=5.0, help="gamma of min-snr weighting (0: plain MSE)")
    g.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="what the UNet predicts (default: the --pretrained scheduler's; epsilon from scratch)")
    g.add_argument("--zero-terminal-snr", action="store_true",
                   help="rescale the noise schedule to a zero SNR at its last step, and sample from there "
                        "(trailing timestep spacing), as Lin et al. (2024) advise; needs v_prediction. Without "
                        "it the last step keeps a trace of the picture (SD 1.5's keeps 6.8 %%), whose mean colour "
                        "a model learns to read from the noise and then invents at sampling time; the smaller "
                        "the latent, the larger that trace's share (on 16x16 latents: a fifth to a third of the "
                        "variance of the noise's mean)")
    g.add_argument("--cache-latents", action="store_true",
                   help="encode each picture (and its mirror) once and keep its VAE posterior (training.latents); "
                        "a resumed run then equals an uninterrupted one up to rounding, not to the last bit")
    add_training_arguments(p, learning_rate=5e-4, batch_size=64, max_train_steps=2000, checkpointing_steps=100)
    args = p.parse_args(argv)
    check_training_arguments(p, args)
    if not args.pretrained and not (args.vae and args.text_encoder):
        p.error("give --pretrained, or --vae and --text-encoder")
    for name in ("caption_dropout", "tag_dropout"):
        if not 0 <= getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1)")
    if args.snr_gamma < 0:
        p.error("--snr-gamma must not be negative")
    if args.zero_terminal_snr and args.prediction_type != "v_prediction":
        p.error("--zero-terminal-snr needs --prediction-type v_prediction: at SNR 0 the noisy latent is the noise "
                "itself, and a noise prediction says nothing about the picture")
    return args


def load_components(args):
    """VAE, text encoder, tokenizer, UNet and the training noise scheduler."""
    try:
        if args.pretrained:
            vae = load_vae(args.pretrained, subfolder="vae")
            text_encoder = CLIPTextModel.from_pretrained(args.pretrained, subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer or args.pretrained,
                                                      **({} if args.tokenizer else {"subfolder": "tokenizer"}))
            noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained, subfolder="scheduler")
            unet = None if args.unet_config else UNet2DConditionModel.from_pretrained(args.pretrained, subfolder="unet")
        else:
            vae = load_vae(args.vae)
            text_encoder = CLIPTextModel.from_pretrained(args.text_encoder)
            tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer or args.text_encoder)
            noise_scheduler = DDPMScheduler(**{k: v for k, v in SD15_SCHEDULER.items()
                                               if k not in ("skip_prk_steps", "set_alpha_to_one")})
            unet = None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the components: {e}") from e
    overrides: dict[str, Any] = {}
    if args.prediction_type:
        overrides["prediction_type"] = args.prediction_type
    if args.zero_terminal_snr:
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if overrides:
        noise_scheduler = DDPMScheduler.from_config(noise_scheduler.config, **overrides)
    if unet is None:
        config = dict(DEMO_UNET, cross_attention_dim=text_encoder.config.hidden_size)
        if args.unet_config:
            try:
                config = json.loads(Path(args.unet_config).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read --unet-config {args.unet_config}: {e}") from e
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        config.update(sample_size=args.resolution // factor, in_channels=vae.config.latent_channels,
                      out_channels=vae.config.latent_channels)
        unet = UNet2DConditionModel(**config)
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ValueError(f"the UNet attends to width {unet.config.cross_attention_dim}, the text encoder gives "
                         f"{text_encoder.config.hidden_size}")
    return vae, text_encoder, tokenizer, unet, noise_scheduler


def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, ehs: torch.Tensor, snr_gamma: float,
                   weighting: str = "min-snr") -> torch.Tensor:
    """The noise-prediction MSE at a random timestep, weighted by ``weighting`` (``timestep_weights``;
    min-SNR with ``snr_gamma`` 0 is the plain MSE)."""
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)  # whatever the layout
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    pred = unet(noisy, t, ehs).sample
    if weighting == "uniform" or (weighting == "min-snr" and not snr_gamma):
        return F.mse_loss(pred.float(), target.float())
    weight = timestep_weights(noise_scheduler, t, weighting, snr_gamma)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weight).mean()


def main(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output_dir)
    accelerator = start_run(args)
    split = None if args.split == "none" else args.split
    dataset = TaggedImages(args.data, split, args.resolution, tag_dropout=args.tag_dropout, seed=args.seed)
    vae, text_encoder, tokenizer, unet, noise_scheduler = load_components(args)
    if unweighted_last_step(noise_scheduler, args.timestep_weighting, args.snr_gamma):
        logger.warning("--timestep-weighting %s gives the last timestep of this zero-terminal-SNR v schedule no "
                       "weight: the step where the prompt alone decides colours is not trained (use uniform)",
                       args.timestep_weighting)
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    signature = {"unet": json.loads(json.dumps(dict(unet.config), default=list)),
                 "num_processes": accelerator.num_processes, "train_batch_size": args.train_batch_size,
                 "gradient_accumulation_steps": args.gradient_accumulation_steps}
    unet, optimizer, lr_scheduler = prepare_optimisation(accelerator, args, unet)
    unet.train()
    sf = vae.config.scaling_factor
    cache = LatentCache(vae) if args.cache_latents else None

    def loss_fn(batch):
        with torch.no_grad():
            pixels = batch["pixel_values"].to(accelerator.device, weight_dtype)
            if cache is not None:  # a picture is the same every time it is drawn mirrored (or not)
                keys = list(zip(batch["index"].tolist(), batch["flipped"].tolist()))
                latents = cache.sample(keys, pixels) * sf
            else:
                latents = vae.encode(pixels).latent_dist.sample() * sf
            drop = torch.rand(len(batch["caption"])) < args.caption_dropout
            captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
            ehs = embed_texts(tokenizer, text_encoder, captions, accelerator.device)
        return diffusion_loss(unet, noise_scheduler, latents, ehs, args.snr_gamma, args.timestep_weighting)

    trainer = Trainer(accelerator, trainer_config(args), dataset, collate_images, [unet], optimizer, lr_scheduler,
                      loss_fn, signature)
    start = trainer.resume(args.resume_from_checkpoint)
    logger.info("training the UNet on %d pictures from step %d to %d", len(dataset), start, args.max_train_steps)
    state = trainer.train()
    result: dict[str, Any] = {"global_step": state.global_step, "output_dir": str(out)}
    if accelerator.is_main_process:
        scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler.config)
        pipe = StableDiffusionPipeline(vae=vae.float(), text_encoder=text_encoder.float(), tokenizer=tokenizer,
                                       unet=accelerator.unwrap_model(unet).float(), scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(out / "pipeline")
    accelerator.wait_for_everyone()
    return result


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        logger.error("%s", e)
        sys.exit(f"error: {e}")
