"""What the benchmarks share: the machine's description, interleaved A/B timing, memory readings,
an activation-memory counter that works on the meta device, and small Markdown helpers.

This machine is shared (a training job and other people's tests run beside the benchmarks), so
every timing figure is a ratio of two things timed in the same run, with their repetitions
interleaved (A B B A ...) and the median of the per-round ratios kept.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GB = 1 << 30
MB = 1 << 20


# ---------------------------------------------------------------------- the machine

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model, cores, torch (and diffusers) version, torch threads, load average, date."""
    import torch

    try:
        import diffusers

        dv = diffusers.__version__
    except ImportError:  # pragma: no cover
        dv = "-"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "diffusers": dv,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "load": round(load[0], 2), "date": _dt.date.today().isoformat()}


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['date']}, {m['cpu']} ({m['cores']} cores), torch {m['torch']}, diffusers {m['diffusers']}; "
            f"load average {m['load']} when it started")


# ---------------------------------------------------------------------- timing

def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(variants: dict[str, Callable[[], Any]], rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Run every variant once per round, the order rotated each round (A B C, B C A, ...), so that a
    change in the machine's load falls on all of them alike; returns the seconds of each run."""
    names = list(variants)
    if warmup:
        for n in names:
            variants[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2:
            order = order[::-1]
        for n in order:
            times[n].append(timed(variants[n]))
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of time(a) / time(b) (a paired ratio: each round's load cancels)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def median(xs) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------------- memory of processes

def rss_tree(pid: int) -> tuple[int, int]:
    """(sum of the resident memory of ``pid`` and its descendants, the largest of them), in bytes."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    sizes = []
    for q in procs:
        try:
            sizes.append(q.memory_info().rss)
        except psutil.Error:
            pass
    return sum(sizes), max(sizes, default=0)


def peak_rss(pid: int) -> int:
    """The peak resident memory of a live process (``VmHWM``), in bytes; 0 if it is unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssPoller:
    """Samples the resident memory of a process tree every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.1):
        import threading

        self.pid, self.interval = pid, interval
        self.peak_total = self.peak_single = 0
        self.per_pid: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = 0
            for q in procs:
                try:
                    rss = q.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.per_pid[q.pid] = max(self.per_pid.get(q.pid, 0), rss)
                self.peak_single = max(self.peak_single, rss)
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------- activation memory, counted

def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """Scaled-dot-product attention by the fused kernel on every device (the meta device would
    otherwise take the math path and materialise the attention matrix, which a GPU's flash or
    memory-efficient kernel never holds)."""
    import torch

    if attn_mask is not None:  # the fused CPU kernel takes no mask: the math path, as torch would
        return _ORIGINAL_SDPA[0](q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)[0]


_ORIGINAL_SDPA: list = []


class LiveTensors:
    """Counts the bytes of tensor storages made by operators while it is active, as they live and
    die, and keeps the peak: the activation memory of a forward (and backward) pass, parameters
    and inputs excluded. Works on the meta device, so SD 1.5 shapes cost no compute and no memory.

    Storages are followed through the Python tensors that hold them and through autograd's saved
    tensors (``saved_tensors_hooks``), so what the backward pass keeps is counted until it is freed.
    """

    def __init__(self):
        self.refs: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.live = self.peak = 0

    def add(self, t) -> int:
        s = t.untyped_storage()
        key = s._cdata
        if key not in self.refs:
            self.refs[key] = 0
            self.size[key] = s.nbytes()
            self.live += self.size[key]
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        return key

    def release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.size.pop(key)
            del self.refs[key]

    def reset_peak(self) -> None:
        self.peak = self.live


@contextlib.contextmanager
def count_activations(fused_attention: bool = True) -> Iterator[LiveTensors]:
    """``with count_activations() as c: ...``; then ``c.peak`` is the most bytes alive at once.

    ``fused_attention``: attention as a fused kernel (torch 2's SDPA on a GPU); False: the math path
    (the attention matrix is made and kept for the backward pass, as before SDPA and xformers)."""
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    counter = LiveTensors()

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args, kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    weakref.finalize(t, counter.release, counter.add(t))
            return out

    class Held:
        __slots__ = ("__weakref__", "t")

        def __init__(self, t):
            self.t = t

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in counter.refs:
            return t  # a parameter or an input: not an activation
        counter.refs[key] += 1
        h = Held(t)
        weakref.finalize(h, counter.release, key)
        return h

    def unpack(h):
        return h.t if isinstance(h, Held) else h

    _ORIGINAL_SDPA[:] = [F.scaled_dot_product_attention]
    if fused_attention:
        F.scaled_dot_product_attention = _flash_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack), Mode():
            yield counter
    finally:
        F.scaled_dot_product_attention = _ORIGINAL_SDPA[0]


def flop_mapping() -> dict:
    """FLOP formulas ``torch.utils.flop_counter`` lacks: the CPU's fused attention kernel (without
    them, attention counts 0 FLOPs on the CPU while the meta device's math path counts it)."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` with attention counted on every device (see ``flop_mapping``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------------- subprocesses

def env(**extra: str) -> dict[str, str]:
    """The environment for benchmark subprocesses: offline, no analytics, the repository importable."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "YOLO_OFFLINE": "1",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    e.update(extra)
    return e


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_floor(modules: str = "torch, diffusers, transformers, gradio") -> float:
    """Seconds a fresh Python takes to import ``modules``: the floor of any start-up."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {modules}"], check=True, env=env(), cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------- Markdown

def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(x):
        return "-" if x is None else str(x)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f} %"


def gb(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x / GB:.{digits}f} GB"


def summary(figure: str, value: str, goal: str, met: bool | None, why: str = "") -> dict[str, Any]:
    """One line of BENCHMARKS.md's table of figures against their goals (``met`` None: no goal, an anchor)."""
    return {"figure": figure, "value": value, "goal": goal, "met": met, "why": why}


def header(result: dict[str, Any], command: str) -> str:
    """The line under a section's title: the command, the machine, the date, quick or not."""
    m = result.get("machine") or {}
    quick = " **Quick mode** (smaller sizes, for CI: not the published figures)." if result.get("quick") else ""
    return f"`{command}` ({machine_line(m)}; {result.get('seconds', 0):.0f} s).{quick}" if m else f"`{command}`"


def run(bench: Callable[..., dict[str, Any]], quick: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Call a benchmark's ``bench`` and stamp its result with the machine, the mode and its wall time."""
    import torch

    threads = torch.get_num_threads()
    m = machine()
    t0 = time.perf_counter()
    try:
        result = bench(quick=quick, **kwargs)
    finally:
        torch.set_num_threads(threads)
    result.setdefault("summary", [])
    result.update(machine=m, quick=quick, seconds=time.perf_counter() - t0)
    return result


def cli(module, argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m benchmarks.NAME [--quick] [options]``: run one benchmark and print its section.

    A module's ``arguments(parser)`` may add options; they reach its ``bench`` as keyword arguments."""
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{module.NAME}", description=module.__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the small sizes CI runs (not the published figures)")
    if hasattr(module, "arguments"):
        module.arguments(p)
    args = vars(p.parse_args(argv))
    quick = args.pop("quick")
    result = run(module.bench, quick=quick, **{k: v for k, v in args.items() if v is not None})
    print(module.section(result))
    return result
