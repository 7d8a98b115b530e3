"""Train RetriNet with Accelerate (seed 001, Sec. 5.1 and 5.2; seed 002, A.4).

    accelerate launch -m training.train_retrinet --pretrained PATH_OR_HUB_ID --data DIR --output-dir OUT \\
        --task compose --setting b --num-references 4 --resolution 256 --max-train-steps 9000

- Base components (VAE, text encoder, tokenizer, UNet, noise scheduler) from a diffusers folder or
  Hub id; RetriNet from ``RetriNetModel.from_unet`` or ``--retrinet`` (a saved one). A second run
  continues a first one's models with ``--retrinet OUT/retrinet --unet OUT/unet`` (the UNet whose
  decoder it trained), on its own schedule.
- Data: ``training.data.retribooru`` (tasks recon / compose / multitask, settings a / b).
- Loss (seed 001, Eq. 3): MSE(eps * M_valid, pred * M_valid) + lambda * MSE(eps * M_face,
  pred * M_face), on epsilon or v as the scheduler predicts; both masks are brought to the latent
  size; lambda = ``--face-loss-weight`` (0.1, seed 002 A.4). ``--timestep-weighting min-snr`` or
  ``p2`` weights each sample by its timestep (the default, ``uniform``, is Eq. 3 as written).
  ``--multires-noise-discount`` trains on multi-resolution noise (``training.core.pyramid_noise``).
- The prompt is dropped (replaced by "") with probability ``--prompt-dropout`` (0.5); the
  references are always kept, as at inference with classifier-free guidance. ``--prompt-tags
  neutral`` leaves the hair, eyes and clothes words out of every prompt (the identity can then
  only come from the references). ``--cache-latents`` encodes each target and (setting b) each
  reference concept once (``training.latents``).
- What trains: ``--lock none`` (retrieval encoder, cross-attentions, zero convolutions and the
  base decoder), ``decoder`` (the UNet frozen), ``both`` (UNet and retrieval encoder frozen).
- AdamW at 1e-4, cosine schedule restarted every ``--restart-steps`` (9000) without decay.
- Checkpoints, exact resume and ``metrics.jsonl``: ``training.core``.
- Every ``--validation-steps``: pictures from fixed test references (``validation/step-*.png``) and
  the reference gap (``reference_gap``: how much of the loss a sample's own references explain
  against another sample's), appended to ``validation/reference_gap.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers import SchedulerMixin
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from pipelines.components import load_vae
from pipelines.concepts import CONCEPTS
from pipelines.retrinet import Reference, RetriNetModel, RetriNetPipeline, embed_texts, embed_words
from training.core import (WEIGHTINGS, MetricsLog, Trainer, TrainerConfig, add_ema_arguments, check_ema_arguments,
                           ema_decay, make_accelerator, pyramid_noise, read_metrics, timestep_weights,
                           unweighted_last_step)
from training.data.retribooru import PROMPT_TAGS, RetriBooruDataset, collate
from training.latents import LatentCache

logger = logging.getLogger("train_retrinet")
LOCKS = {"none": "default", "decoder": "lock_decoder", "both": "lock_both"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="accelerate launch -m training.train_retrinet", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("models")
    g.add_argument("--pretrained", required=True, help="diffusers folder or Hub id of a Stable Diffusion model")
    g.add_argument("--revision", default=None, help="Hub revision of --pretrained")
    g.add_argument("--retrinet", default=None, help="continue from a saved RetriNet folder instead of from_unet")
    g.add_argument("--unet", default=None,
                   help="a saved UNet2DConditionModel folder to use instead of --pretrained's (with --retrinet: the "
                        "UNet whose decoder an earlier run trained, its OUT/unet)")
    g.add_argument("--retrieval-attention-heads", type=int, default=8)
    g.add_argument("--max-references", type=int, default=8)
    g.add_argument("--retrieval-positions", action="store_true",
                   help="a new RetriNet adds a 2D position embedding to its cross-attentions' queries and keys (not "
                        "in the seeds' code; RetriNetModel's retrieval_positions)")
    g.add_argument("--retrieval-max-keys", type=int, default=None,
                   help="a new RetriNet average-pools each reference's features to at most this many places per "
                        "skip before attending to them (PixArt-Sigma's key compression; not in the seeds' code; "
                        "RetriNetModel's retrieval_max_keys): the largest skips' cross-attention costs 4 times "
                        "less per halving")
    g.add_argument("--retrieval-regions", action="store_true",
                   help="with --retrieval-positions: a new RetriNet places each reference's keys where the reference "
                        "was cut from in its own picture (a face crop's where the head is), not over the whole frame "
                        "(not in the seeds' code; RetriNetModel's retrieval_regions)")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="a RetriBooru-style folder (annotations.jsonl, images/, masks/)")
    g.add_argument("--split", default="train", help="split to train on ('none': every record)")
    g.add_argument("--task", choices=("recon", "compose", "multitask"), default="multitask")
    g.add_argument("--setting", choices=("a", "b"), default="b", help="b: other pictures of the cluster; a: the target augmented")
    g.add_argument("--num-references", type=int, default=4)
    g.add_argument("--resolution", type=int, default=256)
    g.add_argument("--dataloader-num-workers", type=int, default=0)
    g = p.add_argument_group("objective")
    g.add_argument("--face-loss-weight", type=float, default=0.1, help="lambda of seed 001, Eq. 3")
    g.add_argument("--timestep-weighting", choices=WEIGHTINGS, default="uniform",
                   help="uniform: Eq. 3 as written; min-snr (--snr-gamma) or p2: weight each sample by its timestep "
                        "(training.core.timestep_weights)")
    g.add_argument("--snr-gamma", type=float, default=5.0, help="gamma of --timestep-weighting min-snr")
    g.add_argument("--multires-noise-discount", type=float, default=0.0,
                   help="train on multi-resolution noise with this discount (training.core.pyramid_noise; 0: white "
                        "noise): the colours of the noisy target's large blobs stay legible to the last timestep "
                        "under white noise, and a model that reads them there has no need of its references")
    g.add_argument("--prompt-dropout", type=float, default=0.5, help="probability of training without the prompt")
    g.add_argument("--prompt-tags", choices=PROMPT_TAGS, default="all",
                   help="all: the target's tags; neutral: without hair, eyes and clothes words, so the identity "
                        "can only come from the references (what the demo report asks of the model)")
    g.add_argument("--cache-latents", action="store_true",
                   help="keep the VAE posterior of every target and (setting b) every reference concept after its "
                        "first encoding (training.latents); a resumed run then equals an uninterrupted one up to "
                        "rounding, not to the last bit")
    g.add_argument("--lock", choices=tuple(LOCKS), default="none", help="none | decoder | both (seed 001, Table 3)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning-rate", type=float, default=1e-4)
    g.add_argument("--restart-steps", type=int, default=9000, help="cosine restarts every so many steps")
    g.add_argument("--lr-warmup-steps", type=int, default=0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-weight-decay", type=float, default=1e-2)
    g.add_argument("--adam-epsilon", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--train-batch-size", type=int, default=1, help="per process")
    g.add_argument("--gradient-accumulation-steps", type=int, default=8)
    g.add_argument("--max-train-steps", type=int, default=9000)
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
    g.add_argument("--validation-steps", type=int, default=None, help="validation pictures and the reference gap every so many steps")
    g.add_argument("--num-validation-images", type=int, default=2)
    g.add_argument("--validation-inference-steps", type=int, default=20)
    g.add_argument("--push-to-hub", action="store_true")
    g.add_argument("--hub-model-id", default=None)
    g.add_argument("--hub-token", default=None)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    check_ema_arguments(p, args)
    for name in ("num_references", "resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                 "checkpointing_steps", "restart_steps", "logging_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.retrieval_max_keys is not None and args.retrieval_max_keys < 1:
        p.error("--retrieval-max-keys must be at least 1")
    if args.retrieval_regions and not args.retrieval_positions:
        p.error("--retrieval-regions places the position embeddings of --retrieval-positions: give both")
    if not 0 <= args.prompt_dropout <= 1:
        p.error("--prompt-dropout must be between 0 and 1")
    if args.face_loss_weight < 0:
        p.error("--face-loss-weight must not be negative")
    if not 0 <= args.multires_noise_discount < 1:
        p.error("--multires-noise-discount must lie in [0, 1)")
    if args.timestep_weighting == "min-snr" and args.snr_gamma <= 0:
        p.error("--snr-gamma must be positive with --timestep-weighting min-snr")
    if args.num_references > args.max_references:
        p.error(f"--num-references {args.num_references} exceeds --max-references {args.max_references}")
    return args


# ---------------------------------------------------------------------- pieces

def load_base(pretrained: str, revision: str | None = None, unet: str | None = None):
    """VAE, text encoder, tokenizer, UNet and the training noise scheduler of a diffusers model;
    ``unet``: a UNet folder to take instead of the model's (an earlier run's ``OUT/unet``)."""
    kw = {"revision": revision} if revision else {}
    try:
        vae = load_vae(pretrained, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **kw)
        if unet is None:
            unet_model = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **kw)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the base model from {pretrained}: {e}") from e
    if unet is not None:
        try:
            unet_model = UNet2DConditionModel.from_pretrained(unet)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the UNet {unet}: {e}") from e
        if unet_model.config.cross_attention_dim != text_encoder.config.hidden_size:
            raise ValueError(f"the UNet in {unet} reads {unet_model.config.cross_attention_dim}-wide text embeddings, "
                             f"the text encoder of {pretrained} makes {text_encoder.config.hidden_size}")
    return vae, text_encoder, tokenizer, unet_model, noise_scheduler


def cosine_restarts(optimizer, restart_steps: int, warmup_steps: int = 0):
    """Cosine from the learning rate to 0, restarted every ``restart_steps`` (seed 002, A.4)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        phase = ((step - warmup_steps) % restart_steps) / restart_steps
        return 0.5 * (1.0 + math.cos(math.pi * phase))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_latent_mask(mask: torch.Tensor, size: tuple[int, int], cover: bool) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) at latent size: a latent pixel is in the mask if any (``cover``)
    or most of its pixels are."""
    area = F.interpolate(mask, size=size, mode="area")
    return (area > 0).to(mask.dtype) if cover else (area >= 0.5).to(mask.dtype)


def retrinet_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, face: torch.Tensor,
                  face_weight: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Seed 001, Eq. 3: L(eps M_tgt, pred M_tgt) + lambda L(eps M_face, pred M_face), L = MSE;
    with ``weights`` (B,), each sample's share is weighted (``training.core.timestep_weights``)."""
    if weights is None:
        pred, target = pred.float(), target.float()
        return F.mse_loss(pred * valid, target * valid) + face_weight * F.mse_loss(pred * face, target * face)
    err = (pred.float() - target.float()) ** 2
    per_sample = (err * valid).mean(dim=(1, 2, 3)) + face_weight * (err * face).mean(dim=(1, 2, 3))
    return (per_sample * weights.to(per_sample.device)).mean()


