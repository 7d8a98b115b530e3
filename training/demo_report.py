"""The demo family's report: does composition work, in numbers, on pictures it never saw.

    python -m training.demo_zoo --out assets/demo-zoo --report
    python -m training.demo_report --work WORK --pipeline CANDIDATE [--vae DIR] [--retrieval-scale S]
    python -m training.demo_report --work WORK --base CANDIDATE [--samples N]

Everything is measured on the held-out ``test`` split of the build's Toybooru and judged by the
attribute classifier (``pipelines.metrics.attributes``, trained on Toybooru's ground truth, not
the generator's CLIP); its own accuracy on real test pictures comes first. In every RetriNet
figure the prompt names no identity attribute (only "1girl, solo", pose, framing and background
words), so hair, eyes and outfit can only come from the references.

- the demo CLIP's colour probe: for test pictures, does CLIP rank the picture's own caption above
  the same caption with the hair (eye, outfit) colour swapped, or with another outfit pattern? The
  base reads CLIP's text tower frozen, so it can follow no word this tower does not tell apart;
- base: the text-to-image model with the test pictures' full tag prompts; hair colour and outfit
  colour right;
- reconstruction: 4 "figure" references of one character in one outfit (other pictures of the
  target's cluster); hair and eye colour (the character) and outfit colour and pattern right; and
  a control, the same prompts and noise with another target's references;
- composition: 2 "face" references of character A and 2 "clothes" references of an outfit B of
  another character (a pairing never seen in training); A's hair and eye colours and B's outfit
  colour and pattern right; for in-domain characters (train characters' test pictures) and
  out-of-domain ones (characters never seen in training);
- settings -a and -b (seed 001, Sec. 3.1), trained with the same budget: CLIP-I, CLIP-T, DF-L2
  and the SWD pairs (``training.evaluate.summarise``) on the in-domain composition set;
- the reference gap of -a and -b (``training.train_retrinet.reference_gap``): how much of the
  denoising loss a sample's own references explain, against another sample's;
- Semantica: one-shot FID, precision and recall against the test pictures of each character,
  beside a model that copies its conditioning picture.

``python -m training.demo_report`` (``judge_candidate``) takes the report's RetriNet figures for a
candidate instead (a checkpoint exported by ``training.export``, another decoder, another guidance
or retrieval scale), with the same draws and noise, from the shipped judge and the build's Toybooru
alone: a trial costs minutes, not the whole report. ``--base`` (``judge_base``) takes the report's base figure
for a candidate base text-to-image model the same way.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.retrinet import Reference
from training.data.retribooru import (neutral_tags, open_record, prepare_reference, prompt_from_tags, reference_region,
                                     read_annotations)
from training.data.toybooru import GARMENTS, PATTERNS

logger = logging.getLogger("demo_report")
STEPS, GUIDANCE, SIZE = 20, 5.0, 64
GAP_SAMPLES = 64  # test samples of the reference gap
BASE_DRAWS = 4  # the base figure's pictures, in report samples (base_draw)
CHARACTER = ("hair_color", "eye_color")
OUTFIT = ("cloth_color", "pattern")
COLOURS = ("hair_color", "eye_color", "cloth_color")  # what is left when the judge cannot read the pattern


def neutral_prompt(rec: dict[str, Any]) -> str:
    """The record's tags without any identity attribute: no hair, eyes or clothes words."""
    return prompt_from_tags(neutral_tags(rec))


def reference(root: Path, rec: dict[str, Any], concept: str) -> Reference | None:
    image, mask = open_record(root, rec)
    padded, got = prepare_reference(image, mask, rec["face_bbox"], concept, SIZE)
    return Reference(padded, got, reference_region(image, mask, rec["face_bbox"], got)) if got == concept else None


