"""Train Semantica with Accelerate (seed 004, Sec. 3.4, 5 and App. C).

    accelerate launch -m training.train_semantica --pretrained PATH_OR_HUB_ID --image-encoder PATH_OR_HUB_ID \\
        --data DIR --output-dir OUT --conditioning tokens --resolution 256 --max-train-steps 10000

- Base components (VAE, noise scheduler, and the UNet to start from) from a diffusers Stable
  Diffusion folder or Hub id; the UNet keeps its ``cross_attention_dim`` and the conditioner
  projects the encoder's tokens to it (``pipelines.semantica``).
- The frozen image encoder (``--image-encoder``): a DINOv2 or CLIP folder or Hub id.
- Data (``training.data.pairs``): pairs of different pictures of one group, kept when the
  encoder's global-token cosine similarity is in [``--min-similarity``, ``--max-similarity``]
  (0.3 and 0.9, App. C); the UNet denoises one picture of a pair while it reads the other.
- Loss: MSE on epsilon or v, as the scheduler predicts. The conditioning of a sample is replaced
  by the unconditional one with probability ``--conditioning-dropout`` (0.1), for guidance.
- What trains: the whole UNet and the conditioner; the VAE and the encoder are frozen.
- Checkpoints, exact resume and ``metrics.jsonl``: ``training.core``. At the end the whole
  pipeline is saved to ``OUT/semantica`` (``SemanticaPipeline.from_pretrained`` loads it).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.schedulers import SchedulerMixin
from PIL import Image

from pipelines.components import load_vae
from pipelines.semantica import (
    CONDITIONINGS,
    SemanticaConditioner,
    SemanticaPipeline,
    encode_images,
    load_image_encoder,
    prepare_unet,
)
from pipelines.semantica.model import UNCONDITIONALS
from training.core import (
    Trainer,
    TrainerConfig,
    add_ema_arguments,
    check_ema_arguments,
    ema_decay,
    make_accelerator,
    read_metrics,
)
from training.data.pairs import PairDataset, make_pair_dataset, open_picture
from training.data.retribooru import collate

logger = logging.getLogger("train_semantica")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="accelerate launch -m training.train_semantica",
                                description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("models")
    g.add_argument("--pretrained", required=True,
                   help="diffusers Stable Diffusion folder or Hub id: the VAE, the noise scheduler and the UNet to start from")
    g.add_argument("--revision", default=None, help="Hub revision of --pretrained")
    g.add_argument("--image-encoder", required=True, help="frozen encoder: a DINOv2 or CLIP folder or Hub id")
    g.add_argument("--conditioning", choices=CONDITIONINGS, default="tokens",
                   help="tokens: cross-attention to the patch tokens; global: the CLS token via the time embedding")
    g.add_argument("--include-cls", action=argparse.BooleanOptionalAction, default=True,
                   help="tokens: cross-attend to the CLS token too")
    g.add_argument("--unconditional", choices=UNCONDITIONALS, default="learned",
                   help="the dropped conditioning: a learned token or zeros")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="a RetriBooru-style folder, or a folder of group/picture files")
    g.add_argument("--split", default="train", help="split to train on ('none': every picture)")
    g.add_argument("--resolution", type=int, default=256)
    g.add_argument("--min-similarity", type=float, default=0.3, help="pairs less similar are dropped (App. C)")
    g.add_argument("--max-similarity", type=float, default=0.9, help="pairs more similar are dropped (App. C)")
    g.add_argument("--embedding-batch-size", type=int, default=32, help="pictures per encoder call for the filter")
    g.add_argument("--dataloader-num-workers", type=int, default=0)
    g = p.add_argument_group("objective")
    g.add_argument("--conditioning-dropout", type=float, default=0.1,
                   help="probability of training a sample unconditionally (for guidance)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning-rate", type=float, default=1e-5)
    g.add_argument("--lr-scheduler", default="constant", choices=("constant", "constant_with_warmup", "cosine", "linear"))
    g.add_argument("--lr-warmup-steps", type=int, default=0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.99, help="0.99 as in seed 004, Sec. 6.1")
    g.add_argument("--adam-weight-decay", type=float, default=1e-2)
    g.add_argument("--adam-epsilon", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--train-batch-size", type=int, default=4, help="per process")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--max-train-steps", type=int, default=10000)
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: what `accelerate config` says")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    add_ema_arguments(g)
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", required=True)
    g.add_argument("--checkpointing-steps", type=int, default=500)
    g.add_argument("--checkpoints-total-limit", type=int, default=None)
    g.add_argument("--resume-from-checkpoint", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--logging-steps", type=int, default=1)
    g.add_argument("--report-to", choices=("none", "tensorboard", "all"), default="none")
    g.add_argument("--validation-steps", type=int, default=None, help="validation pictures every so many steps")
    g.add_argument("--num-validation-images", type=int, default=4)
    g.add_argument("--validation-inference-steps", type=int, default=20)
    g.add_argument("--validation-guidance-scale", type=float, default=0.5)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    check_ema_arguments(p, args)
    for name in ("resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                 "checkpointing_steps", "logging_steps", "embedding_batch_size", "num_validation_images",
                 "validation_inference_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.validation_steps is not None and args.validation_steps < 1:
        p.error("--validation-steps must be at least 1")
    if not 0 <= args.conditioning_dropout <= 1:
        p.error("--conditioning-dropout must be between 0 and 1")
    if not -1 <= args.min_similarity <= args.max_similarity <= 1:
        p.error("--min-similarity and --max-similarity must satisfy -1 <= min <= max <= 1")
    if args.validation_guidance_scale < 0:
        p.error("--validation-guidance-scale must not be negative")
    return args


# ---------------------------------------------------------------------- pieces

def load_base(pretrained: str, conditioning: str, revision: str | None = None):
    """VAE, UNet (prepared for ``conditioning``) and training noise scheduler of a diffusers model."""
    kw = {"revision": revision} if revision else {}
    try:
        vae = load_vae(pretrained, subfolder="vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the base model from {pretrained}: {e}") from e
    return vae, prepare_unet(unet, conditioning), noise_scheduler


class SemanticaObjective:
    """One training step's loss for a batch of ``PairDataset`` samples (seed 004, Eq. 3)."""

    def __init__(self, args, accelerator: Accelerator, vae, image_encoder, unet, conditioner,
                 noise_scheduler: SchedulerMixin, weight_dtype: torch.dtype):
        self.args, self.acc = args, accelerator
        self.vae, self.image_encoder, self.unet, self.conditioner = vae, image_encoder, unet, conditioner
        self.noise_scheduler, self.weight_dtype = noise_scheduler, weight_dtype
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type {self.prediction_type!r} is not supported (epsilon, v_prediction)")

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        device = self.acc.device
        pixels = batch["pixel_values"].to(device, self.weight_dtype)  # (B, 3, R, R)
        b = pixels.shape[0]
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor  # (B, 4, r, r)
            tokens, pooled = encode_images(self.image_encoder, batch["condition_pixel_values"])  # (B, T, D), (B, D)
        drop = torch.rand(b, device=device) < self.args.conditioning_dropout  # (B,)
        ehs, labels = self.conditioner(tokens.float(), pooled.float(), drop)
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), device=device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=ehs, class_labels=labels).sample
        return F.mse_loss(pred.float(), target.float())