class RetriNetObjective:
    """One training step's loss for a batch of ``RetriBooruDataset`` samples."""

    def __init__(self, args, accelerator: Accelerator, vae, text_encoder, tokenizer, unet, retrinet,
                 noise_scheduler: SchedulerMixin, weight_dtype: torch.dtype):
        self.args, self.acc = args, accelerator
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.unet, self.retrinet, self.noise_scheduler = unet, retrinet, noise_scheduler
        self.weight_dtype = weight_dtype
        # a target, and a reference under setting b (another picture cut to a concept), is the same picture
        # every time it is drawn; under setting a references are augmented anew each time
        self.cache = LatentCache(vae) if args.cache_latents else None
        self.cache_references = self.cache is not None and args.setting == "b"
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type {self.prediction_type!r} is not supported (epsilon, v_prediction)")
        with torch.no_grad():
            self.concept_table = dict(zip(CONCEPTS, embed_texts(tokenizer, text_encoder, CONCEPTS,
                                                               accelerator.device)))  # word -> (L, D)

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        device, sf = self.acc.device, self.vae.config.scaling_factor
        pixels = batch["pixel_values"].to(device, self.weight_dtype)  # (B, 3, R, R)
        b = pixels.shape[0]
        refs = batch["reference_pixel_values"]  # (B, N, 3, R, R)
        n = refs.shape[1]
        with torch.no_grad():
            if self.cache is not None:
                latents = self.cache.sample([("target", i) for i in batch["id"]], pixels) * sf
            else:
                latents = self.vae.encode(pixels).latent_dist.sample() * sf  # (B, 4, r, r)
            ref_pixels = refs.flatten(0, 1).to(device, self.weight_dtype)
            if self.cache_references:
                keys = [("reference", i, c) for ids, cs in zip(batch["reference_ids"], batch["concepts"])
                        for i, c in zip(ids, cs)]
                ref_latents = self.cache.mode(keys, ref_pixels) * sf
            else:
                ref_latents = self.vae.encode(ref_pixels).latent_dist.mode() * sf
            keep = torch.rand(b) >= self.args.prompt_dropout  # prompt dropout, references kept
            prompts = [p if k else "" for p, k in zip(batch["prompt"], keep.tolist())]
            ehs = embed_texts(self.tokenizer, self.text_encoder, prompts, device)  # (B, L, D)
            concept_embeds = torch.stack([self.concept_table[c] for cs in batch["concepts"] for c in cs])  # (B*N, L, D)
        if self.args.multires_noise_discount > 0:
            noise = pyramid_noise(tuple(latents.shape), self.args.multires_noise_discount, device=latents.device,
                                  dtype=latents.dtype)
        else:
            noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)  # whatever the layout
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), device=device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        pred = self.retrinet(ref_latents, t, concept_embeds, n, unet=self.unet, sample=noisy,
                             encoder_hidden_states=ehs, reference_regions=_regions(batch, device))
        size = latents.shape[-2:]
        valid = to_latent_mask(batch["valid_mask"].to(device), size, cover=False)
        face = to_latent_mask(batch["face_mask"].to(device), size, cover=True)
        weights = None if self.args.timestep_weighting == "uniform" else \
            timestep_weights(self.noise_scheduler, t, self.args.timestep_weighting, self.args.snr_gamma)
        return retrinet_loss(pred, target, valid, face, self.args.face_loss_weight, weights)


