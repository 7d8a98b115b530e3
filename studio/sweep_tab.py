"""The Sweep tab: guidance x retrieval scale grids, generated and scored live (``studio.sweep``).

It reads the Compose tab's references and prompt (RetriNet) or the Variations tab's picture
(Semantica). The grid, the table, the SWD curve and the CLIP-I / CLIP-T scatter redraw after every
cell; the best cell by the chosen measure is starred; Stop keeps what is done, and the CSV is
always the table shown. Client endpoint: ``/sweep`` (a flat signature -> the table).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from studio.compose_tab import api_numbers, pair_concepts
from studio.engine import CHOICES, MAX_STEPS, Engine
from studio.sweep import (
    COLUMNS,
    DEFAULT_BEST,
    MAX_SEEDS,
    METRICS,
    SWD_PAIRS,
    Sweep,
    SweepRequest,
    export_folder,
    label,
    plan,
    write_csv,
)

MODEL_CHOICES = [("RetriNet: the Compose tab's references and prompt", "retrinet"),
                 ("Semantica: the Variations tab's picture", "semantica")]
MEASURES = [*SWD_PAIRS, *METRICS]


def table(sweep: Sweep) -> pd.DataFrame:
    """The sweep's rows (``COLUMNS``) and a "best" column starring the best cell."""
    best = sweep.best()
    rows = [{"best": "★" if best is not None and c.index == best.index else "", **c.row()} for c in sweep.done]
    df = pd.DataFrame(rows, columns=["best", *COLUMNS])
    if sweep.request.model == "semantica":
        df = df.drop(columns=["retrieval scale"])
    return df.round(4)


def curve(sweep: Sweep):
    """The chosen measure against the retrieval scale (RetriNet; one line per guidance) or the guidance
    (Semantica), the best cell ringed: a matplotlib figure (``gr.Plot``)."""
    fig, ax = _figure()
    metric, best = sweep.best_by, sweep.best()
    done = [c for c in sweep.done if c.summary.get(metric) is not None]
    if sweep.request.model == "retrinet":
        for g in sorted({c.guidance for c in done}):
            line = sorted((c.retrieval_scale, c.summary[metric]) for c in done if c.guidance == g)
            ax.plot(*zip(*line), marker="o", label=f"guidance {g:g}")
        ax.set_xlabel("retrieval scale")
    else:
        ax.plot([c.guidance for c in done], [c.summary[metric] for c in done], marker="o", label="Semantica")
        ax.set_xlabel("guidance w")
    if best is not None and best.summary.get(metric) is not None:
        x = best.retrieval_scale if sweep.request.model == "retrinet" else best.guidance
        ax.scatter([x], [best.summary[metric]], s=180, facecolors="none", edgecolors="crimson", linewidths=2,
                   label="best", zorder=3)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}, {len(done)} of {len(sweep.cells)} cells", fontsize=10)
    if done:
        ax.legend(fontsize=8)
    return _close(fig)


