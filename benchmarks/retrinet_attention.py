"""Where RetriNet's cross-attentions look: near a query's own place in the references, or anywhere?

    python -m benchmarks.retrinet_attention --pipeline assets/demo-zoo/retrinet --data WORK/toybooru

For a batch of reconstruction samples of the test split (each target with N "figure" references of its
cluster, which show the character in about the same place), the noisy target at several timesteps
goes through RetriNet, and for every ``ControlCrossAttention`` the share of each query's attention
that falls within one token of its own place, summed over the N references ("near"), is set beside
the share a uniform spread would put there ("uniform"), with the attention's entropy over its log of
the number of keys (1: uniform). A model that copies a place from its references puts more than
"uniform" near its own place; one that reads them only as a whole does not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TIMESTEPS = (100, 500, 900, 999)


class _Spy:
    """Stands in for ``torch.nn.functional`` inside ``pipelines.retrinet.attention``: records what each
    scaled-dot-product attention call attends to, then computes it as usual."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def __getattr__(self, name):
        return getattr(F, name)

    def scaled_dot_product_attention(self, q, k, v, *args, **kwargs):
        self.rows.append(attention_locality(q, k))
        return F.scaled_dot_product_attention(q, k, v, *args, **kwargs)


def attention_locality(q: torch.Tensor, k: torch.Tensor) -> dict[str, float]:
    """``q`` (B, h, L_q, d) over ``k`` (B, h, N * L, d), both square token grids of one side (L_q = L):
    the mean share of a query's softmax attention within one token of its own place, over all N references;
    what a uniform spread would put there; and the attention's entropy over its maximum."""
    if q.ndim != 4 or k.ndim != 4 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"queries {tuple(q.shape)} and keys {tuple(k.shape)} are not (B, h, L, d)")
    lq, lk = q.shape[2], k.shape[2]
    side = math.isqrt(lq)
    if side * side != lq or lk % lq:
        raise ValueError(f"{lq} queries over {lk} keys are not N square grids of the queries' size")
    n = lk // lq
    w = (q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # (B, h, L_q, N * L)
    ys = torch.arange(side)
    near_1d = (ys.view(-1, 1) - ys.view(1, -1)).abs() <= 1
    near = (near_1d.view(side, 1, side, 1) & near_1d.view(1, side, 1, side)).reshape(lq, 1, lq).float()
    mass = (w.view(*w.shape[:3], n, lq) * near).sum((-1, -2)).mean().item()
    uniform = near.sum().item() / (lq * lq)
    entropy = (-(w.clamp_min(1e-12).log() * w).sum(-1)).mean().item() / math.log(lk)
    return {"side": side, "references": n, "near": mass, "uniform": uniform, "entropy": entropy}


@contextlib.contextmanager
def spying():
    import pipelines.retrinet.attention as module

    spy = _Spy()
    module.F = spy
    try:
        yield spy
    finally:
        module.F = F


@torch.no_grad()
def measure(pipeline: str | Path, data: str | Path, samples: int = 16, timesteps=TIMESTEPS, seed: int = 0
            ) -> dict[str, Any]:
    from diffusers import DDPMScheduler

    from pipelines.retrinet import RetriNetPipeline, embed_texts, embed_words
    from training.data.retribooru import RetriBooruDataset, collate
    from training.train_retrinet import gap_batch

    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    pipe = RetriNetPipeline.from_pretrained(pipeline)
    horizon = pipe.scheduler.config.num_train_timesteps
    if not timesteps or any(not 0 <= int(t) < horizon for t in timesteps):
        raise ValueError(f"timesteps {tuple(timesteps)} must lie in 0..{horizon - 1}")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ds = RetriBooruDataset(data, "test", task="recon", setting="b", num_references=4, resolution=size,
                           prompt_tags="neutral", seed=seed)
    batch = gap_batch(ds, samples) if len(ds) > 1 else collate([ds[0]])  # the samples the reference gap reads
    b, n = batch["reference_pixel_values"].shape[:2]
    sf = pipe.vae.config.scaling_factor
    latents = pipe.vae.encode(batch["pixel_values"]).latent_dist.mode() * sf
    refs = pipe.vae.encode(batch["reference_pixel_values"].flatten(0, 1)).latent_dist.mode() * sf
    concepts = embed_words(pipe.tokenizer, pipe.text_encoder, [c for cs in batch["concepts"] for c in cs], "cpu")
    empty = embed_texts(pipe.tokenizer, pipe.text_encoder, [""] * b, "cpu")
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    result: dict[str, Any] = {"pipeline": str(pipeline), "samples": b, "references": n, "timesteps": {}}
    for t in timesteps:
        tt = torch.full((b,), int(t))
        with spying() as spy:
            pipe.retrinet(refs, tt, concepts, n, unet=pipe.unet, sample=noise_scheduler.add_noise(latents, noise, tt),
                          encoder_hidden_states=empty)
        result["timesteps"][int(t)] = spy.rows
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retrinet_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="a RetriNetPipeline folder")
    p.add_argument("--data", required=True, help="a RetriBooru-style folder with a test split")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)))
    p.add_argument("--json", default=None, help="write the figures here too")
    args = p.parse_args(argv)
    try:
        result = measure(args.pipeline, args.data, args.samples, [int(t) for t in args.timesteps.split(",")])
    except (ValueError, OSError) as e:
        p.exit(2, f"error: {e}\n")
    print("timestep  layer  side  near    uniform  entropy/max")
    for t, rows in result["timesteps"].items():
        for i, r in enumerate(rows):
            print(f"{t:8d}  {i:5d}  {r['side']:4d}  {r['near']:.3f}   {r['uniform']:.3f}    {r['entropy']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    main(sys.argv[1:])
