"""Optimisations, each measured before and after in the same run, on the studio's workload: one
demo-family composition (64 px, 4 references, guidance on, DPM-Solver++), and for the attention
and memory-layout ones also a step of the "medium" UNet (SD 1.5's layout at a CPU-friendly width).

    python -m benchmarks.optimise [--quick]

- shared reference features across guidance and batch: the retrieval encoder once per step on the
  N references, read by every UNet row (what the pipeline does), against one copy per row;
- the feature cache: a composition whose references' features are cached against one that computes them;
- scaled-dot-product attention: diffusers' ``AttnProcessor2_0`` (the default) against ``AttnProcessor``;
- channels-last memory format for the UNet, RetriNet and VAE;
- ``torch.compile`` of the UNet (not in quick mode: compiling takes minutes on this CPU);
- CPU threads: 1 against 2, and OpenMP's wait policy, in separate worker processes (the policy is
  read when the OpenMP runtime starts).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import common

NAME = "optimise"
TITLE = "Optimisations"
COMMAND = "python -m benchmarks.optimise"
PROMPT = "1girl, solo, standing, outdoors"


def _pipe():
    from pipelines.zoo import ModelZoo, ZooSpec

    pipe = ModelZoo(ZooSpec.demo(), device="cpu").retrinet()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _composer(pipe, steps: int, warm: bool = True):
    import torch

    from benchmarks.compose import references

    refs = references()

    def compose():
        if not warm:
            pipe.retrieval_cache.clear()
        return pipe(PROMPT, refs, num_inference_steps=steps, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0)).images[0]

    return compose


def _set_processor(modules, processor) -> None:
    from diffusers.models.attention_processor import Attention

    for module in modules:
        for m in module.modules():
            if isinstance(m, Attention):
                m.set_processor(processor)


def _ab(name: str, before: str, after: str, times: dict[str, list[float]], a: str, b: str, **extra) -> dict:
    """A before / after row: the median paired ratio after / before (below 1: faster)."""
    return {"name": name, "before": before, "after": after, "ratio": common.ratio(times, b, a),
            "before_s": statistics.median(times[a]), "after_s": statistics.median(times[b]), **extra}


def shared_features(pipe, rounds: int) -> dict:
    """A denoising step of the demo UNet + RetriNet, 2 pictures with guidance (4 rows), N = 4."""
    import torch

    from benchmarks.retrinet_step import inputs, retrinet_step

    cfg = {"in_channels": pipe.unet.config.in_channels, "cross_attention_dim": pipe.unet.config.cross_attention_dim}
    latent = pipe.unet.config.sample_size
    shared = inputs(cfg, 2, 4, latent, "cpu", shared=True)
    apart = inputs(cfg, 2, 4, latent, "cpu", shared=False)
    with torch.no_grad():
        steps = {k: (lambda x=x: retrinet_step(pipe.unet, pipe.retrinet, *x, 4)) for k, x in
                 (("per row", apart), ("shared", shared))}
        flops = {k: common.count_flops(f) for k, f in steps.items()}
        times = common.interleave(steps, rounds * 3)
    return _ab("shared reference features (one retrieval-encoder pass per step for all rows; demo UNet step, "
               "2 pictures with guidance, N = 4)", "per row", "shared", times, "per row", "shared",
               predicted=flops["shared"] / flops["per row"])


def sdpa_and_channels_last(fn, models, formatted, rounds: int, sdpa_name: str, format_name: str) -> list[dict]:
    """``fn`` timed with and without SDPA (the attention processors of ``models``), and with and without
    channels-last (the memory format of ``formatted``), interleaved; the defaults are restored after each call."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    def with_processor(processor):
        def run():
            _set_processor(models, processor)
            try:
                return fn()
            finally:
                _set_processor(models, AttnProcessor2_0())
        return run

    def with_format(fmt):
        def run():
            for m in formatted:
                m.to(memory_format=fmt)
            try:
                return fn()
            finally:
                for m in formatted:
                    m.to(memory_format=torch.contiguous_format)
        return run

    times = common.interleave({"AttnProcessor": with_processor(AttnProcessor()),
                               "AttnProcessor2_0": with_processor(AttnProcessor2_0())}, rounds)
    out = [_ab(sdpa_name, "AttnProcessor", "AttnProcessor2_0", times, "AttnProcessor", "AttnProcessor2_0")]
    times = common.interleave({"contiguous": with_format(torch.contiguous_format),
                               "channels_last": with_format(torch.channels_last)}, rounds)
    out.append(_ab(format_name, "contiguous", "channels_last", times, "contiguous", "channels_last"))
    return out


