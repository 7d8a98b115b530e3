"""Train a (small) ``AutoencoderKL`` on the pictures of a RetriBooru-style folder.

    accelerate launch -m training.train_vae --data DIR --output-dir OUT --resolution 64

The objective of the latent-diffusion autoencoder without its adversarial and perceptual terms
(no pretrained network to measure them with here): L1 + MSE reconstruction plus a small KL
weight (``--kl-weight``, 1e-6 as in Rombach et al.'s KL-f8), and an MSE between 8x8 average-pooled
pictures and reconstructions (``--color-loss-weight``): a small VAE trained briefly otherwise gets
shapes right long before colours, and colours are what the demo's report judges. ``--face-loss-weight``
adds an MSE over the face boxes' pixels alone: a full figure's eyes are a few pixels that a
whole-picture loss hardly sees. ``--decoder-only`` fine-tunes the decoder of a trained VAE and keeps
its encoder, so a diffusion model trained on its latents can use the new decoder as it is;
``--decode-mode`` decodes each posterior's mean instead of a draw from it. ``--decoder-channels`` makes the
decoder a new, wider one trained from scratch on the frozen encoder: an ``AsymmetricAutoencoderKL`` (Zhu et al.,
2023, "Designing a Better Asymmetric VQGAN for StableDiffusion"), whose encoder, latents and scale are the
pretrained VAE's, and which the pipelines load in its place. When
training ends, the latents' standard deviation over up to
1,024 training pictures sets ``scaling_factor`` (SD 1.5's 0.18215 was found the same way), and the
model is saved to ``OUT/vae``.
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
from diffusers import AsymmetricAutoencoderKL, AutoencoderKL

from pipelines.components import DEMO_VAE, load_vae
from training.core import (Trainer, add_training_arguments, check_training_arguments, prepare_optimisation, start_run,
                           trainer_config)
from training.data.images import TaggedImages, collate_images

logger = logging.getLogger("train_vae")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="accelerate launch -m training.train_vae", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a RetriBooru-style folder")
    p.add_argument("--split", default="train", help="split to train on ('none': every record)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--pretrained-vae", default=None, help="fine-tune this AutoencoderKL (folder or Hub id)")
    p.add_argument("--vae-config", default=None, help="JSON file of AutoencoderKL arguments (default: the demo's)")
    p.add_argument("--latent-channels", type=int, default=None,
                   help="channels of a new VAE's latent (default: the config's; the demo's 4, as SD 1.5's; 16 kept "
                        "no more of the demo's eyes and patterns than 4: BENCHMARKS.md)")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--color-loss-weight", type=float, default=1.0,
                   help="weight of an MSE between 8x8 average-pooled pictures and reconstructions")
    p.add_argument("--face-loss-weight", type=float, default=0.0,
                   help="weight of an MSE over the pixels of each picture's face box (its face_bbox)")
    p.add_argument("--decoder-only", action="store_true",
                   help="train the decoder alone (with --pretrained-vae): the encoder, and so the latent space a "
                        "diffusion model was trained on, stays as it is (as sd-vae-ft-mse fine-tuned SD's decoder)")
    p.add_argument("--decode-mode", action="store_true",
                   help="decode each picture's posterior mean (its mode) instead of a draw from the posterior: the "
                        "decoder then learns the exact latents, not latents blurred by the posterior's noise")
    p.add_argument("--decoder-channels", default=None,
                   help="with --decoder-only: train a new decoder with these block widths (comma-separated, as "
                        "many as the encoder's blocks, e.g. 32,64,128) on the frozen encoder, saved as an "
                        "AsymmetricAutoencoderKL")
    p.add_argument("--decoder-layers-per-block", type=int, default=None,
                   help="with --decoder-channels: the new decoder's layers per block (default: the encoder's)")
    add_training_arguments(p, learning_rate=1e-3, batch_size=32, max_train_steps=2000, checkpointing_steps=200)
    args = p.parse_args(argv)
    check_training_arguments(p, args)
    if args.kl_weight < 0 or args.color_loss_weight < 0 or args.face_loss_weight < 0:
        p.error("--kl-weight, --color-loss-weight and --face-loss-weight must not be negative")
    if args.latent_channels is not None:
        if args.latent_channels < 1:
            p.error(f"--latent-channels must be at least 1, got {args.latent_channels}")
        if args.pretrained_vae:
            p.error("--latent-channels sets up a new VAE: a pretrained one keeps its latent")
    if args.decoder_only and not args.pretrained_vae:
        p.error("--decoder-only fine-tunes a trained VAE: give --pretrained-vae")
    if args.decoder_channels is not None:
        if not args.decoder_only:
            p.error("--decoder-channels trains a new decoder on a frozen encoder: give --decoder-only")
        try:
            args.decoder_channels = tuple(int(c) for c in args.decoder_channels.split(","))
        except ValueError:
            p.error(f"--decoder-channels must be comma-separated integers, got {args.decoder_channels!r}")
        if not args.decoder_channels or min(args.decoder_channels) < 1:
            p.error("--decoder-channels must be positive")
    if args.decoder_layers_per_block is not None:
        if args.decoder_channels is None:
            p.error("--decoder-layers-per-block goes with --decoder-channels")
        if args.decoder_layers_per_block < 1:
            p.error("--decoder-layers-per-block must be at least 1")
    return args


def build_vae(args) -> AutoencoderKL | AsymmetricAutoencoderKL:
    if args.pretrained_vae:
        vae = load_vae(args.pretrained_vae)
        if getattr(args, "decoder_channels", None):
            return with_new_decoder(vae, args.decoder_channels, args.decoder_layers_per_block)
        return vae
    config = dict(DEMO_VAE)
    if args.vae_config:
        try:
            config = json.loads(Path(args.vae_config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read --vae-config {args.vae_config}: {e}") from e
    if getattr(args, "latent_channels", None):
        config["latent_channels"] = args.latent_channels
    return AutoencoderKL(**config)


def with_new_decoder(vae: AutoencoderKL | AsymmetricAutoencoderKL, channels: tuple[int, ...],
                     layers_per_block: int | None = None) -> AsymmetricAutoencoderKL:
    """An ``AsymmetricAutoencoderKL`` with ``vae``'s encoder, ``quant_conv`` and latent scale (copied) and a new,
    randomly initialised decoder of block widths ``channels``: the latents stay those a diffusion model was trained
    on. Its decoder's inpainting branch (``condition_encoder``) is left unused and frozen."""
    c = vae.config
    asymmetric = isinstance(vae, AsymmetricAutoencoderKL)
    encoder_channels = tuple(c.down_block_out_channels if asymmetric else c.block_out_channels)
    encoder_layers = c.layers_per_down_block if asymmetric else c.layers_per_block
    if len(channels) != len(encoder_channels):
        raise ValueError(f"the decoder needs {len(encoder_channels)} block widths, one per encoder block (the same "
                         f"downsampling), got {len(channels)}: {channels}")
    if any(ch % c.norm_num_groups for ch in channels):
        raise ValueError(f"every decoder width must be a multiple of the VAE's norm_num_groups {c.norm_num_groups}, "
                         f"got {channels}")
    if vae.quant_conv is None:
        raise ValueError("the VAE has no quant_conv (use_quant_conv=False), which AsymmetricAutoencoderKL requires")
    new = AsymmetricAutoencoderKL(
        in_channels=c.in_channels, out_channels=c.out_channels, down_block_types=tuple(c.down_block_types),
        down_block_out_channels=encoder_channels, layers_per_down_block=encoder_layers,
        up_block_types=("UpDecoderBlock2D",) * len(channels), up_block_out_channels=tuple(channels),
        layers_per_up_block=layers_per_block or encoder_layers, act_fn=c.act_fn, latent_channels=c.latent_channels,
        norm_num_groups=c.norm_num_groups, sample_size=c.sample_size, scaling_factor=c.scaling_factor)
    new.encoder.load_state_dict(vae.encoder.state_dict())
    new.quant_conv.load_state_dict(vae.quant_conv.state_dict())
    return new