def grid(rows: list[list[Image.Image]], path: Path, size: int = SIZE) -> None:
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * size, len(rows) * size), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            canvas.paste(im.resize((size, size)), (j * size, i * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def rate(predictions: list[dict[str, str]], truths: list[dict[str, str]], keys: tuple[str, ...]) -> float:
    return sum(all(p[k] == str(t[k]) for k in keys) for p, t in zip(predictions, truths)) / max(1, len(truths))


def per_attribute(predictions, truths, keys) -> dict[str, float]:
    return {k: rate(predictions, truths, (k,)) for k in keys}


def _batched(pipe, prompts, refs, seed: int, batch: int = 8, guidance_scale: float = GUIDANCE,
             retrieval_scale: float = 1.0) -> list[Image.Image]:
    images: list[Image.Image] = []
    for s in range(0, len(prompts), batch):
        images += pipe(prompts[s:s + batch], refs[s:s + batch], num_inference_steps=STEPS,
                       guidance_scale=guidance_scale,
                       retrieval_scale=retrieval_scale, height=SIZE, width=SIZE,
                       generator=torch.Generator().manual_seed(seed + s)).images
    return images


def composition_set(root: Path, records, rng: random.Random, samples: int, domain: str):
    """(prompts, references, truths of the mix) for ``domain`` "in" or "out"."""
    train_chars = {r["character"] for r in records if r["split"] == "train"}
    test = [r for r in records if r["split"] == "test"]
    clusters: dict[str, list[dict]] = defaultdict(list)
    for r in test:
        clusters[r["cluster"]].append(r)
    faces = [c for c, rs in clusters.items() if len(rs) >= 2 and
             ((rs[0]["character"] in train_chars) == (domain == "in"))]
    outfits = [c for c, rs in clusters.items() if len(rs) >= 2]
    prompts, refs, truths = [], [], []
    tries = 0
    while len(prompts) < samples and tries < samples * 20:
        tries += 1
        a, b = rng.choice(faces), rng.choice(outfits)
        ra, rb = clusters[a], clusters[b]
        if ra[0]["character"] == rb[0]["character"]:
            continue
        face_refs = [reference(root, r, "face") for r in rng.sample(ra, 2)]
        cloth_refs = [reference(root, r, "clothes") for r in rng.sample(rb, min(len(rb), 4))]
        cloth_refs = [c for c in cloth_refs if c is not None][:2]
        if any(f is None for f in face_refs) or len(cloth_refs) < 2:
            continue
        truth = {k: ra[0]["truth"][k] for k in CHARACTER} | {k: rb[0]["truth"][k] for k in OUTFIT}
        prompts.append(neutral_prompt(rng.choice(test)))
        refs.append(face_refs + cloth_refs)
        truths.append(truth)
    return prompts, refs, truths


def reconstruction_draw(test: list[dict], rng: random.Random, samples: int) -> list[tuple[dict, list[dict]]]:
    """Up to ``samples`` reconstruction targets (test pictures of clusters of at least 5), each with 4 other
    pictures of its cluster, drawn by ``rng`` target after target."""
    clusters: dict[str, list[dict]] = defaultdict(list)
    for r in test:
        clusters[r["cluster"]].append(r)
    targets = [r for r in test if len(clusters[r["cluster"]]) >= 5]
    return [(r, rng.sample([o for o in clusters[r["cluster"]] if o["id"] != r["id"]], 4))
            for r in rng.sample(targets, min(samples, len(targets)))]


def reconstruction_figures(pipe, judge, root: Path, test: list[dict], rng: random.Random, samples: int, seed: int,
                           report_dir: Path | None = None, **sampling) -> dict[str, Any]:
    """Reconstruction: 4 figure references from the target's own cluster; and its control, the same prompts and
    noise with the previous target's references (what the judge then finds of each target's own character and
    outfit owes nothing to its references: chance, or the model's habits)."""
    prompts, refs, truths = [], [], []
    for r, others in reconstruction_draw(test, rng, samples):
        refs.append([reference(root, o, "figure") for o in others])
        prompts.append(neutral_prompt(r))
        truths.append(r["truth"])
    images = _batched(pipe, prompts, refs, seed, **sampling)
    pred = judge.predict(images)
    figures = {"reconstruction": {"pictures": len(images),
                                  "character_and_outfit": rate(pred, truths, CHARACTER + OUTFIT),
                                  "three_colours": rate(pred, truths, COLOURS),
                                  **per_attribute(pred, truths, CHARACTER + OUTFIT)}}
    if report_dir is not None:
        grid([[x.image for x in rr] + [im] for rr, im in zip(refs[:8], images[:8])], report_dir / "reconstruction.png")
    control = judge.predict(_batched(pipe, prompts, refs[-1:] + refs[:-1], seed, **sampling))
    figures["reconstruction_control"] = per_attribute(control, truths, CHARACTER + OUTFIT)
    return figures


def composition_figures(pipe, judge, root: Path, records: list[dict], rng: random.Random, samples: int, seed: int,
                        report_dir: Path | None = None, **sampling) -> tuple[dict[str, Any], dict[str, tuple]]:
    """Composition in and out of domain: the figures, and each domain's (prompts, references, images)."""
    figures, sets = {}, {}
    for domain in ("in", "out"):
        prompts, refs, truths = composition_set(root, records, rng, samples, domain)
        images = _batched(pipe, prompts, refs, seed, **sampling)
        pred = judge.predict(images)
        sets[domain] = (prompts, refs, images)
        figures[f"composition_{domain}_domain"] = {
            "pictures": len(images), "all_four": rate(pred, truths, CHARACTER + OUTFIT),
            "three_colours": rate(pred, truths, COLOURS),
            **per_attribute(pred, truths, CHARACTER + OUTFIT)}
        if report_dir is not None:
            grid([[x.image for x in rr] + [im] for rr, im in zip(refs[:8], images[:8])],
                 report_dir / f"composition-{domain}.png")
    return figures, sets


VAE_PICTURES = 600  # test pictures of the VAE ceiling


def base_draw(test: list[dict], rng: random.Random, samples: int, seed: int) -> list[dict]:
    """The base figure's test pictures: ``BASE_DRAWS`` times ``samples`` (384 in the report). The first ``samples``
    come from the report's own stream, as up to v9 (so every figure drawn after the base's keeps its pictures), the
    rest from a stream of their own among the other test pictures. The base is cheap (96 pictures in 24 s on one
    thread): at 96 pictures the standard error of a rate near 80 % is 4 points, as wide as the distance to the
    goal; at 384, 2."""
    first = rng.sample(test, samples)
    taken = {r["id"] for r in first}
    rest = [r for r in test if r["id"] not in taken]
    return first + random.Random(f"demo-report/{seed}/base").sample(rest, min(len(rest), (BASE_DRAWS - 1) * samples))


def base_pipeline(folder: Path, vae: Path | None = None):
    """A base text-to-image pipeline folder (``StableDiffusionPipeline``), decoding with ``vae`` if given."""
    from diffusers import StableDiffusionPipeline

    from pipelines.components import load_vae

    extra = {"vae": load_vae(vae).eval()} if vae else {}
    base = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, **extra)
    base.set_progress_bar_config(disable=True)
    return base


def base_figures(base, judge, root: Path, chosen: list[dict], seed: int, guidance_scale: float = GUIDANCE,
                 report_dir: Path | None = None) -> dict[str, Any]:
    """The base model's figure: the chosen test pictures' full tag prompts drawn (16 a batch, each batch's noise
    seeded from ``seed`` and its place), and the judge's reading of hair colour and outfit colour against their
    truth. ``report_dir`` receives the grid of the first 8 (real picture, drawn picture) pairs."""
    prompts = [prompt_from_tags(r["tags"]) for r in chosen]
    images: list[Image.Image] = []
    for s in range(0, len(chosen), 16):
        images += base(prompts[s:s + 16], num_inference_steps=STEPS, guidance_scale=guidance_scale, height=SIZE,
                       width=SIZE, generator=torch.Generator().manual_seed(seed + s)).images
    pred = judge.predict(images)
    truths = [r["truth"] for r in chosen]
    if report_dir is not None:
        grid([[open_record(root, r)[0], im] for r, im in zip(chosen[:8], images[:8])], report_dir / "base.png")
    return {"pictures": len(chosen), "hair_and_outfit_colour": rate(pred, truths, ("hair_color", "cloth_color")),
            **per_attribute(pred, truths, ("hair_color", "eye_color", "cloth_color", "hair_style", "pattern"))}


def test_pixels(root: Path, chosen: list[dict]) -> torch.Tensor:
    """The records' pictures at the report's size, as a (N, 3, SIZE, SIZE) tensor in [-1, 1]."""
    return torch.stack([torch.from_numpy(np.array(open_record(root, r)[0].resize((SIZE, SIZE)))).permute(2, 0, 1)
                        for r in chosen]).float().div(127.5).sub(1.0)


@torch.no_grad()
def vae_ceiling(vae_folder: Path, judge, root: Path, test: list[dict], rng: random.Random,
                pictures: int = VAE_PICTURES) -> dict[str, Any]:
    """The judge on real test pictures and on their VAE reconstructions: what the autoencoder alone
    lets any model of the family reach (a generator cannot draw what its VAE cannot decode)."""
    from pipelines.components import load_vae

    vae = load_vae(vae_folder).eval()
    chosen = rng.sample(test, min(pictures, len(test)))
    real = test_pixels(root, chosen)
    recon = torch.cat([vae.decode(vae.encode(real[i:i + 64]).latent_dist.mode()).sample.clamp(-1, 1)
                       for i in range(0, len(real), 64)])
    truths = [r["truth"] for r in chosen]
    out: dict[str, Any] = {"pictures": len(chosen), "mse": float(((recon - real) ** 2).mean())}
    for name, pixels in (("real", real), ("reconstructed", recon)):
        pred = judge.predict(pixels)
        out[name] = {"hair_and_outfit_colour": rate(pred, truths, ("hair_color", "cloth_color")),
                     "character_and_outfit": rate(pred, truths, CHARACTER + OUTFIT),
                     "three_colours": rate(pred, truths, COLOURS),
                     **per_attribute(pred, truths, CHARACTER + OUTFIT)}
    return out


PROBED = {"hair_color": "hair", "eye_color": "eyes", "cloth_color": "outfit"}


def _colour_tag(rec: dict[str, Any], key: str) -> int | None:
    """The index in ``rec["tags"]`` of the tag that names the attribute ``key``'s colour."""
    colour = rec["truth"][key]
    if key == "cloth_color":  # the garment's tag, e.g. "green_kimono" (the first clothes tag in that colour)
        found = [i for i, t in enumerate(rec["tags"]) if t in rec.get("cloth_tags", ()) and t.startswith(colour + "_")]
    else:
        found = [i for i, t in enumerate(rec["tags"]) if t == f"{colour}_{PROBED[key]}"]
    return found[0] if found else None


@torch.no_grad()
def clip_probe(clip, root: Path, records: list[dict], test: list[dict], rng: random.Random,
               pictures: int = 200) -> dict[str, Any]:
    """How often the demo CLIP (a ``ClipScorer``) ranks a test picture's own caption first among the
    same caption with the hair (eye, outfit) colour swapped for each colour Toybooru uses, and among
    the same caption with each of Toybooru's patterns (``pattern``); and (``binding``) above the same
    caption with its two garment pieces' colours swapped. The base reads CLIP's text tower frozen: a
    colour or pattern this probe cannot tell apart, the base cannot follow."""
    if not test:
        raise ValueError("no test picture to probe CLIP with")
    chosen = rng.sample(test, min(pictures, len(test)))
    images = clip.image_embeds([open_record(root, r)[0] for r in chosen])
    out: dict[str, Any] = {"pictures": len(chosen)}
    for key in PROBED:
        colours = sorted({r["truth"][key] for r in records})
        right, n = _ranked_first(clip, chosen, images, key, colours, partial(_colour_captions, key=key, colours=colours))
        out[key] = {"right": right, "pictures": n, "colours": len(colours)}
    patterns = sorted(PATTERNS)
    right, n = _ranked_first(clip, chosen, images, "pattern", patterns, _pattern_captions)
    out["pattern"] = {"right": right, "pictures": n, "patterns": len(patterns)}
    right = n = 0
    for rec, image in zip(chosen, images):
        swapped = _garment_colours_swapped(rec)
        if swapped is None:
            continue
        own, other = clip.text_embeds([prompt_from_tags(rec["tags"]), prompt_from_tags(swapped)]) @ image
        right += bool(own > other)  # a tie is no binding
        n += 1
    out["binding"] = {"right": right / n if n else 0.0, "pictures": n}
    return out


def _ranked_first(clip, chosen: list[dict], images: torch.Tensor, key: str, choices: list[str],
                  captions_of: Callable[[dict[str, Any]], dict[str, str] | None]) -> tuple[float, int]:
    """The share of the ``chosen`` pictures (those ``captions_of`` gives a caption per choice for) whose caption
    with their own ``truth[key]`` CLIP ranks first among ``choices``, and how many pictures that was."""
    right = n = 0
    for rec, image in zip(chosen, images):
        captions = captions_of(rec)
        if captions is None:
            continue
        best = choices[int((clip.text_embeds([captions[c] for c in choices]) @ image).argmax())]
        right += best == rec["truth"][key]
        n += 1
    return (right / n if n else 0.0), n


def _colour_captions(rec: dict[str, Any], key: str, colours: list[str]) -> dict[str, str] | None:
    """``rec``'s caption with the attribute ``key``'s colour tag in each of ``colours``, keyed by colour; None
    when its tags name no such colour."""
    i = _colour_tag(rec, key)
    if i is None:
        return None
    rest = rec["tags"][i].split("_", 1)[1]
    return {c: prompt_from_tags(rec["tags"][:i] + [f"{c}_{rest}"] + rec["tags"][i + 1:]) for c in colours}


def _pattern_captions(rec: dict[str, Any]) -> dict[str, str] | None:
    """``rec``'s caption with its outfit's main piece in each of Toybooru's patterns, keyed by pattern: the
    pattern's tag ("plaid_kimono") right after the piece's colour tag, as Toybooru writes it, and none for
    "solid". None when the tags name no colour of the main piece."""
    main = GARMENTS.get(rec["truth"].get("garment"), (None,))[0]
    colour_tag = f"{rec['truth'].get('cloth_color')}_{main}"
    if main is None or colour_tag not in rec["tags"]:
        return None
    words = {f"{w}_{main}" for w in PATTERNS.values() if w}
    tags = [t for t in rec["tags"] if t not in words]
    at = tags.index(colour_tag) + 1
    return {p: prompt_from_tags(tags[:at] + ([f"{w}_{main}"] if w else []) + tags[at:]) for p, w in PATTERNS.items()}


def _garment_colours_swapped(rec: dict[str, Any]) -> list[str] | None:
    """``rec``'s tags with the colours of its outfit's two pieces swapped ("green_kimono, blue_sash" to
    "blue_kimono, green_sash"); None for a one-piece outfit or two pieces of one colour."""
    a, b = rec["truth"].get("cloth_color"), rec["truth"].get("secondary_color")
    if not a or not b or a == b:
        return None
    cloth = set(rec.get("cloth_tags", ()))
    first = [t for t in rec["tags"] if t in cloth and t.startswith(f"{a}_")]
    second = [t for t in rec["tags"] if t in cloth and t.startswith(f"{b}_")]
    if not first or not second:
        return None
    swap = {**{t: f"{b}_{t[len(a) + 1:]}" for t in first}, **{t: f"{a}_{t[len(b) + 1:]}" for t in second}}
    return [swap.get(t, t) for t in rec["tags"]]


def gap_samples(root: Path, seed: int, samples: int) -> dict[str, Any]:
    """``samples`` multitask samples spread over the test split, collated: the reference gap's batch."""
    from training.data.retribooru import RetriBooruDataset
    from training.train_retrinet import gap_batch

    batch = gap_batch(RetriBooruDataset(root, "test", task="multitask", num_references=4, resolution=SIZE,
                                        seed=seed), samples)
    if batch is None:
        raise ValueError(f"the test split of {root} has fewer than 2 multitask samples for the reference gap")
    return batch


def gaps(pipe, batch: dict[str, Any], seed: int) -> dict[str, Any]:
    """``training.train_retrinet.reference_gap`` of a RetriNet pipeline: how much of the loss the
    references explain."""
    from diffusers import DDPMScheduler

    from training.train_retrinet import reference_gap

    return reference_gap(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.retrinet,
                         DDPMScheduler.from_config(pipe.scheduler.config), batch, seed=seed, chunk_size=16)


@torch.no_grad()
def prompt_gap(base, batch: dict[str, Any], seed: int) -> float:
    """The same measure for the base model's prompt: the mean over the reference gap's timesteps of
    1 - loss with each sample's own full tag prompt / loss with the previous sample's, with the same
    noise and masks; what a conditioning that works scores on this family."""
    from diffusers import DDPMScheduler

    from pipelines.retrinet import embed_texts
    from training.train_retrinet import gap_timesteps, relative_gap, retrinet_loss, to_latent_mask

    sched = DDPMScheduler.from_config(base.scheduler.config)
    device = base.unet.device
    latents = base.vae.encode(batch["pixel_values"].to(device)).latent_dist.mode() * base.vae.config.scaling_factor
    prompts = list(batch["prompt"])
    own = embed_texts(base.tokenizer, base.text_encoder, prompts, device)
    other = embed_texts(base.tokenizer, base.text_encoder, prompts[-1:] + prompts[:-1], device)
    size = latents.shape[-2:]
    valid = to_latent_mask(batch["valid_mask"].to(device), size, cover=False)
    face = to_latent_mask(batch["face_mask"].to(device), size, cover=True)
    generator = torch.Generator().manual_seed(seed)
    losses: list[list[float]] = [[], []]
    for tv in gap_timesteps(sched):
        t = torch.full((latents.shape[0],), tv, dtype=torch.long, device=device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        noisy = sched.add_noise(latents, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        for i, ehs in enumerate((own, other)):
            losses[i].append(retrinet_loss(base.unet(noisy, t, encoder_hidden_states=ehs).sample, target, valid,
                                           face, 0.1).item())
    return relative_gap(*losses)


def gap_curves(work: Path) -> dict[str, dict[str, Any]]:
    """The reference gap each RetriNet run measured while it trained (every ``--validation-steps``,
    on a few test samples), for -b (``runs/retrinet``) and -a (``runs/retrinet-a``) if logged:
    ``{"samples": n, "gap": {step: gap}}``."""
    from training.core import read_metrics
    from training.train_retrinet import GAP_LOG

    curves = {}
    for name, run in (("b", "retrinet"), ("a", "retrinet-a")):
        rows = [r for r in read_metrics(work / "runs" / run / "validation" / GAP_LOG) if "gap" in r]
        if rows:
            curves[name] = {"samples": rows[-1].get("samples"), "gap": {int(r["step"]): r["gap"] for r in rows}}
    return curves


def final_step(run: Path) -> int | None:
    """The step of a run's last complete checkpoint (its final models' step when it finished)."""
    from training.checkpoints import list_checkpoints

    found = list_checkpoints(run)
    return found[-1][0] if found else None


def matched_checkpoints(work: Path, like) -> dict[str, Any]:
    """-b and -a at the same step when -a has not finished or ran fewer steps: their last common checkpoint, made
    into pipelines (``training.export``, cached in ``WORK/report-models`` under the digest of the checkpoint's
    weights, so a run trained again is exported again) with the VAE and scheduler of ``like``; named "b at step N"
    and "a at step N". Empty if there is none."""
    from pipelines.retrinet import RetriNetPipeline
    from training.checkpoints import list_checkpoints
    from training.demo_zoo import RETRINET_BASE, sha256
    from training.export import export_retrinet
    from training.files import replacing_folder, write_text

    runs = work / "runs"
    b, a = dict(list_checkpoints(runs / "retrinet")), dict(list_checkpoints(runs / "retrinet-a"))
    common = sorted(set(a) & set(b))
    if not common:
        return {}
    step = common[-1]
    pipes = {}
    for name, checkpoint in (("b", b[step]), ("a", a[step])):
        folder = work / "report-models" / f"retrinet-{name}-step-{step}"
        source = json.dumps({"checkpoint": str(checkpoint), "weights": {
            w.name: sha256(w) for w in sorted(Path(checkpoint).glob("model*.safetensors"))}}, indent=1)
        cached = folder / "source.json"
        if not ((folder / "model_index.json").is_file() and cached.is_file() and cached.read_text() == source):
            with replacing_folder(folder) as tmp:
                export_retrinet(checkpoint, str(runs / RETRINET_BASE / "pipeline"), tmp)
                write_text(tmp / "source.json", source)
        pipe = RetriNetPipeline.from_pretrained(folder, vae=like.vae, scheduler=like.scheduler)
        pipe.set_progress_bar_config(disable=True)
        pipes[f"{name} at step {step}"] = pipe
    return pipes


def retrinet_pipeline(folder: Path):
    from pipelines.retrinet import RetriNetPipeline

    pipe = RetriNetPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_candidate(out: Path, work: Path, pipeline: Path, vae: Path | None, samples: int) -> None:
    """What judging a candidate reads: the shipped judge, the build's Toybooru, the candidate's pipeline folder and
    the VAE it decodes with, if another; a clear error naming what is missing, or a figure of too few pictures."""
    if samples < 2:
        raise ValueError(f"the report needs at least 2 pictures per figure, got {samples}")
    needed = [out / "judge" / "config.json", work / "toybooru" / "annotations.jsonl", pipeline / "model_index.json",
              *([Path(vae) / "config.json"] if vae else [])]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise ValueError(f"missing: {', '.join(missing)}")


def judge_candidate(out: Path, work: Path, pipeline: Path | None = None, vae: Path | None = None, samples: int = 96,
                    seed: int = 0, guidance_scale: float | None = None, retrieval_scale: float = 1.0) -> dict[str, Any]:
    """The report's RetriNet figures (reconstruction with its control; composition in and out of domain) for
    another RetriNet pipeline folder (a checkpoint exported by ``training.export``), another VAE (a decoder) or
    another sampling setting: the same targets, references, prompts and noise as ``write_report``'s, so each figure
    compares one for one with REPORT.md's. Reads the judge from ``out`` and Toybooru from ``work`` (not the base)."""
    from pipelines.components import load_vae
    from pipelines.metrics.attributes import AttributeClassifier

    out, work = Path(out), Path(work)
    pipeline = Path(pipeline) if pipeline else out / "retrinet"
    _check_candidate(out, work, pipeline, vae, samples)
    if retrieval_scale < 0 or (guidance_scale is not None and guidance_scale < 0):
        raise ValueError("the retrieval and guidance scales must not be negative")
    root = work / "toybooru"
    records, _ = read_annotations(root)
    test = [r for r in records if r["split"] == "test"]
    rng = random.Random(f"demo-report/{seed}")
    # write_report's draws before RetriNet's: the VAE ceiling's pictures, then the base's prompts
    rng.sample(test, min(VAE_PICTURES, len(test)))
    rng.sample(test, samples)
    judge = AttributeClassifier.from_pretrained(out / "judge").eval()
    pipe = retrinet_pipeline(pipeline)
    if vae:
        pipe.vae = load_vae(vae).eval()
    sampling = {"guidance_scale": GUIDANCE if guidance_scale is None else guidance_scale,
                "retrieval_scale": retrieval_scale}
    figures = reconstruction_figures(pipe, judge, root, test, rng, samples, seed, **sampling)
    figures.update(composition_figures(pipe, judge, root, records, rng, samples, seed, **sampling)[0])
    figures["sampling"] = {"steps": STEPS, **sampling, "pipeline": str(pipeline), "vae": str(vae or "")}
    return figures


def judge_base(out: Path, work: Path, pipeline: Path, vae: Path | None = None, samples: int = 96, seed: int = 0,
               guidance_scale: float | None = None) -> dict[str, Any]:
    """The report's base figure for a candidate base text-to-image pipeline folder (another recipe's
    ``runs/NAME/pipeline``): with ``samples`` and ``seed`` as the report's, the same test prompts and noise as
    ``write_report``'s, so the figure compares one for one with REPORT.md's. Decodes with the pipeline's own VAE
    (or ``vae``); reads the judge from ``out`` and Toybooru from ``work``."""
    from pipelines.metrics.attributes import AttributeClassifier

    out, work, pipeline = Path(out), Path(work), Path(pipeline)
    _check_candidate(out, work, pipeline, vae, samples)
    if guidance_scale is not None and guidance_scale < 0:
        raise ValueError("the guidance scale must not be negative")
    root = work / "toybooru"
    records, _ = read_annotations(root)
    test = [r for r in records if r["split"] == "test"]
    rng = random.Random(f"demo-report/{seed}")
    rng.sample(test, min(VAE_PICTURES, len(test)))  # write_report's draw before the base's: the VAE ceiling's
    judge = AttributeClassifier.from_pretrained(out / "judge").eval()
    guidance = GUIDANCE if guidance_scale is None else guidance_scale
    figures = {"base": base_figures(base_pipeline(pipeline, vae), judge, root, base_draw(test, rng, samples, seed),
                                    seed, guidance)}
    figures["sampling"] = {"steps": STEPS, "guidance_scale": guidance, "pipeline": str(pipeline), "vae": str(vae or "")}
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.demo_report", description=judge_candidate.__doc__.split(
        "\n\n")[0].replace("\n    ", " "))
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "demo-zoo"),
                   help="the shipped folder (its judge)")
    p.add_argument("--work", required=True, help="the build's work folder (its toybooru/)")
    p.add_argument("--pipeline", default=None, help="a RetriNetPipeline folder (default: the shipped one)")
    p.add_argument("--base", default=None,
                   help="judge this base text-to-image pipeline folder instead (the report's base figure)")
    p.add_argument("--vae", default=None, help="a VAE folder to decode with instead of the pipeline's")
    p.add_argument("--guidance-scale", type=float, default=None, help=f"default: the report's, {GUIDANCE}")
    p.add_argument("--retrieval-scale", type=float, default=1.0)
    p.add_argument("--samples", type=int, default=96, help="pictures per figure (the report's: 96)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures here too")
    args = p.parse_args(argv)
    if args.base and (args.pipeline or args.retrieval_scale != 1.0):
        p.error("--base judges a base text-to-image model: it takes no --pipeline or --retrieval-scale")
    try:
        if args.base:
            figures = judge_base(args.out, args.work, args.base, args.vae, args.samples, args.seed, args.guidance_scale)
        else:
            figures = judge_candidate(args.out, args.work, args.pipeline, args.vae, args.samples, args.seed,
                                      args.guidance_scale, args.retrieval_scale)
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    return print_figures(figures, args.json)