def composition_ab(pipe, steps: int, rounds: int) -> list[dict]:
    import torch

    warm, cold = _composer(pipe, steps, warm=True), _composer(pipe, steps, warm=False)
    with torch.no_grad():
        times = common.interleave({"computed": cold, "cached": warm}, rounds)
        out = [_ab("the feature cache (a composition whose references' features are cached)",
                   "computed", "cached", times, "computed", "cached")]
        out += sdpa_and_channels_last(warm, (pipe.unet, pipe.retrinet), (pipe.unet, pipe.retrinet, pipe.vae), rounds,
                                      "scaled-dot-product attention (diffusers `AttnProcessor2_0`, the default)",
                                      "channels-last memory format (UNet, RetriNet, VAE)")
    return out


def medium_ab(rounds: int) -> list[dict]:
    """SDPA and channels-last on a 'medium' UNet step (latent 32, N = 4, batch 1 with guidance)."""
    import torch

    from benchmarks.retrinet_step import build, inputs, retrinet_step

    unet, retrinet, cfg = build("medium", "cpu")
    x = inputs(cfg, 1, 4, 32, "cpu")
    with torch.no_grad():
        return sdpa_and_channels_last(lambda: retrinet_step(unet, retrinet, *x, 4), (unet, retrinet), (unet, retrinet),
                                      rounds, "scaled-dot-product attention, 'medium' UNet step (latent 32, N = 4)",
                                      "channels-last, 'medium' UNet step (latent 32, N = 4)")


def compiled(pipe, steps: int, rounds: int) -> dict:
    """``torch.compile`` of the UNet: the first call's cost, then eager against compiled."""
    import numpy as np
    import torch

    compose = _composer(pipe, steps)
    eager_unet = pipe.unet
    with torch.no_grad():
        reference = np.asarray(compose(), dtype=np.float32)
        t_eager_first = common.timed(compose)
        saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        cache = tempfile.mkdtemp(prefix="bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile, as at the studio's first start
        try:
            firsts = []
            for _ in range(2):  # cold, then warm (its cache on disk: a restarted studio)
                torch._dynamo.reset()
                compiled_unet = torch.compile(eager_unet)
                pipe.unet = compiled_unet
                try:
                    t0 = time.perf_counter()
                    picture = np.asarray(compose(), dtype=np.float32)
                    firsts.append(time.perf_counter() - t0)
                finally:
                    pipe.unet = eager_unet
        finally:
            if saved is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
            shutil.rmtree(cache, ignore_errors=True)
        first, warm_first = firsts
        def use(unet):
            def run():
                pipe.unet = unet
                try:
                    return compose()
                finally:
                    pipe.unet = eager_unet
            return run

        times = common.interleave({"eager": use(eager_unet), "compiled": use(compiled_unet)}, rounds, warmup=False)
    row = _ab("`torch.compile` of the UNet (inductor, default mode)", "eager", "compiled", times, "eager", "compiled",
              compile_s=first - t_eager_first, warm_compile_s=warm_first - t_eager_first, max_pixel_difference=float(np.abs(picture - reference).max()))
    gain = row["before_s"] - row["after_s"]
    row["break_even"] = (row["compile_s"] / gain) if gain > 0 else None
    return row


# ---------------------------------------------------------------------- threads, in worker processes

def worker(threads: int, steps: int) -> None:
    """``python -m benchmarks.optimise --worker THREADS STEPS``: load the demo pipeline, then for every
    line read on stdin make one composition and print its seconds."""
    import torch

    torch.set_num_threads(threads)
    pipe = _pipe()
    compose = _composer(pipe, steps)
    with torch.no_grad():
        compose()
        print("ready", flush=True)
        for _ in sys.stdin:
            print(f"{common.timed(compose):.6f}", flush=True)


def threads_ab(steps: int, rounds: int) -> dict:
    base_env = {k: v for k, v in common.env().items() if k != "OMP_WAIT_POLICY"}
    base_env["BENCHMARKS_OMP_DEFAULT"] = "1"  # the worker keeps OpenMP's default unless given a policy
    variants = {"1 thread": (1, {}), "2 threads (OpenMP's default wait policy)": (2, {}),
                "2 threads, OMP_WAIT_POLICY=PASSIVE": (2, {"OMP_WAIT_POLICY": "PASSIVE"})}
    procs = {}
    try:
        for name, (n, extra) in variants.items():
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.optimise", "--worker", str(n), str(steps)], cwd=common.ROOT,
                env={**base_env, **extra, "OMP_NUM_THREADS": str(n)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, text=True)
        for name, p in procs.items():
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"the {name} worker did not start")

        def ask(p):
            def run():
                p.stdin.write("go\n")
                p.stdin.flush()
                return float(p.stdout.readline())
            return run

        measured: dict[str, list[float]] = {n: [] for n in procs}
        names = list(procs)
        for r in range(rounds):
            order = names[r % 3:] + names[:r % 3]
            for n in order:
                measured[n].append(ask(procs[n])())  # the worker's own timing of the composition
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.stdin.close()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    one, default, passive = names
    return {"times": measured, "default_over_one": common.ratio(measured, default, one),
            "passive_over_one": common.ratio(measured, passive, one),
            "default_over_passive": common.ratio(measured, default, passive),
            "medians": {n: statistics.median(v) for n, v in measured.items()}, "steps": steps,
            "policy_set_by_caller": os.environ.get("OMP_WAIT_POLICY") if not _suite_set_policy() else None}


