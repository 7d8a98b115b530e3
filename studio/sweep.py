"""Sweeps: a grid of guidance x retrieval scale, generated and scored cell by cell.

The papers read a sweep by its Similarity Weighted Diversity, not by averages of CLIP-I and CLIP-T
that mislead (seed 000, Sec. 4 and 6.1: IP-Adapter's best scale sits near 0.5; seed 004, App. H
and J: Semantica's guidance). A sweep here is:

- **RetriNet** (the Compose references and prompt): guidance x retrieval scale;
- **Semantica** (a picture from Variations): guidance alone;

with ``seeds`` pictures per cell, the same seeds in every cell so that cells differ only by their
settings. Each cell is scored as it arrives: CLIP-I (against the pictures the model read), CLIP-T
(against the prompt), DF-L2 (face embeddings, ``face_distance``'s definition), the VQA score, and
the SWD pairs of ``training.evaluate.summarise`` (seed 000 Table 2, seed 001 Table 3).

Everything on the reference side is computed once per sweep: the concept cuts, the reference
embeddings for CLIP-I, the reference face and its VQA answers, and RetriNet's retrieval features
(the pipeline's feature cache, [02]: cells of one sweep share timesteps, so every cell after the
first reads them from the cache).

The VQA score needs a VQA model. The ``sd15`` family can name one (InstructBLIP / BLIP-2); without
it (the demo family, offline) the stand-in of ``training.data.vqa.ColorAnswerer`` answers what
colours the character wears, from the clothes the detector cuts: a diversity measure of outfits
only, labelled as such.
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from studio.engine import (
    CHOICES,
    MAX_GUIDANCE,
    MAX_REFERENCES,
    MAX_STEPS,
    Engine,
    Picture,
    Progress,
    _integer,
    _number,
    _picture,
    _run,
    _seeds,
    _size,
    check_prompt,
    resolve_seed,
)
from training.files import replacing_file

MODES = ("retrinet", "semantica")
MAX_VALUES = 8  # values per axis
MAX_CELLS = 36  # cells per sweep
MAX_SEEDS = 8  # pictures per cell
MAX_SCALE = 10.0
METRICS = ("CLIP-I", "CLIP-T", "DF-L2", "VQA")
SWD_PAIRS = ("SWD(VQA, CLIP-I)", "SWD(VQA, CLIP-T)", "SWD(CLIP-I, CLIP-T)", "SWD(CLIP-T, DF-L2)", "SWD(VQA, DF-L2)")
# what picks the best cell by default: RetriNet balances the references (CLIP-I) against the prompt
# (CLIP-T); Semantica has no prompt, and balances diversity (VQA) against similarity (CLIP-I)
DEFAULT_BEST = {"retrinet": "SWD(CLIP-I, CLIP-T)", "semantica": "SWD(VQA, CLIP-I)"}
COLUMNS = ("cell", "guidance", "retrieval scale", "pictures", *METRICS, *SWD_PAIRS, "seconds")


def parse_values(what: str, values: Any, low: float, high: float) -> list[float]:
    """Axis values typed by the user: "3, 5, 7" (commas or spaces) or a list of numbers; unique, in order."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, str):
        parts = [p for p in re.split(r"[,\s;]+", values.strip()) if p]
        out = []
        for p in parts:
            try:
                out.append(float(p))
            except ValueError:
                raise ValueError(f"{what}: {p!r} is not a number; type numbers separated by commas") from None
        values = out
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{what}: give at least one value, e.g. '3, 5, 7'")
    seen: list[float] = []
    for v in values:
        x = _number(what, v, low, high)
        if x not in seen:
            seen.append(x)
    if len(seen) > MAX_VALUES:
        raise ValueError(f"{what}: {len(seen)} values, at most {MAX_VALUES}")
    return seen


