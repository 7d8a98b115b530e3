"""Training throughput on this CPU: samples per second of a demo-size RetriNet run under
``accelerate launch`` with 1 and 2 processes, and the scaling efficiency sps(2) / (2 sps(1)).

    python -m benchmarks.training [--quick]

The run is the demo family's RetriNet stage at its real shapes (``assets/demo-zoo/retrinet`` as
the base model, 64 px, N = 4 references, multitask, setting b, fp32) on a fresh Toybooru, with
every step logged; a run's rate is the median of its steps' ``samples_per_second`` after the first
two (start-up). Three launches, interleaved in rounds: 1 process x 1 thread, 2 processes x 1 thread
(data parallel over gloo, ``training.core.make_accelerator``), and 1 process x 2 threads (the other
way of using both cores). The peak resident memory of the workers is sampled on the way.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "training"
TITLE = "Training throughput"
COMMAND = "python -m benchmarks.training"
DEMO_BASE = common.ROOT / "assets" / "demo-zoo" / "retrinet"
VARIANTS = {"1x1": (1, 1), "2x1": (2, 1), "1x2": (1, 2)}  # processes x threads per process


def command(processes: int, threads: int, data: Path, out: Path, steps: int, batch: int) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--num_cpu_threads_per_process", str(threads)]
    if processes > 1:
        launch.append("--multi_gpu")
    return [*launch, "-m", "training.train_retrinet", "--pretrained", str(DEMO_BASE), "--data", str(data),
            "--output-dir", str(out), "--task", "multitask", "--setting", "b", "--num-references", "4",
            "--resolution", "64", "--retrieval-attention-heads", "4", "--train-batch-size", str(batch),
            "--gradient-accumulation-steps", "1", "--max-train-steps", str(steps), "--checkpointing-steps",
            "1000000", "--logging-steps", "1", "--learning-rate", "1e-4", "--seed", "0", "--mixed-precision", "no"]


def launch(processes: int, threads: int, data: Path, out: Path, steps: int, batch: int) -> dict[str, Any]:
    """One training run; its samples/s (median after the first two steps) and its workers' peak memory."""
    from training.core import read_metrics

    cmd = command(processes, threads, data, out, steps, batch)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=common.ROOT, env=common.env(OMP_NUM_THREADS=str(threads)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with common.RssPoller(proc.pid, interval=0.2) as poll:
        _, err = proc.communicate(timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"training run failed ({' '.join(cmd[:12])} ...):\n{err[-3000:]}")
    rates = [r["samples_per_second"] for r in read_metrics(out / "metrics.jsonl")]
    steady = rates[2:] or rates
    workers = {pid: rss for pid, rss in poll.per_pid.items() if pid != proc.pid}
    return {"processes": processes, "threads": threads, "sps": statistics.median(steady), "steps": len(rates),
            "wall_s": wall, "peak_worker_rss": max(workers.values(), default=poll.peak_single),
            "peak_total_rss": poll.peak_total}


def bench(quick: bool = False, rounds: int | None = None) -> dict[str, Any]:
    from training.data.toybooru import generate

    steps, batch = (3, 4) if quick else (24, 8)
    rounds = rounds or 1
    variants = ("1x1", "2x1") if quick else tuple(VARIANTS)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = generate(Path(tmp) / "toybooru", 60 if quick else 240, seed=0, size=64)
        k = 0
        for r in range(rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                p, t = VARIANTS[v]
                k += 1
                runs[v].append(launch(p, t, data, Path(tmp) / f"run{k}", steps, batch))
                print(f"{v}: {runs[v][-1]['sps']:.1f} samples/s, peak {runs[v][-1]['peak_worker_rss'] / common.MB:.0f} "
                      f"MB per worker", file=sys.stderr)
    sps = {v: statistics.median(x["sps"] for x in runs[v]) for v in variants}
    eff = sps["2x1"] / (2 * sps["1x1"])
    out = {"steps": steps, "batch": batch, "runs": runs, "sps": sps, "efficiency": eff,
           "peak_worker_rss": max(x["peak_worker_rss"] for v in variants for x in runs[v]),
           "peak_rss_1x1": max(x["peak_worker_rss"] for x in runs["1x1"]),
           "peak_total_rss_1x1": max(x["peak_total_rss"] for x in runs["1x1"])}
    out["summary"] = [common.summary(
        "training scaling efficiency, 2 processes over 1 (demo RetriNet, 1 thread each)", f"{eff:.2f}",
        "1.0 (linear); at least 0.8", eff >= 0.8,
        "" if eff >= 0.8 else "the 2 cores are shared with other jobs, so a second process mostly takes turns with "
        "the first, and each step all-reduces the gradients over gloo")]
    if "1x2" in sps:
        out["thread_vs_process"] = sps["1x2"] / sps["2x1"]
    return out


def section(r: dict[str, Any]) -> str:
    names = {"1x1": "1 process x 1 thread", "2x1": "2 processes x 1 thread", "1x2": "1 process x 2 threads"}
    rows = [[names[v], f"{r['sps'][v]:.1f}", f"{r['batch'] * VARIANTS[v][0]}",
             f"{max(x['peak_worker_rss'] for x in r['runs'][v]) / common.MB:.0f} MB",
             ", ".join(f"{x['wall_s']:.0f} s" for x in r["runs"][v])] for v in r["sps"]]
    extra = ""
    if "thread_vs_process" in r:
        extra = (f"\n- Two threads in one process give {r['thread_vs_process']:.2f}x the samples/s of two processes "
                 f"of one thread.")
    return f"""## {TITLE}

{common.header(r, COMMAND)}

The demo RetriNet stage at its real shapes (64 px, N = 4, multitask, setting b, fp32), {r['batch']} samples per process
per step, {r['steps']} steps per run, under `accelerate launch` (2 processes: `--multi_gpu`, data parallel over gloo);
samples/s is the median of the logged steps after the first two.

{common.table(["launch", "samples/s", "samples per step", "peak memory per worker", "wall time per run"], rows)}

- Scaling efficiency sps(2) / (2 sps(1)): **{r['efficiency']:.2f}** (1 would be linear).{extra}
- The demo family's own build (`assets/demo-zoo/manifest.json`) trained RetriNet at about 8 samples/s with
  16 per step while other stages ran beside it."""


if __name__ == "__main__":
    common.cli(sys.modules[__name__])