def _suite_set_policy() -> bool:
    import benchmarks

    return benchmarks.SET_WAIT_POLICY


def bench(quick: bool = False) -> dict[str, Any]:
    import torch

    torch.set_num_threads(2)
    steps, rounds = (4, 2) if quick else (20, 5)
    pipe = _pipe()
    rows = [shared_features(pipe, rounds)]
    rows += composition_ab(pipe, steps, rounds)
    if not quick:
        rows += medium_ab(3)
        rows.append(compiled(pipe, steps, rounds))
    threads = threads_ab(2 if quick else steps, 1 if quick else 5)
    out: dict[str, Any] = {"steps": steps, "rows": rows, "threads": threads, "compile": not quick}
    d = threads["default_over_one"]
    out["summary"] = [common.summary(
        "2 CPU threads with OpenMP's default wait policy, over 1 thread (demo composition, shared CPU)",
        f"{d:.2f}x the time", "anchor: 1 thread (below 1: 2 threads help)", None,
        "idle OpenMP threads spin, and on cores shared with other jobs the spinning thread takes the core its "
        "partner needs" if d > 1.2 else "")]
    return out


def _threads_text(t: dict, r: dict) -> str:
    d, p = t["default_over_one"], t["passive_over_one"]
    load = (r.get("machine") or {}).get("load", "?")
    text = (f"- Threads, in this run (load average {load} at the start): 2 threads with OpenMP's default wait policy "
            f"took **{d:.2f}x** the time of 1 thread, 2 threads with `OMP_WAIT_POLICY=PASSIVE` {p:.2f}x. ")
    if d > 1.5:
        text += ("With the default policy an idle thread spins, and when the 2 cores also serve other jobs the "
                 "spinning thread takes the core its partner needs: on this shared machine that is the largest "
                 "effect in the suite. ")
    else:
        text += ("The cores had room enough in this run for the default policy's spinning not to hurt; under load it "
                 "does (70x slower than 1 thread was measured on 2026-11-24 at a load average near 3). ")
    text += ("So `app.py` sets `OMP_WAIT_POLICY=PASSIVE` before torch is imported, unless the caller chose a policy "
             "(`pipelines/zoo.py` cannot: torch is loaded by then); the training jobs it starts inherit it. This suite "
             "sets `PASSIVE` for its own runs the same way.")
    return "\n  ".join(_wrap(text))


def _wrap(text: str, width: int = 116) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def _short(name: str) -> str:
    """"scaled-dot-product attention, 'medium' UNet step (...)" -> "scaled-dot-product attention (medium step)"."""
    base = name.split(" (")[0].split(",")[0].replace("`", "")
    return base + (" (medium step)" if "'medium'" in name else "")