@dataclass(frozen=True)
class SweepRequest:
    """A sweep of ``model`` ("retrinet": guidance x retrieval scale over ``references`` and ``prompt``;
    "semantica": guidance over ``image``), ``seeds`` pictures per cell from seeds ``seed``, ``seed + 1``..."""

    model: str = "retrinet"
    guidance: Any = "3, 5, 7"  # values: "3, 5, 7" or a list
    retrieval_scales: Any = "0.5, 1.0"  # RetriNet only
    seeds: int = 2
    seed: int | str = 0
    steps: int = 20
    prompt: str = ""
    negative_prompt: str = ""
    references: Sequence[tuple[Any, str]] = ()  # RetriNet: (picture, choice)
    image: Any = None  # Semantica: the picture to vary
    width: int | None = None
    height: int | None = None
    best_by: str | None = None  # the measure that picks the best cell; None: DEFAULT_BEST[model]


@dataclass
class SweepCell:
    """One cell: its settings, its pictures, one score dict per picture and the cell's summary."""

    index: int
    guidance: float
    retrieval_scale: float | None
    pictures: list[Picture]
    scores: list[dict[str, float | None]]
    summary: dict[str, float | None]
    seconds: float

    def row(self) -> dict[str, Any]:
        """The cell's line of the sweep table (``COLUMNS``)."""
        return {"cell": self.index + 1, "guidance": self.guidance, "retrieval scale": self.retrieval_scale,
                "pictures": len(self.pictures), **{k: self.summary.get(k) for k in (*METRICS, *SWD_PAIRS)},
                "seconds": round(self.seconds, 3)}


@dataclass
class Sweep:
    """A sweep's plan (its cells' settings) and what has been done so far."""

    request: SweepRequest
    cells: list[tuple[float, float | None]]  # (guidance, retrieval scale) in the order they run
    seed: int
    vqa: str  # which VQA answers the score: "colour stand-in" or a model id
    best_by: str = ""  # the measure that picks the best cell
    done: list[SweepCell] = field(default_factory=list)
    cache: dict[str, int] = field(default_factory=dict)  # retrieval feature cache hits / misses during the sweep

    def rows(self) -> list[dict[str, Any]]:
        return [c.row() for c in self.done]

    def best(self, metric: str | None = None) -> SweepCell | None:
        """The done cell with the highest ``metric`` (an SWD pair, CLIP-I or CLIP-T; DF-L2: the lowest)."""
        metric = metric or self.best_by
        scored = [c for c in self.done if c.summary.get(metric) is not None]
        if not scored:
            return None
        sign = -1.0 if metric == "DF-L2" else 1.0
        return max(scored, key=lambda c: sign * c.summary[metric])


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """The sweep table as CSV (written beside ``path``, then renamed: never half a file)."""
    path = Path(path)
    with replacing_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r.get(k) for k in COLUMNS})
    return path


class _Scorer:
    """Scores the pictures of one sweep; everything about the references is computed once."""

    def __init__(self, engine: Engine, model_pictures: list[Image.Image], prompt: str,
                 face_source: Image.Image, clothes_source: Image.Image):
        self.engine, self.prompt = engine, prompt
        self.clip = engine._model("clip")
        self.ref_embeds = self.clip.image_embeds(model_pictures)  # CLIP-I: against what the model read
        self.text_embed = self.clip.text_embeds([prompt]) if prompt.strip() else None
        self.extractor = engine._model("extractor")
        ref_face = engine._extract(face_source).face
        self.ref_face = None if ref_face is None else self.clip.image_embeds([ref_face])
        self.answerer, self.questions, self.vqa = _answerer(engine)
        self.ref_answers = self._answers(clothes_source)

    def _answers(self, image: Image.Image) -> list[str] | None:
        if self.answerer is None:
            return None
        from training.data.vqa import ColorAnswerer

        if isinstance(self.answerer, ColorAnswerer):
            crops = self.engine._extract(image)
            return self.answerer.answer(crops.clothes or crops.figure, self.questions, face=crops.face)
        return self.answerer.answer(image, self.questions)

    def __call__(self, images: list[Image.Image]) -> list[dict[str, float | None]]:
        from pipelines.metrics import vqa_score

        g = self.clip.image_embeds(images)
        clip_i = (g @ self.ref_embeds.T).mean(-1).tolist()
        clip_t = (g @ self.text_embed.T).squeeze(-1).tolist() if self.text_embed is not None else [None] * len(images)
        df = [None] * len(images)
        if self.ref_face is not None:
            faces = [self.engine._extract(im).face for im in images]
            found = [i for i, f in enumerate(faces) if f is not None]
            if found:
                e = self.clip.image_embeds([faces[i] for i in found])
                for i, d in zip(found, (e - self.ref_face).norm(dim=-1).tolist()):
                    df[i] = d
        vqa: list[float | None] = [None] * len(images)
        if self.ref_answers is not None:
            answers = [self._answers(im) for im in images]
            vqa = vqa_score(answers, [self.ref_answers] * len(images), self.clip.text_embeds).tolist()
        return [{"CLIP-I": a, "CLIP-T": b, "DF-L2": c, "VQA": d} for a, b, c, d in zip(clip_i, clip_t, df, vqa)]


