"""The Compose tab: drop pictures of a character, pick a concept from each, generate with RetriNet.

Each dropped picture becomes a card (its head box, figure mask and concept crops, a concept
choice, a remove button); the cards live in the user's ``gr.State`` and are drawn by
``gr.render``. Client endpoints: ``/crop`` (a picture -> its concept crops) and ``/compose``
(a flat signature: prompt, reference files, their concepts, settings -> gallery).
"""

from __future__ import annotations

import tempfile
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from studio.engine import (
    CHOICES,
    MAX_IMAGES,
    MAX_REFERENCES,
    MAX_STEPS,
    RANDOMISE,
    WHOLE,
    ComposeRequest,
    CropRequest,
    Engine,
    Generation,
)

LABELS = {"face": "face", "clothes": "clothes", "figure": "figure", WHOLE: "whole picture"}


def _item(card, concept: str | None = None) -> dict[str, Any]:
    """One reference of the user's list: the card and the concept chosen for it."""
    return {"id": uuid.uuid4().hex, "card": card, "concept": concept if concept in card.crops else card.concept}


def add_pictures(engine: Engine, files: list[str] | None, items: list[dict]) -> tuple[list[dict], None]:
    """Cut every dropped picture into a card; warn about the ones that cannot be used."""
    items = list(items or [])
    for path in files or []:
        name = Path(path).name
        if len(items) >= MAX_REFERENCES:
            gr.Warning(f"At most {MAX_REFERENCES} references: {name} and any after it were not added.")
            break
        try:
            card = engine.crop(CropRequest(path, position=len(items)))
        except ValueError as e:
            gr.Warning(f"{name}: {e}")
            continue
        items.append(_item(card))
    return items, None


def set_concept(items: list[dict], item_id: str, concept: str) -> list[dict]:
    return [{**it, "concept": concept} if it["id"] == item_id else it for it in items]


def remove(items: list[dict], item_id: str) -> list[dict]:
    return [it for it in items if it["id"] != item_id]


def library_choices(engine: Engine) -> gr.Dropdown:
    choices = [(f"{c.name} ({'example' if c.source == 'example' else 'saved'}, {c.num_references} pictures)", c.name)
               for c in engine.list_characters()]
    return gr.Dropdown(choices=choices)


def load_character(engine: Engine, name: str | None) -> list[dict]:
    if not name:
        raise gr.Error("Choose a character in the library first.")
    try:
        character = engine.load_character(name)
        items = []
        for i, (picture, concept) in enumerate(character.references):
            item = _item(engine.crop(CropRequest(picture, position=i)), concept)
            if item["concept"] != concept:
                gr.Warning(f"{name}, picture {i + 1}: no {concept} can be cut now; using {item['concept']}.")
            items.append(item)
    except ValueError as e:
        raise gr.Error(str(e)) from e
    return items


def save_character(engine: Engine, name: str, items: list[dict]) -> gr.Dropdown:
    try:
        info = engine.save_character(name, [(it["card"].picture, it["concept"]) for it in items or []])
    except ValueError as e:
        raise gr.Error(str(e)) from e
    gr.Info(f"Saved {info.name} ({info.num_references} pictures).")
    return gr.Dropdown(choices=library_choices(engine).choices, value=info.name)


def _gallery(out: Generation) -> tuple[list[tuple[str, str]], list[str]]:
    """Gallery entries (PNG path, caption) and the PNG paths for download; the PNGs carry their parameters."""
    folder = Path(tempfile.mkdtemp(prefix="retrinet-studio-"))
    paths = [str(p.save(folder / f"{p.settings['model']}-{p.seed}.png")) for p in out.pictures]
    return [(path, p.caption()) for path, p in zip(paths, out.pictures)], paths


def _generate(engine: Engine, req: ComposeRequest, progress: gr.Progress) -> Generation:
    try:
        return engine.compose(req, progress=lambda done, total: progress((done, total), desc="Denoising"))
    except ValueError as e:  # MissingModel included: it says to train one in the Train tab
        raise gr.Error(str(e)) from e


def _size(value: float | None) -> int | None:
    return None if value in (None, 0) else value  # an empty box: the model's own size