def _verdict(ratio: float) -> str:
    if ratio < 0.9:
        return f"{1 / ratio:.2f}x faster"
    if ratio > 1.1:
        return f"{ratio:.2f}x slower"
    return "no clear effect (within 10 %)"


def section(r: dict[str, Any]) -> str:
    rows = []
    for x in r["rows"]:
        note = ""
        if "predicted" in x:
            note = f"FLOPs: {x['predicted']:.2f}"
        if "compile_s" in x:
            be = x.get("break_even")
            note = (f"compiling costs {x['compile_s']:.0f} s at a first start ({x.get('warm_compile_s', 0):.0f} s with "
                    f"its cache on disk); pays off after {be:.0f} pictures" if be else
                    f"compiling costs {x['compile_s']:.0f} s and saves nothing")
            note += f"; pictures differ by at most {x['max_pixel_difference']:.0f}/255"
        rows.append([x["name"], f"{x['before']}: {x['before_s']:.3f} s", f"{x['after']}: {x['after_s']:.3f} s",
                     f"**{x['ratio']:.2f}**", note])
    t = r["threads"]
    over = [1.0, t["default_over_one"], t["passive_over_one"]]
    trows = [[n, f"{s:.2f} s", f"{o:.2f}"] for (n, s), o in zip(t["medians"].items(), over)]
    verdicts = "; ".join(f"{_short(x['name'])}: {_verdict(x['ratio'])}" for x in r["rows"])
    comp = next((x for x in r["rows"] if "compile_s" in x), None)
    compile_cost = (f"{comp['compile_s']:.0f} s at a first start ({comp.get('warm_compile_s', 0):.0f} s once its cache "
                    "is on disk)" if comp else "minutes at a first start")
    compile_note = "" if r["compile"] else "\n- `torch.compile`: not run in quick mode (compiling takes minutes here)."
    return f"""## {TITLE}

{common.header(r, COMMAND)}

Each optimisation against its absence, interleaved in the same run; the ratio is after / before (below 1: faster),
the median of paired ratios. The composition: the demo family, 64 px, 4 references, {r['steps']} steps with guidance.

{common.table(["optimisation", "before", "after", "after / before", "notes"], rows)}

CPU threads and OpenMP's wait policy, one worker process each (the policy is read when OpenMP starts), the same
composition ({t.get('steps', r['steps'])} steps), interleaved:

{common.table(["setting", "median composition", "over 1 thread (paired)"], trows)}

What follows from them:

{_threads_text(t, r)}
- Shared reference features and the feature cache are already on (the pipeline's design); the figures above are
  what they save.
- In this run: {verdicts}.
- SDPA (`AttnProcessor2_0`) is diffusers' default already (it matters at SD 1.5's head sizes more than at the demo
  family's), and the cross-attentions call `F.scaled_dot_product_attention` directly. Channels-last is not made a
  default: no clear win on this CPU (a change within 10 % is not told apart from the shared machine's noise).
  `torch.compile` is not applied by default: it costs {compile_cost}, which the first picture would wait for, and
  compiles again for every new batch size or picture size a user asks for; a long session of one size would gain
  what the ratio above says.{compile_note}

The `sd15` family on a GPU (no GPU here; expected memory from the anchors, see the memory section):

- **fp16** (the zoo's default on CUDA, `pipelines.zoo.pick_device`) halves weights and activations against fp32;
  **bf16** takes the same memory with fp32's range (no overflow in the VAE at 512 px and above) on Ampere and later.
- **Model CPU offload** (`pipe.enable_model_cpu_offload()`) keeps one model on the GPU at a time: the peak becomes
  the largest model (the UNet, 1.7 GB in fp16) plus its activations, plus RetriNet, which stays on the GPU
  (`_exclude_from_cpu_offload`): its cross-attentions run inside the UNet's forward (hooks) and cached features
  skip its own forward, so an offload hook would leave them on the CPU. The hooks are tested on the CPU (no GPU here).
- **VAE tiling** (`pipe.vae.enable_tiling()`) bounds the VAE's activations for pictures above 512 px; at 512 px the
  larger VAE cost is encoding the N references in one batch, which **VAE slicing** (`pipe.vae.enable_slicing()`,
  one picture at a time) cuts by N."""


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        common.cli(sys.modules[__name__])
