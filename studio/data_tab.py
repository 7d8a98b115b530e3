"""The Data tab: browse a RetriBooru-style data set the way the loader sees it."""

from __future__ import annotations

import gradio as gr
import numpy as np

from studio.engine import Engine, RecordRequest

COLORS = {"figure": "#3b82f6", "head box": "#ef4444"}


def open_dataset(engine: Engine, folder: str, split: str):
    """Read a folder; return the summary, the split choices and the picture slider."""
    try:
        info = engine.reload(folder)
    except (ValueError, FileNotFoundError) as e:
        raise gr.Error(str(e)) from e
    splits = ["all", *sorted(info.splits)]
    split = split if split in splits else "all"
    n = info.num_records if split == "all" else info.splits[split]
    parts = ", ".join(f"{k}: {v}" for k, v in sorted(info.splits.items()))
    summary = (f"**{info.num_records}** pictures ({parts or 'no splits'}), **{info.num_characters}** characters, "
               f"**{info.num_clusters}** clusters (character, artist, outfit).")
    if info.skipped:
        summary += " Skipped records: " + ", ".join(f"{k} {v}" for k, v in sorted(info.skipped.items())) + "."
    slider = gr.Slider(minimum=0, maximum=max(0, n - 1), value=0, step=1)
    return summary, gr.Dropdown(choices=splits, value=split), slider, n


def show_record(engine: Engine, folder: str, split: str, index: float):
    """One picture: the annotated picture, its concept crops, its tags, its cluster, the record."""
    try:
        view = engine.record(RecordRequest(folder, int(index), split or "all"))
    except (ValueError, FileNotFoundError) as e:
        raise gr.Error(str(e)) from e
    mask = np.asarray(view.mask, dtype=np.float32) / 255.0
    annotated = (view.image, [(mask, "figure"), (view.face_bbox, "head box")])
    cloth = set(view.record.get("cloth_tags", []))
    tags = [(t, "cloth" if t in cloth else "tag") for t in view.record["tags"]]
    rec = view.record
    title = (f"### {rec['id']} ({view.position + 1} of {view.count})\n"
             f"character **{rec.get('character', '?')}**, artist **{rec.get('artist', '?')}**, "
             f"outfit **{rec.get('outfit', '?')}**, split **{rec.get('split', '-')}**")
    return title, annotated, view.crops, tags, view.similar, rec


def step(index: float, delta: int, count: int) -> int:
    """The neighbouring picture, clamped to the split."""
    return int(min(max(0, index + delta), max(0, count - 1)))


def build(engine: Engine, demo: gr.Blocks) -> None:
    with gr.Tab("Data", id="data"):
        gr.Markdown("Browse a RetriBooru-style data set: the figure mask, the head box, the *face / clothes / "
                    "figure* references the training loader cuts (background removed, rules of the RetriBooru "
                    "supplement A.4), the tags, and the pictures listed as `similar`.")
        with gr.Row(equal_height=True):
            folder = gr.Textbox(label="Data set folder", value=engine.default_data, scale=5,
                                placeholder="a folder with annotations.jsonl, images/ and masks/")
            split = gr.Dropdown(["all"], value="all", label="Split", scale=1)
            open_btn = gr.Button("Open", variant="primary", scale=0, min_width=110)
        summary = gr.Markdown()
        with gr.Row(equal_height=True):
            prev_btn = gr.Button("Previous", scale=0, min_width=110)
            index = gr.Slider(0, 1, value=0, step=1, label="Picture", scale=6)
            next_btn = gr.Button("Next", scale=0, min_width=110)
        title = gr.Markdown()
        with gr.Row():
            picture = gr.AnnotatedImage(label="Picture with figure mask and head box", color_map=COLORS, height=420)
            with gr.Column():
                crops = gr.Gallery(label="Concept references, as the loader cuts them", columns=3, height=220,
                                   object_fit="contain")
                tags = gr.HighlightedText(label="Tags (cloth tags marked)", color_map={"cloth": "orange", "tag": "blue"},
                                          show_legend=True)
        similar = gr.Gallery(label="similar: same character, artist and outfit", columns=6, height=260,
                             object_fit="contain")
        with gr.Accordion("Annotation record", open=False):
            record = gr.JSON()

        count = gr.State(0)  # pictures in the chosen split, per user

        record_outputs = [title, picture, crops, tags, similar, record]
        opened = gr.on([demo.load, open_btn.click, folder.submit, split.input],
                       lambda f, s: open_dataset(engine, f, s), [folder, split], [summary, split, index, count],
                       api_name="data_open")
        opened.then(lambda f, s, i: show_record(engine, f, s, i), [folder, split, index], record_outputs,
                    api_visibility="private")
        index.release(lambda f, s, i: show_record(engine, f, s, i), [folder, split, index], record_outputs,
                      api_name="data_record")
        for btn, delta in ((prev_btn, -1), (next_btn, 1)):
            btn.click(lambda i, n, d=delta: step(i, d, n), [index, count], [index],
                      api_visibility="private").then(
                lambda f, s, i: show_record(engine, f, s, i), [folder, split, index], record_outputs,
                api_visibility="private")
