"""Compose the studio from its tabs. Gradio only: the engine does the work."""

from __future__ import annotations

import gradio as gr

from studio import compose_tab, data_tab, sweep_tab, train_tab, variations_tab
from studio.engine import Engine
from studio.spaces import launch_kwargs

TITLE = "RetriNet Studio"
THEME = gr.themes.Soft(primary_hue="indigo")


def build_studio(engine: Engine) -> gr.Blocks:
    """The whole studio as one ``gr.Blocks``; launch it with ``launch(demo)``."""
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nSubject-driven generation from reference pictures: RetriNet concept "
                    f"composition, Semantica variations, scored sweeps and training. "
                    f"Model family: **{engine.zoo}** on **{engine.models.device}**.")
        with gr.Tabs():
            compose = compose_tab.build(engine, demo)
            variations = variations_tab.build(engine, demo)
            sweep_tab.build(engine, demo, compose, variations)
            train_tab.build(engine, demo)
            data_tab.build(engine, demo)
    return demo


QUEUE_SIZE = 64  # requests waiting at most; more are refused at once ("queue is full"), so memory stays bounded


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Queue and serve ``demo``; keyword arguments go to ``gr.Blocks.launch`` (after the studio's limits:
    upload size, no extra served folders; see ``studio.spaces.launch_kwargs``)."""
    return demo.queue(default_concurrency_limit=4, max_size=QUEUE_SIZE).launch(
        server_name=host, server_port=port, theme=THEME, **{**launch_kwargs(), **kwargs})
