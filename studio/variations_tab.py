"""The Variations tab: one picture in, diverse pictures of the same kind out (Semantica, seed 004).

Client endpoint: ``/vary`` (picture, number of pictures, guidance w, steps, seed -> gallery).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import gradio as gr

from studio.compose_tab import _gallery, api_numbers
from studio.engine import MAX_IMAGES, MAX_STEPS, RANDOMISE, Engine, VaryRequest


def vary(engine: Engine, picture: str | None, num_images: float, guidance: float, steps: float, seed: float,
         progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
    """A picture -> its variations (gallery), with each picture's seed and settings in its caption."""
    try:
        out = engine.vary(VaryRequest(picture, num_images, guidance, steps, seed),
                          progress=lambda done, total: progress((done, total), desc="Denoising"))
    except ValueError as e:  # MissingModel included: it says to train one in the Train tab
        raise gr.Error(str(e)) from e
    return _gallery(out)[0]


def build(engine: Engine, demo: gr.Blocks) -> dict[str, Any]:
    """The tab; returns what the Sweep tab reads: the ``picture``."""
    with gr.Tab("Variations", id="variations"):
        gr.Markdown("One picture in, new pictures of the same kind out: Semantica reads the picture through a frozen "
                    "image encoder, with no text. Guidance *w* follows the paper: eps = eps_c + w (eps_c - eps_u), "
                    "w >= 0; 0 uses the conditional prediction alone, larger *w* stays closer to the picture.")
        with gr.Row():
            with gr.Column(scale=4):
                picture = gr.Image(type="filepath", label="Picture", height=300, elem_id="variations-picture")
                with gr.Row():
                    num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Pictures",
                                           elem_id="variations-num-images")
                    steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps", elem_id="variations-steps")
                guidance = gr.Slider(0, 10, value=0.5, step=0.1, label="Guidance w")
                with gr.Row(equal_height=True):
                    seed = gr.Number(value=RANDOMISE, precision=0, label="Seed (-1: a new one each time)", scale=3,
                                     elem_id="variations-seed")
                    dice = gr.Button("Randomise", scale=0, min_width=110)
                run = gr.Button("Make variations", variant="primary", elem_id="variations-run")
            with gr.Column(scale=6):
                gallery = gr.Gallery(label="Variations", columns=3, height=520, object_fit="contain", format="png",
                                     elem_id="variations-gallery")

        # client endpoint /vary, with inputs of its own (see compose_tab.api_numbers)
        with gr.Group(visible=False):
            api_picture = gr.File(type="filepath", label="Picture")
            api = api_numbers()
            api_btn = gr.Button("vary")

        dice.click(lambda: RANDOMISE, None, seed, api_visibility="private")
        run.click(partial(vary, engine), [picture, num_images, guidance, steps, seed], gallery,
                  api_visibility="private", concurrency_id="generate")
        api_btn.click(partial(vary, engine), [api_picture, api["num_images"], api["guidance"], api["steps"], api["seed"]],
                      gallery, api_name="vary", concurrency_id="generate")
    return {"picture": picture}