def print_figures(figures: dict[str, Any], path: str | None = None) -> dict[str, Any]:
    """Print ``figures`` as JSON, and write them to ``path`` too when given; return them."""
    text = json.dumps(figures, indent=1)
    if path:
        Path(path).write_text(text)
    print(text)
    return figures


def base_folder(out: Path, work: Path) -> Path:
    """The base text-to-image pipeline: the shipped ``out/base`` (demo family v7 on), else the build's run."""
    shipped = out / "base"
    return shipped if (shipped / "model_index.json").is_file() else work / "runs" / "base" / "pipeline"


def missing_inputs(out: Path, work: Path) -> list[str]:
    """What the report reads and cannot find: the shipped models in ``out`` (the base among them, or the
    build's run of it in ``work``) and the build's Toybooru in ``work``."""
    needed = [out / "judge" / "accuracy.json", out / "judge" / "config.json", out / "retrinet" / "model_index.json",
              out / "clip" / "config.json", out / "detector", work / "toybooru" / "annotations.jsonl"]
    missing = [str(p) for p in needed if not p.exists()]
    if not (base_folder(out, work) / "model_index.json").is_file():
        missing.append(f"the base model ({out / 'base' / 'model_index.json'} or "
                       f"{work / 'runs' / 'base' / 'pipeline' / 'model_index.json'})")
    return missing


