"""Evaluate a RetriNet pipeline the papers' way and write their tables and plots.

    python -m training.evaluate --pipeline DIR --eval-set FILE --clip CLIP --out DIR
    accelerate launch --num_processes K -m training.evaluate ...      # shards the pictures

A ``SemanticaPipeline`` folder is evaluated with seed 004's few-shot protocol instead
(``--data DIR [--split test --shots 1 --groups N]``): K-shot FID, precision and recall of its
variations against the test pictures of each group, beside a model that copies its input.

Protocol for RetriNet (seed 001, Sec. 3.1; seed 000, Sec. 6.1): for every reference set (a character's
references with their concepts) and every prompt, ``seeds`` seeds x ``samples_per_seed`` samples.
Each picture is scored against its references: CLIP-I, CLIP-T, DF-L2 (faces by the concept
extractor, embedded by the CLIP image tower) and, with ``--vqa``, the VQA score. Written to
``OUT``: ``images/``, ``scores.csv`` (one row per picture), ``summary.csv`` and ``summary.md``
(means and the SWD pairs of Tables 2 and 3), ``clip_i_vs_clip_t.png``. A rerun skips the pictures
already scored.

The eval set is JSON::

    {"prompts": ["1girl, smiling, outdoors", ...],
     "references": [{"name": "char_a", "images": [{"file": "a/face.png", "concept": "face"}, ...]}, ...],
     "seeds": [0, 1, 2, 3, 4], "samples_per_seed": 4, "num_inference_steps": 30,
     "guidance_scale": 7.0, "retrieval_scale": 1.0, "height": 384, "width": 384}

with files relative to the eval set.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

COLUMNS = ["job", "reference", "prompt", "seed", "sample", "file", "clip_i", "clip_t", "df_l2", "vqa"]
DEFAULTS = {"seeds": [0, 1, 2, 3, 4], "samples_per_seed": 4, "num_inference_steps": 30, "guidance_scale": 7.0,
            "retrieval_scale": 1.0, "height": None, "width": None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="a RetriNetPipeline or a SemanticaPipeline folder")
    p.add_argument("--eval-set", default=None, help="RetriNet: JSON of prompts, reference sets, seeds (see --help)")
    p.add_argument("--clip", default=None, help="RetriNet: CLIP model folder or Hub id for CLIP-I, CLIP-T, DF-L2")
    p.add_argument("--out", required=True)
    p.add_argument("--detector", default=None, help="detector folder for DF-L2 (default: the demo detector)")
    p.add_argument("--vqa", default=None, help="InstructBLIP / BLIP-2 id for the VQA score (default: not scored)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g = p.add_argument_group("Semantica (few-shot protocol, seed 004 Sec. 7)")
    g.add_argument("--data", default=None, help="a RetriBooru-style or group/picture folder with the test pictures")
    g.add_argument("--split", default="test")
    g.add_argument("--groups", type=int, default=None, help="at most this many groups (default: all)")
    g.add_argument("--shots", type=int, default=1, help="conditioning pictures per group (K)")
    g.add_argument("--guidance-scale", type=float, default=0.5)
    g.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.kind = pipeline_kind(args.pipeline)
    if args.kind == "SemanticaPipeline":
        if not args.data:
            p.error("a Semantica pipeline is evaluated on --data (its test pictures)")
    elif not (args.eval_set and args.clip):
        p.error("a RetriNet pipeline needs --eval-set and --clip")
    if args.shots < 1:
        p.error("--shots must be at least 1")
    return args


def pipeline_kind(folder: str) -> str:
    """The pipeline class a diffusers folder holds (its ``model_index.json``), or "" if unreadable."""
    try:
        return json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, json.JSONDecodeError):
        return ""


def evaluate_semantica(args: argparse.Namespace) -> dict[str, Any]:
    """One-shot (K-shot) FID, precision and recall against the test split, beside a model that
    copies its conditioning picture: ``OUT/few_shot.json`` and ``OUT/summary.md``."""
    from pipelines.semantica.evaluate import few_shot_report
    from pipelines.semantica.pipeline import SemanticaPipeline

    pipe = SemanticaPipeline.from_pretrained(args.pipeline).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    report = few_shot_report(pipe, args.data, split=None if args.split == "none" else args.split, seed=args.seed,
                             groups=args.groups, shots=args.shots, guidance_scale=args.guidance_scale)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "few_shot.json").write_text(json.dumps(report, indent=1))
    rows = ["| model | FID | precision | recall |", "|---|---|---|---|"]
    rows += [f"| {name} | {report[name]['fid']:.3f} | {report[name]['precision']:.3f} | {report[name]['recall']:.3f} |"
             for name in ("semantica", "copy")]
    (out / "summary.md").write_text(f"{report['shots']}-shot, {report['groups']} groups, {report['num_real']} test "
                                    f"pictures, guidance {report['guidance_scale']}\n\n" + "\n".join(rows) + "\n")
    print((out / "summary.md").read_text())
    return report


def load_eval_set(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        spec = {**DEFAULTS, **json.loads(path.read_text())}
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the eval set {path}: {e}") from e
    if not spec.get("prompts") or not spec.get("references"):
        raise ValueError(f"{path}: the eval set needs 'prompts' and 'references'")
    for ref in spec["references"]:
        if not ref.get("images"):
            raise ValueError(f"{path}: reference set {ref.get('name')!r} has no images")
        for im in ref["images"]:
            f = path.parent / im["file"]
            if not f.is_file():
                raise ValueError(f"{path}: {f} does not exist")
            im["path"] = str(f)
    return spec


def jobs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One job per (reference set, prompt, seed); each makes ``samples_per_seed`` pictures."""
    out = []
    for r, ref in enumerate(spec["references"]):
        for p, prompt in enumerate(spec["prompts"]):
            for seed in spec["seeds"]:
                out.append({"job": f"r{r:03d}-p{p:03d}-s{seed}", "reference": ref.get("name", f"ref{r}"),
                            "ref_index": r, "prompt": prompt, "seed": seed})
    return out


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("file") and row.get("clip_t")]


