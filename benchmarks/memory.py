"""Memory: a demo training run's peak resident memory on this CPU, and the GPU memory the ``sd15``
family should need, set beside the published anchors.

    python -m benchmarks.memory [--quick]

The GPU figures are computed, not measured (there is no GPU here): the weights from parameter counts
of the SD 1.5-size UNet, RetriNet (``RetriNetModel.from_unet``), VAE and text encoder built on the
meta device (no memory, no compute), gradients and AdamW's two moments from the trainable parameter
count, and the activations *measured at real shapes* on the meta device by ``common.count_activations``,
which follows every tensor storage the operators make until it is freed (attention as a fused kernel,
as torch 2's SDPA runs on a GPU). What a GPU adds beyond the tensors (the CUDA context, cuBLAS and
cuDNN workspaces, the caching allocator's slack) is read off the anchors: the same count for plain
SD 1.5 inference against its ~4.5 GB, and for ControlNet training against diffusers' 20 GB (batch 1,
gradient accumulation) and 16 GB (gradient checkpointing, 8-bit Adam) recipes, which train in fp32.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "memory"
TITLE = "Memory"
COMMAND = "python -m benchmarks.memory"
ANCHOR_SD15_INFERENCE = 4.5 * common.GB
ANCHOR_CONTROLNET = 20 * common.GB  # batch 1, gradient accumulation 4, fp32, AdamW
ANCHOR_CONTROLNET_CKPT_8BIT = 16 * common.GB  # + gradient checkpointing, 8-bit Adam
LATENT = 64  # 512 px
REFERENCES = 4


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _models(dtype):
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.components import SD15_TEXT, SD15_UNET, SD15_VAE
    from pipelines.retrinet import RetriNetModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET).to(dtype)
        retrinet = RetriNetModel.from_unet(unet, load_weights_from_unet=False).to(dtype)
        vae = AutoencoderKL(**SD15_VAE).to(dtype)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False).to(dtype)
    return {"unet": unet, "retrinet": retrinet, "vae": vae, "text_encoder": text, "controlnet": controlnet}


def composition(fused: bool = True) -> dict[str, Any]:
    """fp16, 512 px, N = 4 references, 1 picture with guidance (2 UNet rows)."""
    import torch

    dt = torch.float16
    m = _models(dt)
    for x in m.values():
        x.eval()
    counts = {k: _params(v) for k, v in m.items()}
    with torch.device("meta"):
        x = torch.randn(2, 4, LATENT, LATENT, dtype=dt)
        ehs = torch.randn(2, 77, 768, dtype=dt)
        ref_px = torch.randn(REFERENCES, 3, 8 * LATENT, 8 * LATENT, dtype=dt)
        ref = torch.randn(REFERENCES, 4, LATENT, LATENT, dtype=dt)
        emb = torch.randn(REFERENCES, 77, 768, dtype=dt)
        group = torch.zeros(2, dtype=torch.long)
    act = {}
    with torch.no_grad():
        with common.count_activations(fused) as c:
            m["vae"].encode(ref_px)
        act["encode_references"] = c.peak
        with common.count_activations(fused) as c:
            m["vae"].encode(ref_px[:1])
        act["encode_one_reference"] = c.peak
        with common.count_activations(fused) as c:
            feats = m["retrinet"](ref, 500, emb, REFERENCES)
            features = c.live
            m["retrinet"].denoise(m["unet"], x, 500, ehs, feats, group)
        act["retrinet_step"], act["features_per_step"] = c.peak, features
        with common.count_activations(fused) as c:
            m["unet"](x, 500, encoder_hidden_states=ehs)
        act["unet_step"] = c.peak
        with common.count_activations(fused) as c:
            m["vae"].decode(torch.randn(1, 4, LATENT, LATENT, dtype=dt, device="meta"))
        act["decode"] = c.peak
    return {"params": counts, "activations": act}


def training(kind: str, dtype_name: str, checkpointing: bool, fused: bool = True, lock: str = "default") -> dict:
    """Peak activations of one training step at 512 px, batch 1 (RetriNet: N = 4 references; ControlNet:
    its conditioning picture), parameter gradients freed as they arrive (they are counted apart)."""
    import torch
    import torch.nn.functional as F

    dt = {"fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    m = _models(dt)
    unet = m["unet"]
    if kind == "retrinet":
        model = m["retrinet"]
        params = model.set_training_mode(unet, lock)
    else:
        model = m["controlnet"]
        unet.requires_grad_(False)
        model.requires_grad_(True)
        params = list(model.parameters())
    if checkpointing:
        unet.enable_gradient_checkpointing()
        model.enable_gradient_checkpointing()
    unet.train()
    model.train()
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    with torch.device("meta"):
        x = torch.randn(1, 4, LATENT, LATENT, dtype=dt)
        ehs = torch.randn(1, 77, 768, dtype=dt)
        t = torch.tensor([500])
        ref = torch.randn(REFERENCES, 4, LATENT, LATENT, dtype=dt)
        emb = torch.randn(REFERENCES, 77, 768, dtype=dt)
        hint = torch.randn(1, 3, 8 * LATENT, 8 * LATENT, dtype=dt)
        pixels = torch.randn(1 + (REFERENCES if kind == "retrinet" else 0), 3, 8 * LATENT, 8 * LATENT, dtype=dt)
    with torch.no_grad(), common.count_activations(fused) as c:
        m["vae"].encode(pixels)  # the target (and references) before the step, without gradients
    encode = c.peak
    with common.count_activations(fused) as c:
        if kind == "retrinet":
            pred = model(ref, t, emb, REFERENCES, unet=unet, sample=x, encoder_hidden_states=ehs)
        else:
            down, mid = model(x, t, ehs, controlnet_cond=hint, return_dict=False)
            pred = unet(x, t, ehs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        F.mse_loss(pred.float(), torch.zeros_like(pred, dtype=torch.float32)).backward()
    return {"kind": kind, "dtype": dtype_name, "checkpointing": checkpointing, "lock": lock, "fused": fused,
            "trainable": sum(p.numel() for p in params), "activations": c.peak, "encode": encode,
            "params": {k: _params(v) for k, v in m.items()}}


def train_total(r: dict, weights_bytes: dict[str, int], optimiser_bytes_per_param: int) -> int:
    """Weights + fp32 gradients + optimiser state + the larger of the step's activations and the VAE encode."""
    return (sum(weights_bytes.values()) + 4 * r["trainable"] + optimiser_bytes_per_param * r["trainable"]
            + max(r["activations"], r["encode"]))