def _regions(batch: dict[str, Any], device) -> torch.Tensor | None:
    """The batch's reference regions (B * N, 4), if it has them (``RetriBooruDataset`` does)."""
    regions = batch.get("reference_regions")
    return None if regions is None else regions.flatten(0, 1).to(device)


GAP_FRACTIONS = (0.3, 0.5, 0.7, 0.9)  # the reference gap's timesteps, as fractions of the training schedule


def gap_timesteps(noise_scheduler: SchedulerMixin) -> tuple[int, ...]:
    """The reference gap's timesteps for ``noise_scheduler``: 300, 500, 700, 900 of SD's 1000."""
    horizon = noise_scheduler.config.num_train_timesteps
    return tuple(min(horizon - 1, int(f * horizon)) for f in GAP_FRACTIONS)


def relative_gap(own: list[float], other: list[float]) -> float:
    """The mean over timesteps of 1 - own / other (a timestep where ``other`` is 0 counts 0)."""
    return sum(1.0 - o / x if x else 0.0 for o, x in zip(own, other)) / len(own)


@torch.no_grad()
def reference_gap(vae, text_encoder, tokenizer, unet, retrinet, noise_scheduler: SchedulerMixin,
                  batch: dict[str, Any], timesteps: tuple[int, ...] | None = None, face_loss_weight: float = 0.1,
                  seed: int = 0, chunk_size: int | None = None) -> dict[str, Any]:
    """Does the model read its references? The training loss (prompt "", Eq. 3) of a collated
    ``RetriBooruDataset`` batch at fixed ``timesteps`` (default ``gap_timesteps``), with the same
    noise under three conditions:

    - ``own``: each sample's own references;
    - ``other``: the references of the previous sample in the batch (the last sample's for the
      first), with their concept words;
    - ``none``: no references (retrieval scale 0, the base model with RetriNet's decoder).

    ``gap`` = the mean over the timesteps of 1 - own / other: the share of the loss that a sample's
    own references explain. Each timestep counts the same, so the high-noise ones, where a
    picture's colours and layout are decided and the loss is small, are not drowned. The gap is 0
    when the model uses the retrieval path only generically (``own`` = ``other`` < ``none``) and
    grows as it learns to copy what it is shown, long before its pictures show it (seed 001 trains
    9000 steps of batch 64). The batch needs at least two samples, and neighbours should show
    different characters (``gap_batch`` spreads them over a split). ``chunk_size`` samples go
    through the models at a time (default: all).
    """
    pixels, refs = batch["pixel_values"], batch["reference_pixel_values"]
    b, n = refs.shape[:2]
    if b < 2:
        raise ValueError(f"the reference gap needs at least 2 samples, got {b}")
    horizon = noise_scheduler.config.num_train_timesteps
    timesteps = gap_timesteps(noise_scheduler) if timesteps is None else tuple(timesteps)
    if not timesteps:
        raise ValueError("no timesteps given")
    if any(not 0 <= int(t) < horizon for t in timesteps):
        raise ValueError(f"timesteps {timesteps} must lie in 0..{horizon - 1}")
    prediction = noise_scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction type {prediction!r} is not supported (epsilon, v_prediction)")
    chunk = b if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    device, dtype = unet.device, unet.dtype
    sf = vae.config.scaling_factor

    def encode(x: torch.Tensor) -> torch.Tensor:
        # in mixed-precision training the frozen VAE and text encoder may be in half precision, the trained UNet not
        return torch.cat([vae.encode(x[i:i + chunk * n].to(device, vae.dtype)).latent_dist.mode().to(dtype) * sf
                          for i in range(0, x.shape[0], chunk * n)])

    latents = encode(pixels)
    ref_latents = encode(refs.flatten(0, 1)).view(b, n, *latents.shape[1:])
    words = [w for cs in batch["concepts"] for w in cs]
    concepts = embed_words(tokenizer, text_encoder, words, device).to(dtype)
    concepts = concepts.view(b, n, *concepts.shape[1:])  # (B, N, L, D)
    regions = _regions(batch, device)
    regions = None if regions is None else regions.view(b, n, 4)
    roll = (lambda x: None) if regions is None else (lambda x: x.roll(1, 0))
    conditions = {"own": (ref_latents, concepts, 1.0, regions),
                  "other": (ref_latents.roll(1, 0), concepts.roll(1, 0), 1.0, roll(regions)),  # sample i gets i - 1's
                  "none": (ref_latents, concepts, 0.0, regions)}
    empty = embed_texts(tokenizer, text_encoder, [""], device).to(dtype)
    size = latents.shape[-2:]
    valid = to_latent_mask(batch["valid_mask"].to(device), size, cover=False)
    face = to_latent_mask(batch["face_mask"].to(device), size, cover=True)
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"samples": b, "timesteps": [int(t) for t in timesteps], **{k: [] for k in conditions}}
    for tv in timesteps:
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        sums = dict.fromkeys(conditions, 0.0)
        for s in range(0, b, chunk):
            e = slice(s, min(b, s + chunk))
            rows = e.stop - e.start
            t = torch.full((rows,), int(tv), device=device, dtype=torch.long)
            noisy = noise_scheduler.add_noise(latents[e], noise[e], t)
            target = noise[e] if prediction == "epsilon" else noise_scheduler.get_velocity(latents[e], noise[e], t)
            for name, (lat, embeds, scale, where) in conditions.items():
                pred = retrinet(lat[e].flatten(0, 1), t, embeds[e].flatten(0, 1), n, unet=unet, sample=noisy,
                                encoder_hidden_states=empty.expand(rows, -1, -1), retrieval_scale=scale,
                                reference_regions=None if where is None else where[e].flatten(0, 1))
                sums[name] += retrinet_loss(pred, target, valid[e], face[e], face_loss_weight).item() * rows
        for name in conditions:
            out[name].append(sums[name] / b)
    out["gap"] = relative_gap(out["own"], out["other"])
    return out