class VAELoss(torch.nn.Module):
    """The VAE and its loss in one ``forward``, so that a data-parallel wrapper (which syncs
    gradients only through ``forward``) sees the whole step."""

    def __init__(self, vae: AutoencoderKL | AsymmetricAutoencoderKL, kl_weight: float, color_weight: float = 0.0,
                 face_weight: float = 0.0, decoder_only: bool = False, decode_mode: bool = False):
        super().__init__()
        self.vae, self.kl_weight, self.color_weight, self.face_weight = vae, kl_weight, color_weight, face_weight
        self.decoder_only, self.decode_mode = decoder_only, decode_mode
        if decoder_only:
            vae.encoder.requires_grad_(False)
            if vae.quant_conv is not None:
                vae.quant_conv.requires_grad_(False)
            if hasattr(vae.decoder, "condition_encoder"):  # AsymmetricAutoencoderKL's inpainting branch: unused
                vae.decoder.condition_encoder.requires_grad_(False)

    def forward(self, pixels: torch.Tensor, face: torch.Tensor | None = None) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.decoder_only):
            posterior = self.vae.encode(pixels).latent_dist
        recon = self.vae.decode(posterior.mode() if self.decode_mode else posterior.sample()).sample.float()
        x = pixels.float()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        if not self.decoder_only:  # a frozen encoder's KL is a constant
            loss = loss + self.kl_weight * posterior.kl().mean()
        if self.color_weight:  # the colours of 8x8 areas: what the small demo VAE otherwise learns last
            loss = loss + self.color_weight * F.mse_loss(F.avg_pool2d(recon, 8), F.avg_pool2d(x, 8))
        if self.face_weight and face is not None and face.any():
            # the MSE over the face boxes' pixels alone: a full figure's eyes are 2 pixels of 64 x 64, which
            # a whole-picture loss hardly sees
            face = face.to(recon.dtype)
            loss = loss + self.face_weight * ((recon - x) ** 2 * face).sum() / (face.sum() * x.shape[1])
        return loss


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, dataset: TaggedImages, limit: int = 1024, batch: int = 64) -> float:
    """1 / std of the latents (posterior means) of up to ``limit`` pictures."""
    vae.eval()
    n = min(limit, len(dataset))
    latents = [vae.encode(torch.stack([dataset[i]["pixel_values"] for i in range(s, min(n, s + batch))])
                          .to(vae.device, vae.dtype)).latent_dist.mean.float() for s in range(0, n, batch)]
    return float(1.0 / torch.cat(latents).std())


