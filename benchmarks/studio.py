"""The studio as users start it: ``python app.py`` in a subprocess on a free port, timed to a served
page (HTTP 200) and to the first composed picture (``gradio_client``, ``/compose``) on the demo
family, then driven through a sweep (``/sweep``) while its resident memory is watched.

    python -m benchmarks.studio [--quick]

The start is a first start: an empty studio cache (``RETRINET_STUDIO_CACHE``), so the default
Toybooru of the Data tab is drawn, as on a new machine. The start-up is set beside the floor any
Python studio pays, the time a fresh interpreter takes to import torch, diffusers, transformers
and gradio (measured in the same run, before and after); the first picture beside the second
(the first also loads the models). Memory: the server's peak resident set (``VmHWM``) after the
sweep; goal ([11]) at most 2 GB.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "studio"
TITLE = "The studio: start-up, first picture, memory"
COMMAND = "python -m benchmarks.studio"
GOAL_RSS = 2 * common.GB


def _wait_for_page(url: str, proc: subprocess.Popen, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with status {proc.returncode} before serving a page")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter()
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"app.py served no page at {url} within {timeout:.0f} s")


def bench(quick: bool = False) -> dict[str, Any]:
    from gradio_client import Client, handle_file

    from studio.engine import EXAMPLES

    folder = EXAMPLES / "kimara_samasa"
    files = [str(folder / f"{c}.png") for c in ("face", "clothes", "figure")]
    concepts = ["face", "clothes", "figure"]
    guidance, scales, seeds, steps = ("3, 7", "0.5, 1.5", 1, 2) if quick else ("3, 5, 7", "0.5, 1, 1.5", 2, 20)
    floors = [common.import_floor()]
    out: dict[str, Any] = {"sweep": {"guidance": guidance, "scales": scales, "seeds": seeds, "steps": steps},
                           "policy": os.environ.get("OMP_WAIT_POLICY", "OpenMP's default")}
    with tempfile.TemporaryDirectory(prefix="bench-studio-") as tmp:
        port = common.free_port()
        url = f"http://127.0.0.1:{port}/"
        env = common.env(RETRINET_STUDIO_CACHE=str(Path(tmp) / "cache"))
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--workspace", str(Path(tmp) / "ws")],
                                cwd=common.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            with common.RssPoller(proc.pid, interval=0.1) as poll:
                out["page_s"] = _wait_for_page(url, proc) - t0
                out["rss_idle"] = common.rss_tree(proc.pid)[0]
                client = Client(url, verbose=False)
                refs = [handle_file(f) for f in files]
                compose_args = ("1girl, solo, standing, outdoors", refs, concepts, 20, 5.0, 1.0, 0, 1, "", 0, 0)
                t1 = time.perf_counter()
                client.predict(*compose_args, api_name="/compose")
                now = time.perf_counter()
                out["first_picture_s"], out["first_compose_s"] = now - t0, now - t1
                out["second_compose_s"] = common.timed(lambda: client.predict(*compose_args, api_name="/compose"))
                out["rss_after_compose"] = common.rss_tree(proc.pid)[0]
                t2 = time.perf_counter()
                table = client.predict("retrinet", "1girl, solo, standing, outdoors", refs, concepts, None, guidance,
                                       scales, seeds, steps, 0, api_name="/sweep")
                out["sweep_s"] = time.perf_counter() - t2
                out["sweep_rows"] = len(table["data"])
                out["peak_rss"] = max(common.peak_rss(proc.pid), poll.peak_total)
                out["rss_after_sweep"] = common.rss_tree(proc.pid)[0]
        finally:
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        if not quick:
            floors.append(common.import_floor())
    out["import_floor_s"] = statistics.median(floors)
    out["page_over_floor"] = out["page_s"] / out["import_floor_s"]
    out["first_over_second"] = out["first_compose_s"] / out["second_compose_s"]
    ok = out["peak_rss"] <= GOAL_RSS
    cells = f"{guidance.count(',') + 1} x {scales.count(',') + 1}"
    out["summary"] = [
        common.summary("`python app.py` to a served page, over the import floor", f"{out['page_over_floor']:.2f} "
                       f"({out['page_s']:.1f} s)", "anchor: importing torch, diffusers, transformers, gradio "
                       f"({out['import_floor_s']:.1f} s)", None),
        common.summary("`python app.py` to the first composed picture (demo family)", f"{out['first_picture_s']:.1f} s "
                       f"(the first /compose {out['first_over_second']:.1f}x the second)",
                       "anchor: the served page and a warm /compose", None),
        common.summary(f"studio peak resident memory through a {cells} sweep, {seeds} seeds (demo family)",
                       common.gb(out["peak_rss"]), "at most 2 GB", ok,
                       "" if ok else "see the section: what the server holds beside the models"),
    ]
    return out


def section(r: dict[str, Any]) -> str:
    s = r["sweep"]
    cells = f"{s['guidance'].count(',') + 1} x {s['scales'].count(',') + 1}"
    rows = [["served page (HTTP 200) after `python app.py`", f"{r['page_s']:.1f} s",
             f"{r['page_over_floor']:.2f}x the import floor ({r['import_floor_s']:.1f} s)"],
            ["first composed picture (`/compose`, 20 steps, 3 references), from the start",
             f"{r['first_picture_s']:.1f} s", (f"the call itself {r['first_compose_s']:.1f} s, "
                                               f"{r['first_over_second']:.1f}x the second call "
                                               f"({r['second_compose_s']:.1f} s)")],
            [f"`/sweep`, {cells}, {s['seeds']} seeds, {s['steps']} steps ({r['sweep_rows']} rows)", f"{r['sweep_s']:.1f} s",
             ""],
            ["resident memory: idle after start / after the first pictures / after the sweep",
             f"{common.gb(r['rss_idle'])} / {common.gb(r['rss_after_compose'])} / {common.gb(r['rss_after_sweep'])}", ""],
            ["**peak resident memory (VmHWM) through the sweep**", f"**{common.gb(r['peak_rss'])}**", "goal: at most 2 GB"]]
    return f"""## {TITLE}

{common.header(r, COMMAND)}

`python app.py --port P` (demo family, CPU) in a subprocess with an empty studio cache (a first start: the Data
tab's Toybooru is drawn), driven by `gradio_client`; OpenMP wait policy: {r['policy']}.

{common.table(["what", "figure", "against"], rows)}

The start-up is mostly imports (torch, diffusers, transformers, gradio, ultralytics) and building the Blocks; models
load on the first request, which is why the first picture costs more than the second. Idle, before any model is
loaded, the server holds {common.gb(r['rss_idle'])} (the libraries); the demo family's models (RetriNet, CLIP, the
detector, fp32) and the sweep's pictures add {common.gb(r['rss_after_sweep'] - r['rss_idle'])}: the peak is
{r['peak_rss'] / GOAL_RSS:.0%} of the 2 GB goal."""


if __name__ == "__main__":
    common.cli(sys.modules[__name__])