def _float(v) -> float | None:
    try:
        x = float(v)
        return None if x != x else x
    except (TypeError, ValueError):
        return None


def summarise(rows: list[dict[str, str]]) -> dict[str, float | None]:
    """Means and the papers' SWD pairs (seed 000 Table 2; seed 001 Table 3)."""
    from pipelines.metrics import CLIP_T_OFFSET, VQA_OFFSET, swd

    cols = {k: [_float(r[k]) for r in rows] for k in ("clip_i", "clip_t", "df_l2", "vqa")}
    mean = {k: (statistics.fmean([x for x in v if x is not None]) if any(x is not None for x in v) else None)
            for k, v in cols.items()}
    out: dict[str, float | None] = {"pictures": float(len(rows)), "VQA": mean["vqa"], "CLIP-I": mean["clip_i"],
                                    "CLIP-T": mean["clip_t"], "DF-L2": mean["df_l2"]}

    def pair(div_key, sim_key, div_off=0.0, sim_inverse=False):
        pairs = [(d, s) for d, s in zip(cols[div_key], cols[sim_key]) if d is not None and s is not None and
                 (not sim_inverse or s > 0)]
        if not pairs:
            return None
        return swd([d + div_off for d, _ in pairs], [1 / s if sim_inverse else s for _, s in pairs])

    out["SWD(VQA, CLIP-I)"] = pair("vqa", "clip_i")
    out["SWD(VQA, CLIP-T)"] = pair("vqa", "clip_t")
    out["SWD(CLIP-I, CLIP-T)"] = pair("clip_i", "clip_t")
    out["SWD(CLIP-T, DF-L2)"] = pair("clip_t", "df_l2", CLIP_T_OFFSET, sim_inverse=True)
    out["SWD(VQA, DF-L2)"] = pair("vqa", "df_l2", VQA_OFFSET, sim_inverse=True)
    return out


def write_summary(out: Path, summary: dict[str, float | None]) -> None:
    fmt = lambda v: "" if v is None else (str(int(v)) if float(v).is_integer() and v > 10 else f"{v:.4f}")  # noqa: E731
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(summary))
        w.writerow([fmt(v) for v in summary.values()])
    header = "| " + " | ".join(summary) + " |\n|" + "---|" * len(summary) + "\n"
    (out / "summary.md").write_text(header + "| " + " | ".join(fmt(v) or "-" for v in summary.values()) + " |\n")