def make_pipeline(accelerator, vae, unet, noise_scheduler, image_encoder, processor, conditioner) -> SemanticaPipeline:
    """The pipeline of the models being trained, with a DDIM scheduler of the training schedule."""
    pipe = SemanticaPipeline(unet=accelerator.unwrap_model(unet), vae=vae,
                             scheduler=DDIMScheduler.from_config(noise_scheduler.config), image_encoder=image_encoder,
                             feature_extractor=processor, conditioner=accelerator.unwrap_model(conditioner))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_validation(args, accelerator, dataset: PairDataset, pipe_factory):
    """Variations of one fixed picture of the pairs, saved as a grid every ``--validation-steps``."""
    condition = open_picture(dataset.pictures[dataset.targets[0]].path)
    out = Path(args.output_dir) / "validation"

    def validate(step: int) -> None:
        if not accelerator.is_main_process:
            return
        pipe = pipe_factory()
        was_training = [m.training for m in (pipe.unet, pipe.conditioner)]
        pipe.unet.eval()
        pipe.conditioner.eval()
        try:
            images = pipe(condition, num_images_per_prompt=args.num_validation_images,
                          guidance_scale=args.validation_guidance_scale, height=args.resolution, width=args.resolution,
                          num_inference_steps=args.validation_inference_steps,
                          generator=torch.Generator().manual_seed(args.seed)).images
        finally:
            for m, w in zip((pipe.unet, pipe.conditioner), was_training):
                m.train(w)
        s = args.resolution
        grid = Image.new("RGB", (s * (1 + len(images)), s), "white")
        for i, im in enumerate([condition, *images]):
            grid.paste(im.resize((s, s)), (i * s, 0))
        out.mkdir(parents=True, exist_ok=True)
        grid.save(out / f"step-{step:06d}.png")

    return validate