def generate(engine: Engine, items: list[dict], prompt: str, negative: str, steps: float, guidance: float,
             retrieval: float, seed: float, num_images: float, width: float | None, height: float | None,
             progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
    """The Generate button: the user's cards -> gallery, downloads, a status line and the seed used."""
    req = ComposeRequest(prompt, [(it["card"].picture, it["concept"]) for it in items or []], negative, steps,
                         guidance, retrieval, seed, num_images, _size(width), _size(height))
    out = _generate(engine, req, progress)
    gallery, files = _gallery(out)
    status = (f"{len(out.pictures)} pictures, seeds {out.seed} to {out.pictures[-1].seed}. "
              f"Concepts: {', '.join(out.pictures[0].settings['concepts'])}.")
    return gallery, files, status, out.seed


def compose_api(engine: Engine, prompt: str, files: list[str] | None, concepts: list[str] | str | None,
                steps: float, guidance: float, retrieval_scale: float, seed: float, num_images: float,
                negative: str = "", width: float | None = None, height: float | None = None,
                progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
    """``/compose``: reference files and one concept per file (or one for all) -> gallery."""
    files, concepts = pair_concepts(files, concepts)
    req = ComposeRequest(prompt, list(zip(files, concepts)), negative or "", steps, guidance, retrieval_scale, seed,
                         num_images, _size(width), _size(height))
    return _gallery(_generate(engine, req, progress))[0]


def pair_concepts(files: list[str] | None, concepts: list[str] | str | None) -> tuple[list[str], list[str]]:
    """An endpoint's reference files and concepts: one concept per file, one for all, or a comma-separated text."""
    files = list(files or [])
    if isinstance(concepts, str):
        concepts = [c.strip() for c in concepts.split(",") if c.strip()]
    concepts = list(concepts or [])
    if len(concepts) == 1 and len(files) > 1:
        concepts = concepts * len(files)
    if len(concepts) != len(files):
        raise gr.Error(f"{len(files)} reference files but {len(concepts)} concepts; give one concept per file")
    return files, concepts


def crop_api(engine: Engine, picture: str | None):
    """``/crop``: a picture -> its concept crops (captioned), the head box overlay, the default concept."""
    try:
        card = engine.crop(CropRequest(picture))
    except ValueError as e:
        raise gr.Error(str(e)) from e
    crops = [(im, name) for name, im in card.crops.items()] + [(card.mask, "mask")]
    return crops, card.overlay, card.concept


def api_numbers() -> dict[str, gr.components.Component]:
    """Hidden inputs of the client endpoints: plain text and numbers, checked by the engine alone."""
    return {"prompt": gr.Textbox("", label="Prompt"), "negative": gr.Textbox("", label="Negative prompt"),
            "steps": gr.Number(20, label="Steps"), "guidance": gr.Number(5.0, label="Guidance"),
            "retrieval_scale": gr.Number(1.0, label="Retrieval scale"), "seed": gr.Number(RANDOMISE, label="Seed"),
            "num_images": gr.Number(1, label="Pictures"), "width": gr.Number(0, label="Width (0: the model's own)"),
            "height": gr.Number(0, label="Height (0: the model's own)")}


def build(engine: Engine, demo: gr.Blocks) -> dict[str, Any]:
    """The tab; returns what other tabs read: the references (``items``), ``prompt`` and ``negative``."""
    with gr.Tab("Compose", id="compose"):
        gr.Markdown("Drop pictures of a character. The studio finds the head and the figure in each and cuts the "
                    "concepts *face*, *clothes* and *figure* (RetriBooru's rules); choose what each picture gives, "
                    "write a prompt, and generate with RetriNet.")
        items = gr.State([])  # the user's references: [{"id", "card", "concept"}]
        last_seed = gr.State(None)
        with gr.Row():
            with gr.Column(scale=6):
                upload = gr.File(label=f"Drop reference pictures (up to {MAX_REFERENCES})", file_count="multiple",
                                 file_types=["image"], height=120, elem_id="compose-upload")
                with gr.Row(equal_height=True):
                    library = gr.Dropdown(label="Character library", choices=[], scale=4)
                    load_btn = gr.Button("Load", scale=0, min_width=90)
                    name = gr.Textbox(label="Save the references as", placeholder="a name: letters, digits, - _ space",
                                      scale=4)
                    save_btn = gr.Button("Save", scale=0, min_width=90)
                clear_btn = gr.Button("Remove all references", size="sm")

                @gr.render(inputs=items)
                def cards(current: list[dict]):
                    if not current:
                        gr.Markdown("*No reference yet: drop pictures above or load a character.*")
                    for i, it in enumerate(current):
                        card, item_id = it["card"], it["id"]
                        with gr.Row(variant="panel", equal_height=True, key=f"card-{item_id}",
                                    elem_classes="reference-card"):
                            gr.Image(card.overlay, label=f"Reference {i + 1}", height=200, scale=2,
                                     interactive=False, key=f"overlay-{item_id}", elem_classes="reference-overlay")
                            gr.Gallery([(im, LABELS[c]) for c, im in card.crops.items()] + [(card.mask, "mask")],
                                       label="Concepts and figure mask", columns=3, height=200, scale=3,
                                       object_fit="contain", key=f"crops-{item_id}",
                                       elem_classes="reference-crops")
                            with gr.Column(min_width=170, scale=0):
                                concept = gr.Dropdown([(LABELS[c], c) for c in CHOICES if c in card.crops],
                                                      value=it["concept"], label="Take", key=f"concept-{item_id}", interactive=True,
                                                      elem_classes="reference-concept")
                                gr.Markdown(f"<small>{card.rule}</small>")
                                drop = gr.Button("Remove", size="sm", variant="stop", key=f"remove-{item_id}")
                        concept.input(lambda c, its, k=item_id: set_concept(its, k, c), [concept, items], items,
                                      api_visibility="private")
                        drop.click(lambda its, k=item_id: remove(its, k), items, items, api_visibility="private")

            with gr.Column(scale=5):
                prompt = gr.Textbox(label="Prompt", placeholder="1girl, smiling, on a beach", lines=2,
                                    elem_id="compose-prompt")
                negative = gr.Textbox("", label="Negative prompt", lines=1)
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps", elem_id="compose-steps")
                    num_images = gr.Slider(1, MAX_IMAGES, value=2, step=1, label="Pictures",
                                           elem_id="compose-num-images")
                with gr.Row():
                    guidance = gr.Slider(0, 20, value=5.0, step=0.5, label="Guidance (prompt)")
                    retrieval = gr.Slider(0, 3, value=1.0, step=0.05, label="Retrieval scale (references)")
                with gr.Row(equal_height=True):
                    seed = gr.Number(value=RANDOMISE, precision=0, label="Seed (-1: a new one each time)", scale=3,
                                     elem_id="compose-seed")
                    dice = gr.Button("Randomise", scale=0, min_width=110)
                    reuse = gr.Button("Reuse last", scale=0, min_width=110)
                with gr.Row():
                    width = gr.Number(value=0, precision=0, label="Width (0: the model's own)", elem_id="compose-width")
                    height = gr.Number(value=0, precision=0, label="Height (0: the model's own)",
                                       elem_id="compose-height")
                generate_btn = gr.Button("Generate", variant="primary", elem_id="compose-generate")
                status = gr.Markdown(elem_id="compose-status")
                gallery = gr.Gallery(label="Pictures", columns=2, height=420, object_fit="contain", format="png",
                                     elem_id="compose-gallery")
                downloads = gr.File(label="Download (PNG with parameters)", file_count="multiple")

        # client endpoints, with no widget of their own: /crop and /compose
        # (their own inputs: no slider ranges or rounding before the engine's checks, which name the
        # field; a File, not an Image, so that a broken upload reaches the engine and its clear message)
        with gr.Group(visible=False):
            api_picture = gr.File(type="filepath", label="Picture")
            api_crops = gr.Gallery(label="Concept crops", format="png")
            api_overlay = gr.Image(label="Head box and figure", format="png")
            api_concept = gr.Textbox(label="Default concept")
            api_files = gr.File(file_count="multiple", label="Reference pictures")
            api_concepts = gr.Dropdown(list(CHOICES), multiselect=True, allow_custom_value=True, label="Concepts")
            api = api_numbers()
            crop_btn = gr.Button("crop")
            compose_btn = gr.Button("compose")

        upload.upload(lambda f, its: add_pictures(engine, f, its), [upload, items], [items, upload],
                      api_visibility="private")
        clear_btn.click(list, None, items, api_visibility="private")
        gr.on([demo.load], lambda: library_choices(engine), None, library, api_visibility="private")
        load_btn.click(lambda n: load_character(engine, n), library, items, api_visibility="private")
        save_btn.click(lambda n, its: save_character(engine, n, its), [name, items], library,
                       api_visibility="private")
        dice.click(lambda: RANDOMISE, None, seed, api_visibility="private")
        reuse.click(lambda s, last: s if last is None else last, [seed, last_seed], seed, api_visibility="private")
        generate_btn.click(
            partial(generate, engine),
            [items, prompt, negative, steps, guidance, retrieval, seed, num_images, width, height],
            [gallery, downloads, status, last_seed], api_visibility="private", concurrency_id="generate")
        crop_btn.click(partial(crop_api, engine), api_picture, [api_crops, api_overlay, api_concept],
                       api_name="crop")
        compose_btn.click(
            partial(compose_api, engine),
            [api["prompt"], api_files, api_concepts, api["steps"], api["guidance"], api["retrieval_scale"], api["seed"],
             api["num_images"], api["negative"], api["width"], api["height"]],
            gallery, api_name="compose", concurrency_id="generate")
    return {"items": items, "prompt": prompt, "negative": negative}