def _answerer(engine: Engine):
    """(answerer, questions, label): the family's VQA model when it names one, else the colour stand-in."""
    from pipelines.metrics import VQA_QUESTIONS
    from training.data.vqa import CLOTHES_QUESTION, ColorAnswerer

    vqa_id = getattr(engine.models.spec, "vqa", None)
    if vqa_id:
        from training.data.vqa import InstructBlipAnswerer

        answerer = engine.models._get("vqa", lambda: InstructBlipAnswerer.from_pretrained(vqa_id,
                                                                                          device=engine.models.device))
        return answerer, VQA_QUESTIONS, vqa_id
    return ColorAnswerer(), (CLOTHES_QUESTION,), "colour stand-in"


def _summary(scores: list[dict[str, float | None]]) -> dict[str, float | None]:
    from training.evaluate import summarise

    rows = [{"clip_i": s["CLIP-I"], "clip_t": s["CLIP-T"], "df_l2": s["DF-L2"], "vqa": s["VQA"]} for s in scores]
    out = summarise(rows)
    out.pop("pictures", None)
    return out


def plan(engine: Engine, req: SweepRequest) -> tuple[Sweep, Callable[[], Iterator[SweepCell]]]:
    """Check ``req`` (every error before any picture is made) and return the sweep and its runner.

    The runner yields one ``SweepCell`` at a time, in ``sweep.cells`` order, appending each to
    ``sweep.done``; stop iterating (or set the ``stop`` event given to ``run``) to stop after a cell.
    """
    if req.model not in MODES:
        raise ValueError(f"unknown model {req.model!r}; expected one of {', '.join(MODES)}")
    guidance = parse_values("guidance", req.guidance, 0.0, MAX_GUIDANCE)
    scales: list[float | None] = [None]
    if req.model == "retrinet":
        scales = list(parse_values("retrieval scale", req.retrieval_scales, 0.0, MAX_SCALE))
    cells = [(g, s) for g in guidance for s in scales]
    if len(cells) > MAX_CELLS:
        raise ValueError(f"{len(guidance)} x {len(scales)} = {len(cells)} cells, at most {MAX_CELLS}")
    n = _integer("seeds per cell", req.seeds, 1, MAX_SEEDS)
    steps = _integer("steps", req.steps, 1, MAX_STEPS)
    width, height = _size("width", req.width), _size("height", req.height)
    seed = resolve_seed(req.seed)
    best_by = req.best_by or DEFAULT_BEST[req.model]
    if best_by not in (*SWD_PAIRS, *METRICS):
        raise ValueError(f"best_by {best_by!r} is not a measure of the table; choose one of {', '.join(SWD_PAIRS)}")
    prompt = req.prompt if req.prompt is not None else ""
    negative = req.negative_prompt if req.negative_prompt is not None else ""
    check_prompt(prompt, negative)

    if req.model == "retrinet":
        refs = list(req.references or [])
        if not refs:
            raise ValueError("no reference given: add pictures of the character in the Compose tab")
        if len(refs) > MAX_REFERENCES:
            raise ValueError(f"{len(refs)} references given, at most {MAX_REFERENCES} are supported")
        for i, ref in enumerate(refs):
            if not isinstance(ref, (tuple, list)) or len(ref) != 2 or ref[1] not in CHOICES:
                raise ValueError(f"reference {i + 1} must be a (picture, concept) pair with a concept in "
                                 f"{', '.join(CHOICES)}")
        originals = [_picture(f"reference {i + 1}", image) for i, (image, _) in enumerate(refs)]
        read = [engine._reference(i, im, choice) for i, (im, (_, choice)) in enumerate(zip(originals, refs))]
        concepts = [c for _, c in refs]
        face_source = originals[concepts.index("face")] if "face" in concepts else originals[0]
        clothes_source = originals[concepts.index("clothes")] if "clothes" in concepts else originals[-1]
        model_pictures = [r.image for r in read]
    else:
        picture = _picture("picture", req.image)
        read, face_source, clothes_source, model_pictures = [], picture, picture, [picture]
    pipe = engine._model(req.model)
    scorer = _Scorer(engine, model_pictures, prompt if req.model == "retrinet" else "", face_source, clothes_source)
    sweep = Sweep(req, cells, seed, scorer.vqa, best_by)
    seeds = _seeds(seed, n)
    lock = engine._run_locks[req.model]

    def generate(g: float, s: float | None, progress: Progress | None) -> list[Image.Image]:
        with lock:
            if req.model == "retrinet":
                return _run(pipe, progress, seeds=seeds, prompt=prompt, references=read,
                            negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=g,
                            retrieval_scale=s, num_images_per_prompt=n, height=height, width=width)
            return _run(pipe, progress, seeds=seeds, image=model_pictures[0], num_images_per_prompt=n,
                        guidance_scale=g, num_inference_steps=steps, height=height, width=width)

    def runner(stop: threading.Event | None = None, progress: Progress | None = None) -> Iterator[SweepCell]:
        cache = getattr(pipe, "retrieval_cache", None)
        hits0, misses0 = (cache.hits, cache.misses) if cache is not None else (0, 0)
        for i, (g, s) in enumerate(cells):
            if stop is not None and stop.is_set():
                return
            t0 = time.perf_counter()
            cell_progress = None if progress is None else \
                (lambda done, total, i=i: progress(i * total + done, len(cells) * total))
            images = generate(g, s, cell_progress)
            scores = scorer(images)
            settings = {"model": req.model, "family": engine.zoo, "prompt": prompt, "negative_prompt": negative,
                        "steps": steps, "guidance": g, "width": images[0].width, "height": images[0].height}
            if s is not None:
                settings["retrieval_scale"] = s
                settings["concepts"] = [r.concept for r in read]
            cell = SweepCell(i, g, s, [Picture(im, sd, settings) for im, sd in zip(images, seeds)], scores,
                             _summary(scores), time.perf_counter() - t0)
            if cache is not None:
                sweep.cache = {"hits": cache.hits - hits0, "misses": cache.misses - misses0}
            sweep.done.append(cell)
            yield cell

    return sweep, runner


def run(engine: Engine, req: SweepRequest, stop: threading.Event | None = None,
        progress: Progress | None = None) -> Sweep:
    """Run a whole sweep (``stop`` ends it after the current cell) and return it."""
    sweep, runner = plan(engine, req)
    for _ in runner(stop, progress):
        pass
    return sweep


def export_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="retrinet-sweep-"))


def label(cell: SweepCell) -> str:
    """A cell's settings in words: "g 5, s 0.5"."""
    return f"g {cell.guidance:g}" + ("" if cell.retrieval_scale is None else f", s {cell.retrieval_scale:g}")