def plot(out: Path, rows: list[dict[str, str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [_float(r["clip_i"]) for r in rows]
    ys = [_float(r["clip_t"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(xs, ys, s=8, alpha=0.6)
    ax.set_xlabel("CLIP-I")
    ax.set_ylabel("CLIP-T")
    ax.set_title(f"{len(rows)} pictures")
    fig.tight_layout()
    fig.savefig(out / "clip_i_vs_clip_t.png", dpi=90)
    plt.close(fig)


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.kind == "SemanticaPipeline":
        return evaluate_semantica(args)
    from pipelines.concepts import ConceptExtractor
    from pipelines.detector import DEMO_DETECTOR
    from pipelines.metrics import ClipScorer, face_distance, vqa_score
    from pipelines.metrics.identity import VQA_QUESTIONS
    from pipelines.retrinet import Reference, RetriNetPipeline

    spec = load_eval_set(args.eval_set)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    part = out / (f"scores.rank{rank}.csv" if world > 1 else "scores.csv")
    done = {r["file"] for r in read_rows(part)}
    todo = [j for i, j in enumerate(jobs(spec)) if i % world == rank]

    pipe = RetriNetPipeline.from_pretrained(args.pipeline).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    clip = ClipScorer.from_pretrained(args.clip, device=args.device)
    extractor = ConceptExtractor.from_pretrained(args.detector or DEMO_DETECTOR)
    answerer = None
    if args.vqa:
        from training.data.vqa import InstructBlipAnswerer
        answerer = InstructBlipAnswerer.from_pretrained(args.vqa, device=args.device)
    refs = [[Reference(Image.open(im["path"]).convert("RGB"), im["concept"]) for im in r["images"]]
            for r in spec["references"]]
    new_file = not part.exists() or part.stat().st_size == 0
    with open(part, "a", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        if new_file:
            w.writeheader()
        for job in todo:
            files = [f"images/{job['job']}-{k}.png" for k in range(spec["samples_per_seed"])]
            if all(x in done for x in files):
                continue
            t0 = time.perf_counter()
            ref = refs[job["ref_index"]]
            images = pipe(job["prompt"], ref, num_images_per_prompt=spec["samples_per_seed"],
                          num_inference_steps=spec["num_inference_steps"], guidance_scale=spec["guidance_scale"],
                          retrieval_scale=spec["retrieval_scale"], height=spec["height"], width=spec["width"],
                          generator=torch.Generator().manual_seed(job["seed"])).images
            clip_i = clip.clip_i(images, [[r.image for r in ref]] * len(images))
            clip_t = clip.clip_t(images, [job["prompt"]] * len(images))
            face_refs = [next((r.image for r in ref if r.concept == "face"), ref[0].image)] * len(images)
            df = face_distance(images, face_refs, extractor, clip.image_embeds)
            vqa = [None] * len(images)
            if answerer is not None:
                ref_answers = answerer.answer(ref[0].image, VQA_QUESTIONS)
                gen_answers = [answerer.answer(im, VQA_QUESTIONS) for im in images]
                vqa = vqa_score(gen_answers, [ref_answers] * len(images), clip.text_embeds).tolist()
            for k, (im, name) in enumerate(zip(images, files)):
                im.save(out / name)
                w.writerow({"job": job["job"], "reference": job["reference"], "prompt": job["prompt"],
                            "seed": job["seed"], "sample": k, "file": name, "clip_i": f"{clip_i[k]:.6f}",
                            "clip_t": f"{clip_t[k]:.6f}", "df_l2": f"{df[k]:.6f}",
                            "vqa": "" if vqa[k] is None else f"{vqa[k]:.6f}"})
            f.flush()
            print(f"{job['job']}: {len(images)} pictures in {time.perf_counter() - t0:.1f} s", flush=True)
    if world > 1:
        if rank != 0:
            return None
        while len({p.name for p in out.glob("scores.rank*.csv")}) < world:
            time.sleep(1)
        rows = [r for i in range(world) for r in read_rows(out / f"scores.rank{i}.csv")]
        expected = len(jobs(spec)) * spec["samples_per_seed"]
        while len(rows) < expected:  # the other processes are still scoring
            time.sleep(2)
            rows = [r for i in range(world) for r in read_rows(out / f"scores.rank{i}.csv")]
        with open(out / "scores.csv", "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(sorted(rows, key=lambda r: r["file"]))
    rows = read_rows(out / "scores.csv")
    summary = summarise(rows)
    write_summary(out, summary)
    plot(out, rows)
    print((out / "summary.md").read_text())
    return summary


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        sys.exit(f"error: {e}")