def scatter(sweep: Sweep):
    """One point per cell: mean CLIP-I against mean CLIP-T (seed 000, Fig. 6's reading)."""
    fig, ax = _figure()
    done = [c for c in sweep.done if c.summary.get("CLIP-I") is not None and c.summary.get("CLIP-T") is not None]
    for c in done:
        ax.scatter(c.summary["CLIP-I"], c.summary["CLIP-T"], s=30)
        ax.annotate(label(c), (c.summary["CLIP-I"], c.summary["CLIP-T"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("CLIP-I (references)")
    ax.set_ylabel("CLIP-T (prompt)")
    ax.set_title("CLIP-I against CLIP-T by cell" if done else "CLIP-T needs a prompt", fontsize=10)
    return _close(fig)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.2), dpi=100)
    ax.grid(alpha=0.3)
    return fig, ax


def _close(fig):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    plt.close(fig)  # gr.Plot draws a closed figure; pyplot keeps no reference to it
    return fig


def status(sweep: Sweep, stopped: bool = False) -> str:
    done, total = len(sweep.done), len(sweep.cells)
    head = "Stopped" if stopped else ("Done" if done == total else "Running")
    text = f"**{head}: {done} of {total} cells** ({sweep.request.seeds} pictures each, seeds from {sweep.seed})."
    best = sweep.best()
    if best is not None:
        text += f" Best by {sweep.best_by}: **{label(best)}** ({best.summary[sweep.best_by]:.4f})."
    if sweep.cache.get("hits") or sweep.cache.get("misses"):
        total_reads = sweep.cache["hits"] + sweep.cache["misses"]
        text += f" Retrieval features: {sweep.cache['hits']} of {total_reads} reads from the cache."
    text += f" VQA: {sweep.vqa}."
    return text


def _request(model: str, items: list[dict] | None, prompt: str, negative: str, picture: str | None,
             guidance: str, scales: str, seeds: float, steps: float, seed: float, best_by: str | None) -> SweepRequest:
    refs = [(it["card"].picture, it["concept"]) for it in items or []]
    return SweepRequest(model=model, guidance=guidance, retrieval_scales=scales, seeds=seeds, seed=seed, steps=steps,
                        prompt=prompt or "", negative_prompt=negative or "", references=refs, image=picture,
                        best_by=best_by or None)


def _plan(engine: Engine, req: SweepRequest):
    try:
        return plan(engine, req)
    except ValueError as e:  # MissingModel included
        raise gr.Error(str(e)) from e


def _gallery(sweep: Sweep, folder: Path) -> list[tuple[str, str]]:
    out = []
    for c in sweep.done:
        for k, p in enumerate(c.pictures):
            path = folder / f"cell{c.index + 1:02d}-{k}.png"
            if not path.exists():
                p.save(path)
            out.append((str(path), f"{label(c)}, seed {p.seed}"))
    return out


_STOPS: dict[str, threading.Event] = {}  # the running sweep of each browser session, and its Stop
_STOPS_LOCK = threading.Lock()


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def run_sweep(engine: Engine, model: str, items: list[dict] | None, prompt: str, negative: str, picture: str | None,
              guidance: str, scales: str, seeds: float, steps: float, seed: float, best_by: str | None,
              request: gr.Request = None, progress=gr.Progress()) -> Iterator[tuple[Any, ...]]:  # noqa: B008
    """The Run button: yields (status, gallery, table, curve, scatter, CSV) after every cell. Stop (``stop_sweep``
    from the same session) ends the sweep after the cell being made, and the last update says so."""
    sweep, runner = _plan(engine, _request(model, items, prompt, negative, picture, guidance, scales, seeds, steps,
                                           seed, best_by))
    folder = export_folder()
    csv_path = folder / "sweep.csv"
    stop, key = threading.Event(), _session(request)
    with _STOPS_LOCK:
        _STOPS[key] = stop
    outputs = (status(sweep), [], table(sweep), None, None, None)
    yield outputs
    try:
        for _ in runner(stop, lambda done, total: progress((done, total), desc="Sweeping")):
            write_csv(sweep.rows(), csv_path)
            outputs = (status(sweep), _gallery(sweep, folder), table(sweep), curve(sweep), scatter(sweep),
                       str(csv_path))
            yield outputs
        if stop.is_set():
            yield (status(sweep, stopped=True), *outputs[1:])
    except ValueError as e:
        raise gr.Error(str(e)) from e
    finally:
        stop.set()  # the generator closed (the page went away): no cell starts after this
        with _STOPS_LOCK:
            if _STOPS.get(key) is stop:
                del _STOPS[key]


def stop_sweep(request: gr.Request = None) -> None:
    """The Stop button: the session's sweep stops after its current cell and keeps what is done."""
    with _STOPS_LOCK:
        stop = _STOPS.get(_session(request))
    if stop is not None:
        stop.set()


def sweep_api(engine: Engine, model: str, prompt: str, files: list[str] | None, concepts: list[str] | str | None,
              picture: str | None, guidance: str, scales: str, seeds: float, steps: float, seed: float,
              negative: str = "", best_by: str | None = None) -> Iterator[pd.DataFrame]:
    """``/sweep``: the table, one row per cell, updated after every cell (its last value: the whole sweep)."""
    files, concepts = pair_concepts(files, concepts) if model == "retrinet" else ([], [])
    req = SweepRequest(model=model or "retrinet", guidance=guidance, retrieval_scales=scales, seeds=seeds, seed=seed,
                       steps=steps, prompt=prompt or "", negative_prompt=negative or "",
                       references=list(zip(files, concepts)), image=picture, best_by=best_by or None)
    sweep, runner = _plan(engine, req)
    try:
        for _ in runner():
            yield table(sweep)
    except ValueError as e:
        raise gr.Error(str(e)) from e


def build(engine: Engine, demo: gr.Blocks, compose: dict[str, Any], variations: dict[str, Any]) -> None:
    """``compose``: the Compose tab's ``items``, ``prompt``, ``negative``; ``variations``: its ``picture``."""
    with gr.Tab("Sweep", id="sweep"):
        gr.Markdown("Sweep guidance and retrieval scale over the **Compose** tab's references and prompt (RetriNet), "
                    "or guidance over the **Variations** tab's picture (Semantica). Every cell is scored as it "
                    "arrives: CLIP-I, CLIP-T, face distance (DF-L2), the VQA score and Similarity Weighted "
                    "Diversity, which finds the balanced setting where averages of CLIP-I and CLIP-T mislead.")
        with gr.Row():
            with gr.Column(scale=4):
                model = gr.Radio(MODEL_CHOICES, value="retrinet", label="Sweep", elem_id="sweep-model")
                guidance = gr.Textbox("3, 5, 7", label="Guidance values", elem_id="sweep-guidance",
                                      info="numbers separated by commas")
                scales = gr.Textbox("0.5, 1, 1.5", label="Retrieval scale values (RetriNet)", elem_id="sweep-scales")
                with gr.Row():
                    seeds = gr.Slider(1, MAX_SEEDS, value=2, step=1, label="Seeds per cell", elem_id="sweep-seeds")
                    steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps", elem_id="sweep-steps")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="First seed (-1: a random one)", elem_id="sweep-seed")
                    best_by = gr.Dropdown(MEASURES, value=DEFAULT_BEST["retrinet"], label="Best cell by",
                                          elem_id="sweep-best-by")
                with gr.Row():
                    run_btn = gr.Button("Run sweep", variant="primary", elem_id="sweep-run")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="sweep-stop")
                summary = gr.Markdown("*No sweep yet.*", elem_id="sweep-status")
                csv_file = gr.File(label="Table as CSV", elem_id="sweep-csv")
            with gr.Column(scale=6):
                grid = gr.Gallery(label="Pictures by cell", columns=4, height=380, object_fit="contain", format="png",
                                  elem_id="sweep-gallery")
                with gr.Row():
                    swd_plot = gr.Plot(label="SWD against scale", show_label=False, format="png",
                                       elem_id="sweep-swd-plot")
                    clip_plot = gr.Plot(label="CLIP-I against CLIP-T", show_label=False, format="png",
                                        elem_id="sweep-clip-plot")
        results = gr.Dataframe(headers=["best", *COLUMNS], label="Scores by cell", interactive=False, wrap=True,
                               elem_id="sweep-table")

        # client endpoint, with no widget of its own: /sweep
        with gr.Group(visible=False):
            api_files = gr.File(file_count="multiple", label="Reference pictures")
            api_concepts = gr.Dropdown(list(CHOICES), multiselect=True, allow_custom_value=True, label="Concepts")
            api_picture = gr.File(type="filepath", label="Picture (Semantica)")
            api = api_numbers()
            api_seeds, api_guidance, api_scales = gr.Number(2, label="Seeds per cell"), gr.Textbox("3, 5, 7"), \
                gr.Textbox("0.5, 1, 1.5")
            api_model, api_best = gr.Textbox("retrinet", label="Model"), gr.Textbox("", label="Best cell by")
            api_btn = gr.Button("sweep")

        model.change(lambda m: (gr.Textbox(interactive=m == "retrinet"), gr.Dropdown(value=DEFAULT_BEST[m])),
                     model, [scales, best_by], api_visibility="private")
        def run(model: str, items: list[dict] | None, prompt: str, negative: str, picture: str | None, guidance: str,
                scales: str, seeds: float, steps: float, seed: float, best_by: str | None, request: gr.Request,
                progress=gr.Progress()):  # noqa: B008 (a function of its own: Gradio sees the gr.Request here)
            yield from run_sweep(engine, model, items, prompt, negative, picture, guidance, scales, seeds, steps, seed,
                                 best_by, request=request, progress=progress)

        run_btn.click(
            run,
            [model, compose["items"], compose["prompt"], compose["negative"], variations["picture"], guidance, scales,
             seeds, steps, seed, best_by],
            [summary, grid, results, swd_plot, clip_plot, csv_file], api_visibility="private",
            concurrency_id="generate")
        stop_btn.click(stop_sweep, None, None, api_visibility="private", concurrency_limit=None)
        api_btn.click(partial(sweep_api, engine),
                      [api_model, api["prompt"], api_files, api_concepts, api_picture, api_guidance, api_scales,
                       api_seeds, api["steps"], api["seed"], api["negative"], api_best],
                      results, api_name="sweep", concurrency_id="generate")
