"""What RetriNet adds to a denoising step: measured time against FLOP counts.

    python -m benchmarks.retrinet_step                    # the "small" UNet, measured and counted
    python -m benchmarks.retrinet_step --size sd15 --count-only   # SD 1.5, counted on the meta device

For N = 1 and 4 references and batch 1 and 8, with classifier-free guidance (2 x batch UNet
rows), it prints the step time of RetriNet over the base UNet, the same ratio predicted by
``torch.utils.flop_counter``, and the shares of the RetriNet step spent in the retrieval encoder
(run once per step on the N shared references) and in the cross-attentions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from pipelines.components import SD15_UNET, TINY_UNET
from pipelines.retrinet import RetriNetModel

SMALL_UNET = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (64, 128, 256),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 128, "attention_head_dim": 8, "norm_num_groups": 32,
}
# SD 1.5's proportions (8 heads, so head dims of 16 to 64 instead of 40 to 160) at a CPU-friendly width
MEDIUM_UNET = {**SMALL_UNET, "block_out_channels": (128, 256, 512), "cross_attention_dim": 256}
UNETS = {"tiny": TINY_UNET, "small": SMALL_UNET, "medium": MEDIUM_UNET, "sd15": SD15_UNET}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(UNETS), default="small", help="UNet configuration")
    p.add_argument("--latent", type=int, default=32, help="latent side of target and references")
    p.add_argument("--references", type=int, nargs="+", default=[1, 4])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (the median is kept)")
    p.add_argument("--count-only", action="store_true", help="only count FLOPs, on the meta device")
    return p.parse_args(argv)


class Timer:
    """Wall time spent inside chosen modules, by forward pre/post hooks (CPU: synchronous)."""

    def __init__(self, modules):
        self.total = 0.0
        self._t0 = {}
        self.handles = []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._start))
            self.handles.append(m.register_forward_hook(self._stop))

    def _start(self, m, args):
        self._t0[id(m)] = time.perf_counter()

    def _stop(self, m, args, out):
        self.total += time.perf_counter() - self._t0.pop(id(m))

    def remove(self):
        for h in self.handles:
            h.remove()


def build(size: str, device: str):
    cfg = UNETS[size]
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg).eval()
        retrinet = RetriNetModel.from_unet(unet, load_weights_from_unet=device != "meta").eval()
    if device != "meta":
        with torch.no_grad():  # non-zero bridges, so that nothing is skipped as trivially zero
            for conv in [*retrinet.zero_convs, retrinet.mid_zero_conv]:
                conv.weight.normal_(std=0.01)
    return unet, retrinet, cfg


def inputs(cfg, batch: int, n: int, latent: int, device: str):
    rows = 2 * batch  # classifier-free guidance
    with torch.device(device):
        x = torch.randn(rows, cfg["in_channels"], latent, latent)
        ehs = torch.randn(rows, 77, cfg["cross_attention_dim"])
        ref = torch.randn(n, cfg["in_channels"], latent, latent)  # the references of the prompt, shared
        emb = torch.randn(n, 77, cfg["cross_attention_dim"])
        group = torch.zeros(rows, dtype=torch.long)
    return x, ehs, ref, emb, group


def base_step(unet, x, ehs):
    return unet(x, 500, encoder_hidden_states=ehs, return_dict=False)[0]


def retrinet_step(unet, retrinet, x, ehs, ref, emb, group, n):
    features = retrinet(ref, 500, emb, n)
    return retrinet.denoise(unet, x, 500, ehs, features, group)


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bridge_modules(retrinet):
    return [*retrinet.cross_attentions, retrinet.mid_cross_attention]


def main(args: argparse.Namespace) -> list[dict]:
    device = "meta" if args.count_only else "cpu"
    unet, retrinet, cfg = build(args.size, device)
    rows = []
    print(f"UNet '{args.size}' {tuple(cfg['block_out_channels'])}, latent {args.latent}x{args.latent}, "
          f"guidance on (2 x batch UNet rows), {torch.get_num_threads()} CPU threads")
    header = "N  batch  predicted  measured  retrieval-encoder  cross-attention (measured share; FLOP share)"
    print(header)
    with torch.no_grad():
        for n in args.references:
            for batch in args.batch:
                x, ehs, ref, emb, group = inputs(cfg, batch, n, args.latent, device)
                f_base = flops(lambda: base_step(unet, x, ehs))
                f_rn = flops(lambda: retrinet_step(unet, retrinet, x, ehs, ref, emb, group, n))
                f_enc = flops(lambda: retrinet(ref, 500, emb, n))
                f_cca = _bridge_flops(retrinet, unet, x, ehs, retrinet(ref, 500, emb, n), group)
                row = {"N": n, "batch": batch, "predicted": f_rn / f_base, "encoder_flops": f_enc / f_rn,
                       "cca_flops": f_cca / f_rn}
                if not args.count_only:
                    base_step(unet, x, ehs)  # warm-up
                    retrinet_step(unet, retrinet, x, ehs, ref, emb, group, n)
                    t_base, t_rn, t_enc, t_cca = [], [], [], []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        base_step(unet, x, ehs)
                        t_base.append(time.perf_counter() - t0)
                        enc, cca = Timer([retrinet]), Timer(bridge_modules(retrinet))
                        t0 = time.perf_counter()
                        retrinet_step(unet, retrinet, x, ehs, ref, emb, group, n)
                        t_rn.append(time.perf_counter() - t0)
                        enc.remove()
                        cca.remove()
                        t_enc.append(enc.total)
                        t_cca.append(cca.total)
                    tb, tr = statistics.median(t_base), statistics.median(t_rn)
                    row.update(measured=tr / tb, base_s=tb, retrinet_s=tr, encoder_share=statistics.median(t_enc) / tr,
                               cca_share=statistics.median(t_cca) / tr)
                rows.append(row)
                measured = f"{row['measured']:.3f}" if "measured" in row else "-"
                enc_m = f"{row['encoder_share']:.1%}" if "encoder_share" in row else "-"
                cca_m = f"{row['cca_share']:.1%}" if "cca_share" in row else "-"
                print(f"{n:<2} {batch:<6} {row['predicted']:<10.3f} {measured:<9} "
                      f"{enc_m:>6} ({row['encoder_flops']:.1%} FLOPs)    {cca_m:>6} ({row['cca_flops']:.1%} FLOPs)")
    return rows


def _bridge_flops(retrinet, unet, x, ehs, feats, group) -> int:
    """FLOPs of the cross-attentions alone, counted inside their own forward calls."""
    total = 0
    counters = []

    def pre(m, a):
        c = FlopCounterMode(display=False)
        c.__enter__()
        counters.append(c)

    def post(m, a, o):
        nonlocal total
        c = counters.pop()
        c.__exit__(None, None, None)
        total += c.get_total_flops()

    handles = [h for m in bridge_modules(retrinet) for h in (m.register_forward_pre_hook(pre),
                                                              m.register_forward_hook(post))]
    try:
        retrinet.denoise(unet, x, 500, ehs, feats, group)
    finally:
        for h in handles:
            h.remove()
    return total


if __name__ == "__main__":
    main(parse_args())