def main(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output_dir)
    accelerator = start_run(args)
    dataset = TaggedImages(args.data, None if args.split == "none" else args.split, args.resolution, seed=args.seed)
    vae = build_vae(args)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} is not a multiple of the VAE's downsampling {factor}")
    signature = {"vae": json.loads(json.dumps(dict(vae.config), default=list)),
                 "train_batch_size": args.train_batch_size, "num_processes": accelerator.num_processes,
                 "gradient_accumulation_steps": args.gradient_accumulation_steps}
    model = VAELoss(vae, args.kl_weight, args.color_loss_weight, args.face_loss_weight, args.decoder_only,
                    args.decode_mode)
    model, optimizer, lr_scheduler = prepare_optimisation(accelerator, args, model)
    model.train()

    def loss_fn(batch):
        return model(batch["pixel_values"].to(accelerator.device), batch["face_mask"].to(accelerator.device))

    trainer = Trainer(accelerator, trainer_config(args), dataset, collate_images, [model], optimizer, lr_scheduler,
                      loss_fn, signature)
    start = trainer.resume(args.resume_from_checkpoint)
    logger.info("training the VAE on %d pictures from step %d to %d", len(dataset), start, args.max_train_steps)
    state = trainer.train()
    result: dict[str, Any] = {"global_step": state.global_step, "output_dir": str(out)}
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model).vae
        # the decoder alone trained: the latents, and the scale the diffusion model was trained with, are unchanged
        scale = vae.config.scaling_factor if args.decoder_only else latent_scale(vae, dataset)
        vae.register_to_config(scaling_factor=scale)
        vae.save_pretrained(out / "vae")
        result["scaling_factor"] = scale
    accelerator.wait_for_everyone()
    return result


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        logger.error("%s", e)
        sys.exit(f"error: {e}")