def write_report(out: Path, work: Path, samples: int = 96, seed: int = 0) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    from pipelines.metrics import ClipScorer, face_distance
    from pipelines.metrics.attributes import AttributeClassifier
    from pipelines.retrinet import RetriNetModel, RetriNetPipeline
    from training.evaluate import summarise

    t0 = time.perf_counter()
    out, work = Path(out), Path(work)
    if samples < 2:
        raise ValueError(f"the report needs at least 2 pictures per figure, got {samples}")
    missing = missing_inputs(out, work)
    if missing:
        raise ValueError(f"the report reads the shipped models in {out} and the build's work folder {work}; missing: "
                         f"{', '.join(missing)}. Build first (python -m training.demo_zoo --out {out} --work {work})")
    root = work / "toybooru"
    records, _ = read_annotations(root)
    test = [r for r in records if r["split"] == "test"]
    rng = random.Random(f"demo-report/{seed}")
    judge = AttributeClassifier.from_pretrained(out / "judge").eval()
    figures: dict[str, Any] = {"judge": json.loads((out / "judge" / "accuracy.json").read_text())}
    report_dir = out / "report"
    figures["vae_ceiling"] = vae_ceiling(out / "retrinet" / "vae", judge, root, test, rng)
    logger.info("judge on VAE reconstructions: %s", figures["vae_ceiling"])
    clip = ClipScorer.from_pretrained(out / "clip")
    # its own random numbers: the pictures every other figure draws do not depend on whether it ran
    figures["clip_probe"] = clip_probe(clip, root, records, test, random.Random(f"demo-report/{seed}/clip-probe"))
    logger.info("CLIP probe: %s", figures["clip_probe"])

    # base model: full tag prompts of test pictures, decoded by the shipped VAE (up to v6 a decoder trained on
    # after the base, with the same encoder and latents; from v7 on the base's own)
    base = base_pipeline(base_folder(out, work), out / "retrinet" / "vae")
    figures["base"] = base_figures(base, judge, root, base_draw(test, rng, samples, seed), seed, report_dir=report_dir)
    logger.info("base: %s", figures["base"])

    pipe = retrinet_pipeline(out / "retrinet")
    figures.update(reconstruction_figures(pipe, judge, root, test, rng, samples, seed, report_dir))
    logger.info("reconstruction: %s", figures["reconstruction"])
    composition, comp_sets = composition_figures(pipe, judge, root, records, rng, samples, seed, report_dir)
    figures.update(composition)
    logger.info("composition: %s", composition)

    # settings a and b, same budget: CLIP-I, CLIP-T, DF-L2 and SWD on the in-domain composition set
    from pipelines.concepts import ConceptExtractor

    extractor = ConceptExtractor.from_pretrained(out / "detector")
    settings: dict[str, Any] = {}
    prompts, refs, images_b = comp_sets["in"]
    runs = {"b": (pipe, images_b)}
    a_dir = work / "runs" / "retrinet-a"
    if (a_dir / "retrinet").is_dir() and final_step(a_dir) == final_step(work / "runs" / "retrinet"):
        pipe_a = RetriNetPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                  unet=UNet2DConditionModel.from_pretrained(a_dir / "unet"),
                                  retrinet=RetriNetModel.from_pretrained(a_dir / "retrinet"), scheduler=pipe.scheduler)
        pipe_a.set_progress_bar_config(disable=True)
        runs["a"] = (pipe_a, _batched(pipe_a, prompts, refs, seed))
    else:  # -a has not finished, or ran a shorter budget: both settings at the last step both have a checkpoint of
        for name, matched in matched_checkpoints(work, pipe).items():
            runs[name] = (matched, _batched(matched, prompts, refs, seed))
    for name, (_, images) in runs.items():
        clip_i = clip.clip_i(images, [[x.image for x in rr] for rr in refs])
        clip_t = clip.clip_t(images, prompts)
        df = face_distance(images, [rr[0].image for rr in refs], extractor, clip.image_embeds)
        rows = [{"clip_i": float(i), "clip_t": float(t), "df_l2": float(d), "vqa": None}
                for i, t, d in zip(clip_i, clip_t, df)]
        settings[name] = {k: v for k, v in summarise(rows).items() if v is not None}
    figures["settings"] = settings
    logger.info("settings: %s", settings)
    batch = gap_samples(root, seed, GAP_SAMPLES)
    figures["reference_gap"] = {name: gaps(p, batch, seed) for name, (p, _) in runs.items()}
    figures["prompt_gap"] = prompt_gap(base, batch, seed)
    figures["gap_during_training"] = gap_curves(work)
    logger.info("reference gap: %s", {k: v["gap"] for k, v in figures["reference_gap"].items()})

    # Semantica: one-shot few-shot metrics against a model that copies its input
    if (out / "semantica").is_dir():
        try:
            from pipelines.semantica import few_shot_report
        except ImportError:
            few_shot_report = None
        if few_shot_report is not None:
            figures["semantica"] = few_shot_report(out / "semantica", root, split="test", seed=seed,
                                                   groups=min(24, samples // 4))
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    (report_dir / "figures.json").write_text(json.dumps(figures, indent=1))
    (out / "REPORT.md").write_text(render(figures))
    return figures


def _stderr(rate: float, n: int) -> float:
    """The binomial standard error of a rate measured on ``n`` pictures."""
    return (rate * (1 - rate) / max(1, n)) ** 0.5


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def render(f: dict[str, Any]) -> str:
    j = f["judge"]
    goals = [("base: hair and outfit colour right", f["base"]["hair_and_outfit_colour"], 0.80, "hair_and_outfit_colour"),
             ("RetriNet reconstruction: character and outfit right", f["reconstruction"]["character_and_outfit"], 0.85,
              "character_and_outfit"),
             ("RetriNet composition, in domain: all four right", f["composition_in_domain"]["all_four"], 0.75,
              "character_and_outfit")]
    ceiling = f.get("vae_ceiling", {})

    def judged(kind: str, key: str) -> str:
        return _pct(ceiling[kind][key]) if key in ceiling.get(kind, {}) else "-"

    lines = ["# Demo family: report", "",
             "| figure | measured | goal | met | real pictures | VAE reconstructions |", "|---|---|---|---|---|---|",
             *[f"| {name} | {_pct(v)} | {_pct(g)} | {'yes' if v >= g else '**no**'} | {judged('real', key)} | "
               f"{judged('reconstructed', key)} |" for name, v, g, key in goals], "",
             "The last two columns are the same measure taken on the real test pictures and on their VAE "
             "reconstructions (with their own attributes as the truth): the judge's ceiling, and the autoencoder's. "
             "A goal above the first cannot be met with this judge, nor one above the second with this autoencoder, "
             "whatever the diffusion models.", "",
             "Written by `python -m training.demo_zoo --out assets/demo-zoo --report` from the held-out test split "
             "of the build's Toybooru (`training/demo_report.py` says exactly how). "
             f"{STEPS} DPM-Solver++ steps, guidance {GUIDANCE}, {SIZE} px.", "",
             f"## The judge on real pictures ({j['pictures']} test pictures)", "",
             "| pictures | " + " | ".join(j["accuracy"]) + " |", "|---|" + "---|" * len(j["accuracy"]),
             "| real | " + " | ".join(_pct(v) for v in j["accuracy"].values()) + " |",
             *(["| the same made soft | " + " | ".join(_pct(j["accuracy_soft"][k]) for k in j["accuracy"]) + " |"]
               if "accuracy_soft" in j else []), "",
             "A small CNN trained on the ground truth of Toybooru's training pictures (`training.train_judge`)"
             + ("; the second row is the test pictures made soft (shrunk, blurred, noised: `train_judge.degrade`)."
                if "accuracy_soft" in j else "."), ""]
    if "vae_ceiling" in f:
        v = f["vae_ceiling"]
        keys = ["hair_and_outfit_colour", "character_and_outfit", "three_colours", *CHARACTER, *OUTFIT]
        lines += [f"## What the VAE lets through ({v['pictures']} test pictures, reconstruction MSE {v['mse']:.4f})",
                  "", "The judge on real pictures and on their VAE reconstructions: no model of the family can "
                  "score above the second row.", "",
                  "| pictures | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys),
                  *[f"| {name} | " + " | ".join(_pct(v[name][k]) for k in keys) + " |"
                    for name in ("real", "reconstructed")], ""]
    if "clip_probe" in f:
        c = f["clip_probe"]
        lines += ["## What the demo CLIP reads (its colour probe)", "",
                  f"For {c['pictures']} test pictures, the demo CLIP ranks the picture's own caption against the same "
                  "caption with one colour swapped, for every colour Toybooru uses, and (the last row) with the "
                  "outfit's pattern changed. The base reads CLIP's text tower frozen: a colour or pattern word it "
                  "cannot tell apart here, the base cannot follow.", "",
                  "| swapped | own caption ranked first | chance |", "|---|---|---|",
                  *[f"| {name} | {_pct(c[key]['right'])} | {_pct(1 / c[key]['colours'])} |"
                    for key, name in PROBED.items() if key in c],
                  *([(f"| outfit pattern (plaid, striped, polka dot or none) | {_pct(c['pattern']['right'])} | "
                      f"{_pct(1 / c['pattern']['patterns'])} |")] if c.get("pattern", {}).get("pictures") else []),
                  ""]
        if c.get("binding", {}).get("pictures"):
            n, right = c["binding"]["pictures"], _pct(c["binding"]["right"])
            lines += [f"Each colour bound to its garment: for the {n} of them in a two-piece outfit of two colours, "
                      "the own caption ranks above the same caption with the two pieces' colours swapped in "
                      f"**{right}** (chance 50 %). A CLIP that reads its caption as a bag of words cannot, and the "
                      "base then paints either piece in either colour.", ""]
    b = f["base"]
    lines += ["## Base text-to-image model (full tag prompts)", "",
              f"Hair colour and outfit colour both right: **{_pct(b['hair_and_outfit_colour'])}** of {b['pictures']} "
              f"(standard error {_pct(_stderr(b['hair_and_outfit_colour'], b['pictures']))}; goal 80 %); "
              f"hair colour {_pct(b['hair_color'])}, eye colour {_pct(b['eye_color'])}, outfit colour "
              f"{_pct(b['cloth_color'])}, hair style {_pct(b['hair_style'])}, pattern {_pct(b['pattern'])}. What the "
              "family's UNet, sampler and VAE can draw when told: RetriNet's eye colours and patterns below are "
              "read from its references alone.", "",
              "![base](report/base.png)", ""]
    r = f["reconstruction"]
    lines += ["## RetriNet: reconstruction (4 figure references of one character in one outfit)", "",
              "RetriNet (and its -a twin below) starts from the base's zero-terminal-SNR twin (v-prediction, "
              "trailing timesteps; `train_text_to_image --zero-terminal-snr`), and samples with its noise "
              "schedule: at the last timestep the noisy latent holds nothing of the picture, so colours can only "
              "come from the references. The base above is the epsilon model, which follows its prompts better.",
              "",
              f"Character (hair and eye colour) and outfit (colour and pattern) all right: "
              f"**{_pct(r['character_and_outfit'])}** of {r['pictures']} (goal 85 %). "
              f"Hair, eye and outfit colours (the pattern left out): **{_pct(r['three_colours'])}**.", "",
              "| references | " + " | ".join(CHARACTER + OUTFIT) + " |", "|---|" + "---|" * 4,
              "| the target's own | " + " | ".join(_pct(r[k]) for k in CHARACTER + OUTFIT) + " |",
              *(["| another target's (control) | "
                 + " | ".join(_pct(f["reconstruction_control"][k]) for k in CHARACTER + OUTFIT) + " |", "",
                 "The control draws the same prompts with the same noise, each with the previous target's "
                 "references: what it gets right of the target owes nothing to the target's references. The first row "
                 "must beat it for the references to reach the pictures."]
                if "reconstruction_control" in f else []), "",
              "![reconstruction](report/reconstruction.png)", ""]
    lines += ["## RetriNet: composition (2 face references of A, 2 clothes references of B)", "",
              "| characters | pictures | all four right | three colours right | " + " | ".join(CHARACTER + OUTFIT) + " |",
              "|---|---|---|---|" + "---|" * 4]
    for d, label in (("in", "in domain"), ("out", "out of domain")):
        c = f[f"composition_{d}_domain"]
        lines.append(f"| {label} | {c['pictures']} | **{_pct(c['all_four'])}** | "
                     f"{_pct(c['three_colours'])} | "
                     + " | ".join(_pct(c[k]) for k in CHARACTER + OUTFIT) + " |")
    lines += ["", "Goal: 75 % in domain. Columns of the grids: 2 face references, 2 clothes references, the result.",
              "", "![in domain](report/composition-in.png) ![out of domain](report/composition-out.png)", ""]
    s = f["settings"]
    if s:
        keys = [k for k in next(iter(s.values())) if k != "pictures"]
        lines += ["## Settings -a and -b with the same budget (in-domain composition set)", ""]
        if any(" at step " in name for name in s):
            lines += ["-a ran fewer steps than the shipped -b (or had not finished when this report was written): "
                      "both settings are compared at the last step both have a checkpoint of (the same learning-rate "
                      "schedule, the same steps), beside the shipped -b.", ""]
        lines += ["| setting | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, v in s.items():
            lines.append(f"| -{name} | " + " | ".join(f"{v[k]:.4f}" if k in v else "-" for k in keys) + " |")
        lines += ["", "CLIP-I, CLIP-T and the face embeddings come from the demo CLIP; DF-L2 counts only pictures "
                  "where the detector finds a head in both (lower is closer). SWD is better higher: a picture adds "
                  "to it only when it is both faithful to its references and varied (seed 000, Sec. 4).", ""]
    if f.get("reference_gap"):
        g = f["reference_gap"]
        ts = next(iter(g.values()))["timesteps"]
        lines += ["## Do the references matter? (the reference gap)", "",
                  f"The training loss (prompt \"\") on {next(iter(g.values()))['samples']} multitask test samples at "
                  "fixed timesteps and noise, with each sample's own references, with another sample's, and with "
                  "none (`training.train_retrinet.reference_gap`). The gap, 1 - own / other averaged over the timesteps, is the "
                  "share of the loss that a sample's own references explain: 0 when the model reads its references "
                  "only generically."
                  + (f" The same measure of the base model's prompt (its own full tag prompt against another "
                     f"picture's) is {_pct(f['prompt_gap'])}, on the epsilon base's loss: RetriNet's gap is on its own "
                     "(v-prediction) loss, so the two do not compare directly." if "prompt_gap" in f else ""), "",
                  "| setting | gap | " + " | ".join(f"own / other / none at t={t}" for t in ts) + " |",
                  "|---|---|" + "---|" * len(ts)]
        for name, v in g.items():
            lines.append(f"| -{name} | **{_pct(v['gap'])}** | " + " | ".join(
                f"{o:.4f} / {x:.4f} / {z:.4f}" for o, x, z in zip(v["own"], v["other"], v["none"])) + " |")
        lines.append("")
    curves = f.get("gap_during_training") or {}
    if curves:
        # JSON turned the steps into strings
        by_step = {name: {int(k): g for k, g in c["gap"].items()} for name, c in curves.items()}
        steps = sorted({k for c in by_step.values() for k in c})
        every = max(1, len(steps) // 10)  # about ten rows, the last step always among them
        shown = [k for i, k in enumerate(steps) if (len(steps) - 1 - i) % every == 0]
        samples = sorted({c["samples"] for c in curves.values() if c.get("samples")})
        lines += ["### The gap while training", "",
                  "The same measure, taken by each run as it trained (`--validation-steps`, on "
                  f"{' / '.join(map(str, samples)) or 'a few'} test samples, so noisier; `validation/reference_gap.jsonl` "
                  "of the run), on the run's own loss (its `--face-loss-weight`; the table above weighs the face as the "
                  "seeds do, 0.1, for every model): how fast each setting learns to read its references.", "",
                  "| step | " + " | ".join(f"-{n}" for n in by_step) + " |", "|---|" + "---|" * len(by_step)]
        for k in shown:
            lines.append(f"| {k} | " + " | ".join(f"{100 * c[k]:.2f} %" if k in c else "-" for c in by_step.values())
                         + " |")
        lines.append("")
    if "semantica" in f:
        lines += ["## Semantica: one-shot FID, precision and recall", "", "```", json.dumps(f["semantica"], indent=1),
                  "```", ""]
    lines += [f"Report written in {f['seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