def demo_training_rss(quick: bool) -> dict[str, Any]:
    """Peak resident memory of a demo-size RetriNet training run (the demo family's stage: 64 px, N = 4,
    batch 16, fp32), one process, one thread."""
    from benchmarks.training import launch
    from training.data.toybooru import generate

    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        data = generate(Path(tmp) / "toybooru", 60 if quick else 80, seed=0, size=64)
        run = launch(1, 1, data, Path(tmp) / "run", 2 if quick else 6, 16)
    return {"peak_worker_rss": run["peak_worker_rss"], "peak_total_rss": run["peak_total_rss"], "batch": 16}


def bench(quick: bool = False, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """``previous``: results of the benchmarks run before in the same suite; in quick mode the training
    benchmark's own run (1 process, batch 4) stands in for the demo training run instead of a new launch."""
    done = (previous or {}).get("training", {})
    if quick and "peak_rss_1x1" in done:
        demo = {"peak_worker_rss": done["peak_rss_1x1"], "peak_total_rss": done.get("peak_total_rss_1x1", 0),
                "batch": done.get("batch", 0)}
    else:
        demo = demo_training_rss(quick)
    out: dict[str, Any] = {"demo_training": demo}
    comp = composition()
    p, a = comp["params"], comp["activations"]
    fp16 = {k: 2 * p[k] for k in ("unet", "retrinet", "vae", "text_encoder")}
    steps = 20
    cache = min(steps * a["features_per_step"], 1 << 30)  # the pipeline's feature cache is capped at 1 GiB
    retrinet_count = sum(fp16.values()) + max(a["encode_references"], cache + max(a["retrinet_step"], a["decode"]))
    sd15_count = fp16["unet"] + fp16["vae"] + fp16["text_encoder"] + max(a["unet_step"], a["decode"])
    gap = ANCHOR_SD15_INFERENCE - sd15_count
    out["composition"] = {**comp, "weights": fp16, "feature_cache": cache, "retrinet_count": retrinet_count,
                          "sd15_count": sd15_count, "gap": gap, "expected": retrinet_count + gap,
                          "expected_slicing_no_cache": sum(fp16.values()) + gap +
                          max(a["encode_one_reference"], a["retrinet_step"], a["decode"])}

    runs = [training("retrinet", "fp32", True), training("retrinet", "fp16", True),
            training("controlnet", "fp32", False), training("controlnet", "fp32", True)]
    if not quick:
        runs += [training("controlnet", "fp32", False, fused=False), training("controlnet", "fp32", True, fused=False)]
    p32 = {k: 4 * v for k, v in runs[0]["params"].items()}
    rn32, rn16, cn, cn_ck = runs[:4]
    w_rn32 = {k: p32[k] for k in ("unet", "retrinet", "vae", "text_encoder")}
    w_rn16 = {**w_rn32, "vae": p32["vae"] // 2, "text_encoder": p32["text_encoder"] // 2}  # mixed: frozen in fp16
    w_cn = {k: p32[k] for k in ("unet", "controlnet", "vae", "text_encoder")}
    lock_trainable = p["retrinet"]
    gaps = {"fused": (ANCHOR_CONTROLNET - train_total(cn, w_cn, 8),
                      ANCHOR_CONTROLNET_CKPT_8BIT - train_total(cn_ck, w_cn, 2))}
    if not quick:
        cm, cm_ck = runs[4:6]
        gaps["math"] = (ANCHOR_CONTROLNET - train_total(cm, w_cn, 8),
                        ANCHOR_CONTROLNET_CKPT_8BIT - train_total(cm_ck, w_cn, 2))
    all_gaps = [g for pair in gaps.values() for g in pair]
    lo, hi = min(all_gaps), max(all_gaps)
    configs = [
        ("RetriNet, `--gradient-checkpointing`, fp32 (the trainer's default precision), AdamW, `--lock none`",
         train_total(rn32, w_rn32, 8), rn32),
        ("the same with `--mixed-precision fp16`", train_total(rn16, w_rn16, 8), rn16),
        ("the same with `--lock decoder` (the UNet frozen: RetriNet alone trains)",
         train_total({**rn16, "trainable": lock_trainable}, w_rn16, 8), {**rn16, "trainable": lock_trainable}),
        ("the same with an 8-bit Adam (2 bytes per parameter; not in the trainer yet)",
         train_total({**rn16, "trainable": lock_trainable}, w_rn16, 2), {**rn16, "trainable": lock_trainable}),
    ]
    out["training"] = {"runs": runs, "gaps": gaps, "gap_range": (lo, hi),
                       "configs": [{"what": w, "count": c, "expected": (c + lo, c + hi), "trainable": r["trainable"],
                                    "activations": r["activations"], "encode": r["encode"]} for w, c, r in configs],
                       "controlnet": {"count": train_total(cn, w_cn, 8), "count_ckpt_8bit": train_total(cn_ck, w_cn, 2)}}
    demo = out["demo_training"]["peak_worker_rss"]
    default = out["training"]["configs"][0]
    out["summary"] = [
        common.summary(f"demo RetriNet training run, peak resident memory (batch {out['demo_training']['batch']}, "
                       "64 px, N = 4)", common.gb(demo),
                       "anchor: the studio's 2 GB", None),
        common.summary("sd15 composition on a GPU (fp16, 4 references, 512 px), expected",
                       common.gb(out["composition"]["expected"]), "anchor: SD 1.5 fp16 inference about 4.5 GB", None,
                       "the RetriNet weights (0.8 GB in fp16), up to 1 GB of cached retrieval features and the "
                       "references' VAE encode come on top of SD 1.5"),
        common.summary("sd15 RetriNet training on a GPU (batch 1, gradient checkpointing, fp32, AdamW), expected",
                       _range(*default["expected"]),
                       "anchor: ControlNet 20 GB (batch 1), 16 GB (checkpointing, 8-bit Adam)", None,
                       f"RetriNet trains {default['trainable'] / 1e6:.0f} M parameters by default (ControlNet "
                       f"{p['controlnet'] / 1e6:.0f} M): the retrieval encoder, the bridge and the UNet's decoder"),
    ]
    return out


def _card(nbytes: float) -> str:
    """The smallest common GPU memory size that holds ``nbytes``."""
    for size in (4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 80):
        if nbytes <= size * common.GB:
            return f"{'an' if size in (8, 80) else 'a'} {size} GB card"
    return "no single common card"


def _range(lo: float, hi: float) -> str:
    a, b = round(lo / common.GB), round(hi / common.GB)
    return f"{a} GB" if a == b else f"{a} to {b} GB"


def section(r: dict[str, Any]) -> str:
    d = r["demo_training"]
    c = r["composition"]
    p, a, w = c["params"], c["activations"], c["weights"]
    g = common.gb
    comp_rows = [
        ["weights, fp16: UNet / RetriNet / VAE / text encoder",
         f"{g(w['unet'])} / {g(w['retrinet'])} / {g(w['vae'])} / {g(w['text_encoder'])}",
         (f"{p['unet'] / 1e6:.0f} M / {p['retrinet'] / 1e6:.0f} M / {p['vae'] / 1e6:.0f} M / "
          f"{p['text_encoder'] / 1e6:.0f} M parameters")],
        ["VAE encode of the 4 references in one batch (peak activations)", g(a["encode_references"]),
         f"one at a time (VAE slicing): {g(a['encode_one_reference'])}"],
        ["a denoising step: retrieval encoder + UNet with guidance (peak activations)", g(a["retrinet_step"]),
         f"plain UNet step: {g(a['unet_step'])}"],
        ["retrieval features of one step / the feature cache after 20 steps",
         f"{g(a['features_per_step'])} / {g(c['feature_cache'])}", "the cache holds up to 1 GiB, on the model's device"],
        ["VAE decode of the picture (peak activations)", g(a["decode"]), ""],
        ["tensors at the peak: RetriNet / plain SD 1.5", f"{g(c['retrinet_count'])} / {g(c['sd15_count'])}",
         f"the anchor's 4.5 GB leaves {g(c['gap'])} for CUDA and the allocator"],
        ["**expected on a GPU** (tensors + that)", f"**{g(c['expected'])}**",
         f"with VAE slicing and the feature cache off: {g(c['expected_slicing_no_cache'])}"],
    ]
    t = r["training"]
    lo, hi = t["gap_range"]
    train_rows = [[x["what"], f"{x['trainable'] / 1e6:.0f} M", g(x["activations"]), g(x["count"]),
                   f"**{_range(*x['expected'])}**"]
                  for x in t["configs"]]
    cn = t["controlnet"]
    how = {"fused": "fused attention", "math": "attention matrices kept, as before SDPA"}
    gap_text = ", ".join(f"{g(a_)} and {g(b_)} ({how[k]})" for k, (a_, b_) in t["gaps"].items())
    return f"""## {TITLE}

{common.header(r, COMMAND)}

**A demo training run on this CPU**: the demo family's RetriNet stage (64 px, N = 4, batch {d['batch']}, fp32) under
`accelerate launch`, one process: peak resident memory **{g(d['peak_worker_rss'])}** (the launcher included:
{g(d['peak_total_rss'])}). The studio's own peak is in the studio section.

**The `sd15` family on a GPU** (computed: no GPU here). Weights from parameter counts of the SD 1.5-size models
built on the meta device; activations measured at real shapes on the meta device (`common.count_activations`,
attention as a fused kernel as torch 2's SDPA runs it on a GPU); what a GPU adds beyond the tensors read off the
anchors.

Composition, fp16, 512 px, 4 references, 1 picture with guidance, 20 steps:

{common.table(["what", "memory", "notes"], comp_rows)}

Training, batch 1, 512 px, N = 4, gradient checkpointing (weights, fp32 gradients, AdamW's two fp32 moments per
trained parameter, and the larger of the step's activations and the VAE encode of target and references):

{common.table(["configuration", "trained parameters", "peak activations", "tensors", "expected on a GPU"], train_rows)}

The range is the anchors' overhead: the same count for ControlNet gives {g(cn['count'])} against its 20 GB recipe and
{g(cn['count_ckpt_8bit'])} against its 16 GB one (checkpointing, 8-bit Adam), so a GPU adds {gap_text} beyond the
tensors; the expected figures add {g(lo)} to {g(hi)}.

What follows:

- Composition with RetriNet needs more than SD 1.5's 4.5 GB: its own weights in fp16, the references' VAE encode
  in one batch (VAE slicing cuts it to a quarter) and the feature cache, which keeps every step's retrieval
  features on the GPU (up to 1 GiB) so that a sweep's later cells skip the encoder. {_card(c['expected'])[0].upper() + _card(c['expected'])[1:]} fits it;
  with VAE slicing and the cache off, {_card(c['expected_slicing_no_cache'])} (`pipe.retrieval_cache.max_bytes = 0`).
- Training RetriNet as the trainer does by default (`--lock none`: the retrieval encoder, the cross-attentions,
  the zero convolutions and the UNet's decoder, about 2.5x ControlNet's trained parameters) needs more than
  ControlNet's recipes: the gradients and AdamW moments of the UNet's decoder dominate. `--lock decoder` with fp16
  mixed precision brings it to {_range(*t['configs'][2]['expected'])} (ControlNet: 20 GB), and an 8-bit Adam (not in
  the trainer) to {_range(*t['configs'][3]['expected'])} (ControlNet: 16 GB).
- fp16 / bf16 halve weights and activations of the frozen models; model CPU offload bounds composition to the
  largest model plus its activations and RetriNet (kept on the GPU; see the optimisations section); VAE tiling
  matters above 512 px, slicing at 512 px."""


if __name__ == "__main__":
    common.cli(sys.modules[__name__])