# ---------------------------------------------------------------------- validation and outputs

def validation_dataset(data: str, split: str | None, args) -> RetriBooruDataset:
    """The test split (or ``split``) as the validation reads it: fixed seed, setting -b."""
    for sp in ("test", split):
        try:
            return RetriBooruDataset(data, sp, task="compose" if args.task != "recon" else "recon", setting="b",
                                     num_references=args.num_references, resolution=args.resolution, seed=1234,
                                     prompt_tags=args.prompt_tags)
        except ValueError:
            continue
    raise ValueError(f"{data} has no sample to take validation references from")


def validation_references(ds: RetriBooruDataset) -> tuple[str, list[Reference]]:
    """Fixed references (and the prompt of their target) from the first sample of ``validation_dataset``."""
    s = ds[0]
    refs = [Reference(Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()), c)
            for x, c in zip(s["reference_pixel_values"], s["concepts"])]
    return s["prompt"], refs


GAP_SAMPLES = 16
GAP_LOG = "reference_gap.jsonl"  # in the run's validation/ folder, one line per validation


def gap_batch(ds: RetriBooruDataset, samples: int = GAP_SAMPLES) -> dict[str, Any] | None:
    """A fixed batch for ``reference_gap``: ``samples`` samples spread evenly over ``ds`` (None if it
    has fewer than two), so that neighbours are far apart in the split and mostly other characters."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if len(ds) < 2:
        return None
    k = min(samples, len(ds))
    return collate([ds[round(i * (len(ds) - 1) / max(1, k - 1))] for i in range(k)])


def make_validation(args, accelerator, vae, text_encoder, tokenizer, unet, retrinet, weight_dtype):
    split = None if args.split == "none" else args.split
    ds = validation_dataset(args.data, split, args)
    prompt, refs = validation_references(ds)
    batch = gap_batch(ds)
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained, subfolder="scheduler", revision=args.revision)
    out = Path(args.output_dir) / "validation"

    def validate(step: int) -> None:
        if not accelerator.is_main_process:
            return
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_pretrained(args.pretrained, subfolder="scheduler", revision=args.revision)
        pipe = RetriNetPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                unet=accelerator.unwrap_model(unet), retrinet=accelerator.unwrap_model(retrinet),
                                scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        was_training = [m.training for m in (pipe.unet, pipe.retrinet)]
        pipe.unet.eval()
        pipe.retrinet.eval()
        try:
            images = pipe(prompt, refs, num_images_per_prompt=args.num_validation_images, height=args.resolution,
                          width=args.resolution, num_inference_steps=args.validation_inference_steps,
                          generator=torch.Generator().manual_seed(args.seed)).images
            gap = None if batch is None else reference_gap(
                vae, text_encoder, tokenizer, pipe.unet, pipe.retrinet, noise_scheduler, batch,
                face_loss_weight=args.face_loss_weight, seed=args.seed, chunk_size=args.train_batch_size)
        finally:
            for m, w in zip((pipe.unet, pipe.retrinet), was_training):
                m.train(w)
        out.mkdir(parents=True, exist_ok=True)
        if gap is not None:
            logger.info("step %d: reference gap %.4f (own %s, other %s)", step, gap["gap"],
                        [round(x, 4) for x in gap["own"]], [round(x, 4) for x in gap["other"]])
            MetricsLog(out / GAP_LOG, True).write({"step": step, **gap})
        tiles = [r.image for r in refs] + list(images)
        s = args.resolution
        grid = Image.new("RGB", (s * max(len(refs), len(images)), 2 * s), "white")
        for i, im in enumerate(tiles):
            row, col = (0, i) if i < len(refs) else (1, i - len(refs))
            grid.paste(im.resize((s, s)), (col * s, row * s))
        grid.save(out / f"step-{step:06d}.png")
        (out / "prompt.txt").write_text(prompt + "\n" + ", ".join(r.concept for r in refs) + "\n")

    return validate


def model_card(args, final_loss: float | None) -> str:
    return f"""---