def model_card(args, report: dict[str, Any], final_loss: float | None) -> str:
    return f"""---
library_name: diffusers
tags: [semantica, image-variations, stable-diffusion]
base_model: {args.pretrained}
---
# Semantica

A Semantica pipeline (seed 004) trained on pairs of `{args.data}` for {args.max_train_steps} steps: frozen
encoder `{args.image_encoder}`, conditioning `{args.conditioning}`, resolution {args.resolution}, conditioning
dropout {args.conditioning_dropout}. Pairs: {report['kept_pairs']} kept of {report['candidate_pairs']}
({report['below_min_similarity']} below {args.min_similarity}, {report['above_max_similarity']} above
{args.max_similarity}, {report['unreadable']} unreadable). Final logged loss:
{final_loss if final_loss is not None else 'n/a'}.

Load it with `SemanticaPipeline.from_pretrained(folder / "semantica")`.

Command line:

```
accelerate launch -m training.train_semantica {shlex.join(args.argv)}
```
"""


# ---------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output_dir)
    accelerator = make_accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.report_to in ("tensorboard", "all"):
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
    set_seed(args.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # the encoder and the pairs first: a bad folder fails before the diffusion model is loaded;
    # the main process embeds the pictures (and caches them), the others read its cache
    image_encoder, processor = load_image_encoder(args.image_encoder)
    image_encoder.to(accelerator.device, dtype=weight_dtype)
    split = None if args.split == "none" else args.split
    with accelerator.main_process_first():
        dataset, report = make_pair_dataset(args.data, split, image_encoder, processor, args.resolution,
                                            args.min_similarity, args.max_similarity, cache_dir=out,
                                            batch_size=args.embedding_batch_size, seed=args.seed)

    vae, unet, noise_scheduler = load_base(args.pretrained, args.conditioning, args.revision)
    conditioner = SemanticaConditioner.from_models(image_encoder, unet, conditioning=args.conditioning,
                                                   include_cls=args.include_cls, unconditional=args.unconditional)
    vae.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    vae.to(accelerator.device, dtype=weight_dtype)

    trainable = [m for m in (unet, conditioner) if any(p.requires_grad for p in m.parameters())]
    params = [p for m in trainable for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # Accelerate steps a prepared scheduler once per process per optimiser step: count in those
    n = accelerator.num_processes
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * n,
                                 num_training_steps=args.max_train_steps * n)
    *prepared, optimizer, lr_scheduler = accelerator.prepare(*trainable, optimizer, lr_scheduler)
    models = dict(zip([id(m) for m in trainable], prepared))
    unet, conditioner = models.get(id(unet), unet), models.get(id(conditioner), conditioner)
    conditioner.to(accelerator.device)
    unet.train()
    conditioner.train()

    signature = {"conditioner": dict(accelerator.unwrap_model(conditioner).config),
                 "unet_blocks": list(accelerator.unwrap_model(unet).config.block_out_channels),
                 "pairs": report["kept_pairs"], "targets": report["targets"],
                 "train_batch_size": args.train_batch_size,
                 "gradient_accumulation_steps": args.gradient_accumulation_steps,
                 "num_processes": accelerator.num_processes}
    signature = json.loads(json.dumps(signature, default=list))
    objective = SemanticaObjective(args, accelerator, vae, image_encoder, unet, conditioner, noise_scheduler,
                                   weight_dtype)

    def pipe_factory() -> SemanticaPipeline:
        return make_pipeline(accelerator, vae, unet, noise_scheduler, image_encoder, processor, conditioner)

    validate = make_validation(args, accelerator, dataset, pipe_factory) if args.validation_steps else None
    config = TrainerConfig(
        output_dir=str(out), max_train_steps=args.max_train_steps, batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit, logging_steps=args.logging_steps,
        validation_steps=args.validation_steps, seed=args.seed, num_workers=args.dataloader_num_workers,
        max_grad_norm=args.max_grad_norm, ema_decay=ema_decay(args))
    trainer = Trainer(accelerator, config, dataset, collate, prepared, optimizer, lr_scheduler, objective, signature,
                      validate)
    start = trainer.resume(args.resume_from_checkpoint)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("semantica", config={k: v for k, v in vars(args).items() if k != "argv"})
    logger.info("training %d targets (%d pairs) from step %d to %d on %d process(es)", len(dataset),
                report["kept_pairs"], start, args.max_train_steps, accelerator.num_processes)
    state = trainer.train()

    result: dict[str, Any] = {"global_step": state.global_step, "output_dir": str(out), "pairs": report}
    if accelerator.is_main_process:
        pipe = pipe_factory()
        pipe.vae.to(dtype=torch.float32)
        pipe.image_encoder.to(dtype=torch.float32)
        pipe.save_pretrained(out / "semantica")
        result["pipeline"] = str(out / "semantica")
        metrics = read_metrics(out / "metrics.jsonl")
        final = metrics[-1]["loss"] if metrics else None
        (out / "README.md").write_text(model_card(args, report, final), encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        logger.error("%s", e)
        sys.exit(f"error: {e}")