library_name: diffusers
tags: [retrinet, subject-driven-generation, stable-diffusion]
base_model: {args.pretrained}
---
# RetriNet

RetriNet (retrieval encoder, ControlCrossAttention and zero convolutions) trained on `{args.data}`
for {args.max_train_steps} steps: task `{args.task}`, setting `{args.setting}`, {args.num_references}
references, resolution {args.resolution}, lock `{args.lock}`, face-loss weight {args.face_loss_weight},
prompt dropout {args.prompt_dropout}. Final logged loss: {final_loss if final_loss is not None else 'n/a'}.

Load it with `RetriNetModel.from_pretrained(folder / "retrinet")`{' and the trained UNet from `folder / "unet"`' if args.lock == "none" else ''}.

Command line:

```
accelerate launch -m training.train_retrinet {shlex.join(args.argv)}
```
"""


def push_to_hub(folder: Path, repo_id: str, token: str | None) -> str:
    """Upload the final models (not the checkpoints) with huggingface_hub."""
    from huggingface_hub import create_repo, upload_folder

    repo = create_repo(repo_id, exist_ok=True, token=token).repo_id
    upload_folder(repo_id=repo, folder_path=str(folder), token=token, commit_message="RetriNet training run",
                  ignore_patterns=["checkpoint-*", ".checkpoint-*", "*.tmp"])
    return repo


# ---------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output_dir)
    accelerator = make_accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push-to-hub needs --hub-model-id")
    if args.report_to in ("tensorboard", "all"):
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
    set_seed(args.seed)

    # data first: a bad folder fails before any model is loaded
    split = None if args.split == "none" else args.split
    dataset = RetriBooruDataset(args.data, split, task=args.task, setting=args.setting,
                                num_references=args.num_references, resolution=args.resolution, seed=args.seed,
                                prompt_tags=args.prompt_tags)

    vae, text_encoder, tokenizer, unet, noise_scheduler = load_base(args.pretrained, args.revision, args.unet)
    if unweighted_last_step(noise_scheduler, args.timestep_weighting, args.snr_gamma):
        logger.warning("--timestep-weighting %s gives the last timestep of this zero-terminal-SNR v schedule no "
                       "weight: the step that must read the references is not trained (use uniform)",
                       args.timestep_weighting)
    if args.retrinet:
        retrinet = RetriNetModel.from_pretrained(args.retrinet)
        if len(retrinet.down_blocks) != len(unet.down_blocks) or \
                tuple(retrinet.config.block_out_channels) != tuple(unet.config.block_out_channels):
            raise ValueError(f"the RetriNet in {args.retrinet} was built for another UNet")
        if args.retrieval_positions and not retrinet.config.retrieval_positions:
            raise ValueError(f"--retrieval-positions: the RetriNet in {args.retrinet} was trained without them")
        if args.retrieval_regions and not retrinet.config.get("retrieval_regions", False):
            raise ValueError(f"--retrieval-regions: the RetriNet in {args.retrinet} was trained without them")
        if args.retrieval_max_keys is not None and args.retrieval_max_keys != retrinet.config.retrieval_max_keys:
            raise ValueError(f"--retrieval-max-keys {args.retrieval_max_keys}: the RetriNet in {args.retrinet} was "
                             f"trained with {retrinet.config.retrieval_max_keys}")
    else:
        retrinet = RetriNetModel.from_unet(unet, retrieval_attention_heads=args.retrieval_attention_heads,
                                           max_references=args.max_references,
                                           retrieval_positions=args.retrieval_positions,
                                           retrieval_max_keys=args.retrieval_max_keys,
                                           retrieval_regions=args.retrieval_regions)
    params = retrinet.set_training_mode(unet, LOCKS[args.lock])
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        retrinet.enable_gradient_checkpointing()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)

    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # Accelerate steps a prepared scheduler once per process per optimiser step: count in those
    n = accelerator.num_processes
    lr_scheduler = cosine_restarts(optimizer, args.restart_steps * n, args.lr_warmup_steps * n)
    unet_trains = args.lock == "none"
    if unet_trains:
        retrinet, unet, optimizer, lr_scheduler = accelerator.prepare(retrinet, unet, optimizer, lr_scheduler)
    else:
        retrinet, optimizer, lr_scheduler = accelerator.prepare(retrinet, optimizer, lr_scheduler)
        unet.to(accelerator.device, dtype=weight_dtype)
    unet.train(unet_trains)
    retrinet.train()

    signature = {"retrinet": dict(accelerator.unwrap_model(retrinet).config),
                 "unet_blocks": list(accelerator.unwrap_model(unet).config.block_out_channels),
                 "lock": args.lock, "train_batch_size": args.train_batch_size,
                 "gradient_accumulation_steps": args.gradient_accumulation_steps,
                 "num_processes": accelerator.num_processes}
    signature = json.loads(json.dumps(signature, default=list))
    objective = RetriNetObjective(args, accelerator, vae, text_encoder, tokenizer, unet, retrinet, noise_scheduler,
                                  weight_dtype)
    validate = make_validation(args, accelerator, vae, text_encoder, tokenizer, unet, retrinet, weight_dtype) \
        if args.validation_steps else None
    config = TrainerConfig(
        output_dir=str(out), max_train_steps=args.max_train_steps, batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit, logging_steps=args.logging_steps,
        validation_steps=args.validation_steps, seed=args.seed, num_workers=args.dataloader_num_workers,
        max_grad_norm=args.max_grad_norm, ema_decay=ema_decay(args))
    trainer = Trainer(accelerator, config, dataset, collate, [retrinet, unet] if unet_trains else [retrinet],
                      optimizer, lr_scheduler, objective, signature, validate)
    start = trainer.resume(args.resume_from_checkpoint)
    # the gaps of validations after the checkpoint (or of an earlier, lost run) are measured again
    MetricsLog(out / "validation" / GAP_LOG, accelerator.is_main_process).truncate_after(start)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("retrinet", config={k: v for k, v in vars(args).items() if k != "argv"})
    logger.info("training %d samples from step %d to %d on %d process(es)", len(dataset), start,
                args.max_train_steps, accelerator.num_processes)
    state = trainer.train()

    result: dict[str, Any] = {"global_step": state.global_step, "output_dir": str(out)}
    if accelerator.is_main_process:
        accelerator.unwrap_model(retrinet).save_pretrained(out / "retrinet")
        if unet_trains:
            accelerator.unwrap_model(unet).save_pretrained(out / "unet")
        metrics = read_metrics(out / "metrics.jsonl")
        final = metrics[-1]["loss"] if metrics else None
        (out / "README.md").write_text(model_card(args, final), encoding="utf-8")
        if args.push_to_hub:
            result["hub_repo"] = push_to_hub(out, args.hub_model_id, args.hub_token)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        logger.error("%s", e)
        sys.exit(f"error: {e}")
