"""The Train tab: make a data set, launch a RetriNet or Semantica run, watch it, stop it, resume it,
and compose with its checkpoints. Gradio only: ``studio.jobs.JobManager`` does the work.

Jobs are subprocesses whose state lives in ``<workspace>/jobs`` (a reload, a second tab or a
restarted studio sees the same jobs); a ``gr.Timer`` redraws the selected job every two seconds
(log tail, loss plot from ``metrics.jsonl``, validation pictures, checkpoints). Client endpoints:
``/train_start`` (the run form's values -> a job id), ``/train_status`` (a job id -> its status as
JSON) and ``/train_stop`` (a job id -> its status once stopped). As a Hugging Face Space the tab is
read-only: the form is disabled and the endpoints refuse to start anything.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from studio.engine import Engine, cache_dir
from studio.jobs import (
    LOCKS,
    MAX_PROCESSES,
    PRECISIONS,
    SETTINGS,
    TASKS,
    TRAINERS,
    DatasetRequest,
    JobManager,
    JobStatus,
    ToybooruRequest,
    TrainRequest,
    bases_from_spec,
)
from studio.spaces import on_space

TICK = 2.0  # seconds between two redraws of the selected job
STOP_TIMEOUT = 20.0  # seconds a stopping job gets before SIGKILL
USES = {"retrinet": "Compose", "semantica": "Variations"}


def manager_for(engine: Engine) -> JobManager:
    """The studio's jobs: in the engine's workspace (default: the studio cache), the ``--data`` folder
    allowed as a data root, the model family's bases; read-only on a Space."""
    workspace = engine.workspace if engine.workspace is not None else cache_dir()
    roots = [engine.default_data] if engine.default_data else []
    return JobManager(workspace, read_only=on_space(), data_roots=roots, bases=bases_from_spec(engine.models.spec))


@contextlib.contextmanager
def _shown() -> Iterator[None]:
    """A ``ValueError`` of the job manager reaches the page (or the API caller) as a ``gr.Error`` with its message."""
    try:
        yield
    except ValueError as e:
        raise gr.Error(str(e)) from e


def _chosen(job_id: str | None) -> str:
    if not job_id:
        raise gr.Error("Choose a job first.")
    return job_id


def _job_choices(jobs: JobManager) -> list[tuple[str, str]]:
    return [(info.label(), info.id) for info in jobs.list_jobs()]


def job_list(jobs: JobManager, selected: str | None = None) -> gr.Dropdown:
    """The job picker, with ``selected`` (or the newest job) chosen."""
    choices = _job_choices(jobs)
    ids = [v for _, v in choices]
    value = selected if selected in ids else (ids[0] if ids else None)
    return gr.Dropdown(choices=choices, value=value)


def data_list(jobs: JobManager, current: str | None = None) -> gr.Dropdown:
    folders = jobs.data_folders()
    return gr.Dropdown(choices=folders, value=current if current else (folders[0] if folders else None))


# ---------------------------------------------------------------------- data jobs

def start_toybooru(jobs: JobManager, name: str, num_images: float, seed: float, size: float) -> gr.Dropdown:
    """Draw a Toybooru into ``<workspace>/data/<name>`` as a job; select it."""
    with _shown():
        job_id = jobs.start(ToybooruRequest(name, num_images, seed, size))
    return job_list(jobs, job_id)


def start_dataset(jobs: JobManager, images: str, metadata: str, name: str) -> gr.Dropdown:
    """Build a data set from a folder of pictures and a metadata file as a job; select it."""
    with _shown():
        job_id = jobs.start(DatasetRequest(images, metadata, name))
    return job_list(jobs, job_id)


# ---------------------------------------------------------------------- the endpoints

def train_start(jobs: JobManager, model: str, data: str, run_name: str, base: str | None, task: str, setting: str,
                num_references: float, steps: float, learning_rate: float, drop_rate: float, lock: str,
                checkpoint_every: float, validation_every: float, processes: float, batch_size: float,
                resolution: float, gradient_accumulation: float = 1, seed: float = 0,
                mixed_precision: str = "no") -> str:
    """``/train_start``: the run form's values -> the new job's id (the job picker's value)."""
    req = TrainRequest(model=model, data=data or "", run_name=run_name, base=base or "", task=task, setting=setting,
                       num_references=num_references, steps=steps, learning_rate=learning_rate, drop_rate=drop_rate,
                       lock=lock, checkpoint_every=checkpoint_every, validation_every=validation_every,
                       processes=processes, batch_size=batch_size, resolution=resolution,
                       gradient_accumulation=gradient_accumulation, seed=seed, mixed_precision=mixed_precision)
    with _shown():
        return jobs.start(req)


def train_status(jobs: JobManager, job_id: str | None) -> dict[str, Any]:
    """``/train_status``: a job id -> its state, step, losses, checkpoints, pictures and log tail."""
    with _shown():
        return jobs.status(_chosen(job_id)).to_dict()


def train_stop(jobs: JobManager, job_id: str | None) -> dict[str, Any]:
    """``/train_stop``: SIGTERM, then SIGKILL after a timeout; -> the job's status once it has ended."""
    with _shown():
        return jobs.stop(_chosen(job_id), timeout=STOP_TIMEOUT).to_dict()


def resume(jobs: JobManager, job_id: str | None) -> gr.Dropdown:
    with _shown():
        jobs.resume(_chosen(job_id))
    return job_list(jobs, job_id)


def use_checkpoint(engine: Engine, jobs: JobManager, job_id: str | None, checkpoint: str | None,
                   progress=gr.Progress()) -> str:  # noqa: B008 (Gradio's idiom)
    """Make Compose (RetriNet runs) or Variations (Semantica runs) use a checkpoint of the job."""
    job_id = _chosen(job_id)
    progress(0, desc="Making a pipeline from the checkpoint")
    with _shown():
        choice = jobs.use_checkpoint(job_id, checkpoint or "latest")
        engine.use_model(choice.name, choice.folder)
    message = f"{USES[choice.name]} now uses {choice.checkpoint} of job {job_id} ({choice.folder})."
    gr.Info(message)
    return message


# ---------------------------------------------------------------------- the job view

def _when(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def summary(st: JobStatus) -> str:
    name = st.request.get("run_name") or st.request.get("name") or st.id
    parts = [f"**{name}** · {st.kind} · **{st.state}**"]
    if st.step is not None and st.max_steps:
        parts.append(f"step {st.step} of {st.max_steps} ({100 * (st.progress or 0):.0f} %)")
    elif st.kind in TRAINERS:
        parts.append("starting")
    parts.append(f"attempt {st.attempt}, started {_when(st.started)}, ended {_when(st.ended)}")
    lines = [" · ".join(parts)]
    if st.message and st.message not in ("running", st.state):
        lines.append(f"*{st.message}*")
    if st.losses:
        lines.append(f"last loss {st.losses[-1]['loss']:.4f}")
    if st.reference_gaps:
        g = st.reference_gaps[-1]
        lines.append(f"reference gap {100 * g['gap']:.1f} % at step {g['step']} (the share of the loss that a "
                     f"sample's own references explain, against another sample's; 0 % while RetriNet does not "
                     f"read them yet)")
    lines.append(f"output: `{st.output_dir}`" + (f" · result: `{st.result}`" if st.result else ""))
    return "\n\n".join(lines)


def loss_frame(st: JobStatus | None, limit: int = 2000):
    """The losses as a data frame for ``gr.LinePlot`` (at most ``limit`` points, evenly thinned)."""
    import pandas as pd

    losses = st.losses if st is not None else []
    if len(losses) > limit:
        stride = -(-len(losses) // limit)
        losses = losses[::stride] + ([losses[-1]] if (len(losses) - 1) % stride else [])
    return pd.DataFrame({"step": [r["step"] for r in losses], "loss": [r["loss"] for r in losses]})


def checkpoint_choices(st: JobStatus | None) -> list[str]:
    if st is None or st.kind not in TRAINERS:
        return []
    return (["final"] if st.result else []) + (["latest"] if st.checkpoints else []) + list(st.checkpoints)


def _pictures(paths: list[str], limit: int = 12) -> list[tuple[Any, str]]:
    """The newest ``limit`` pictures, read here: the workspace need not be a folder Gradio serves."""
    from PIL import Image

    out = []
    for path in paths[-limit:]:
        try:
            with Image.open(path) as im:
                im.load()
                out.append((im.copy(), Path(path).stem))
        except (OSError, ValueError):
            continue  # being written, or damaged: the next redraw tries again
    return out


def view(jobs: JobManager, job_id: str | None, shown: dict[str, Any] | None, data: str | None = None,
         checkpoint: str | None = None):
    """Redraw the selected job: (summary, log, loss plot, pictures, checkpoints, data folders, job list,
    what is shown). Parts that did not change are skipped, so the page does not flicker; the data
    folders are listed again when a data job finishes, the job list when the job's state changes."""
    shown = dict(shown or {})
    try:
        st = jobs.status(job_id) if job_id else None
    except ValueError as e:
        st, message = None, f"*{e}*"
    else:
        message = summary(st) if st else "*No job yet: generate a data set or launch a run.*"
    now = {"job": job_id, "summary": message, "log": st.log if st else [],
           "losses": (len(st.losses), st.losses[-1]["step"] if st.losses else None) if st else None,
           "pictures": st.pictures if st else [], "checkpoints": checkpoint_choices(st),
           "data_done": bool(st and st.kind in ("toybooru", "dataset") and st.state == "finished"),
           "state": st.state if st else None}
    same_job = shown.get("job") == job_id and "job" in shown

    def part(key: str, make):
        fresh = "job" not in shown or shown["job"] != job_id or shown.get(key) != now[key]
        return make() if fresh else gr.skip()

    outputs = (
        part("summary", lambda: message),
        part("log", lambda: "\n".join(now["log"])),
        part("losses", lambda: loss_frame(st)),
        part("pictures", lambda: _pictures(now["pictures"])),
        part("checkpoints", lambda: gr.Dropdown(
            choices=now["checkpoints"], value=checkpoint if same_job and checkpoint in now["checkpoints"]
            else (now["checkpoints"][0] if now["checkpoints"] else None))),
        data_list(jobs, data) if now["data_done"] and not shown.get("data_done") else gr.skip(),
        job_list(jobs, job_id) if same_job and shown.get("state") != now["state"] else gr.skip(),
        now,
    )
    return outputs


# ---------------------------------------------------------------------- the tab

def build(engine: Engine, demo: gr.Blocks, jobs: JobManager | None = None) -> JobManager:
    """The Train tab; ``jobs`` defaults to ``manager_for(engine)``. Returns the manager it uses."""
    jobs = jobs if jobs is not None else manager_for(engine)
    editable = not jobs.read_only
    bases = list(jobs.bases)
    small = engine.zoo == "demo"
    with gr.Tab("Train", id="train"):
        gr.Markdown("Train RetriNet (or Semantica) on a data set and compose with the result. Runs are "
                    "`accelerate launch` jobs in the background: they go on when the page is closed, and every tab "
                    f"of the studio sees them. Workspace: `{jobs.root}`.")
        if not editable:
            gr.Markdown("**Read-only here.** This studio runs as a Hugging Face Space, where training and data jobs "
                        "are disabled and local paths are not accepted. Run the studio on your own machine "
                        "(`python app.py`) to train.", elem_id="train-read-only")
        with gr.Accordion("1. Data", open=True), gr.Row():
            with gr.Column(variant="panel"):
                gr.Markdown("**Generate a Toybooru**: procedural characters with ground truth, in "
                            "`data/<name>` of the workspace.")
                with gr.Row():
                    tb_name = gr.Textbox("toybooru", label="Name", interactive=editable)
                    tb_num = gr.Number(240, label="Pictures",
                                       interactive=editable)
                with gr.Row():
                    tb_seed = gr.Number(0, label="Seed", interactive=editable)
                    tb_size = gr.Dropdown([64, 96, 128, 256, 512], value=64 if small else 256, label="Size (px)",
                                          interactive=editable)
                tb_btn = gr.Button("Generate", interactive=editable, elem_id="train-toybooru")
            with gr.Column(variant="panel"):
                gr.Markdown("**Build a data set from your pictures** (`training.build_dataset`): a folder of "
                            "pictures and a JSON / JSONL file of their ids, files and tags, inside the workspace "
                            "or the data folder.")
                ds_images = gr.Textbox(label="Pictures folder", placeholder="e.g. uploads/my-character",
                                       interactive=editable)
                ds_metadata = gr.Textbox(label="Metadata file", placeholder="e.g. uploads/my-character/posts.jsonl",
                                         interactive=editable)
                ds_name = gr.Textbox("mine", label="Name", interactive=editable)
                ds_btn = gr.Button("Build", interactive=editable)

        with gr.Accordion("2. Run", open=True):
            with gr.Row(equal_height=True):
                model = gr.Radio(list(TRAINERS), value="retrinet", label="Model", interactive=editable,
                                 elem_id="train-model")
                data = gr.Dropdown([], label="Data set", allow_custom_value=True, scale=3, interactive=editable,
                                   elem_id="train-data")
                data_refresh = gr.Button("Refresh", scale=0, min_width=90, interactive=editable)
                base = gr.Dropdown(bases, value=bases[0] if bases else None, label="Pretrained base",
                                   interactive=editable)
                run_name = gr.Textbox("run-1", label="Run name", interactive=editable, elem_id="train-run-name")
            with gr.Row():
                task = gr.Dropdown(list(TASKS), value="multitask", label="Task (RetriNet)", interactive=editable)
                setting = gr.Dropdown(list(SETTINGS), value="b", label="Setting (RetriNet)", interactive=editable)
                num_references = gr.Slider(1, 8, value=4, step=1, label="References (RetriNet)", interactive=editable)
                lock = gr.Dropdown(list(LOCKS), value="none", label="Lock (RetriNet)", interactive=editable)
            with gr.Row():
                steps = gr.Number(500, label="Steps", interactive=editable,
                                  elem_id="train-steps")
                learning_rate = gr.Number(1e-4, label="Learning rate", interactive=editable)
                drop_rate = gr.Slider(0, 1, value=0.5, step=0.05, label="Drop rate (prompt / picture)",
                                      interactive=editable)
                checkpoint_every = gr.Number(100, label="Checkpoint every (steps)",
                                             interactive=editable, elem_id="train-checkpoint-every")
                validation_every = gr.Number(100, label="Validation every (0: never)",
                                             interactive=editable, elem_id="train-validation-every")
            with gr.Row():
                processes = gr.Slider(1, MAX_PROCESSES, value=1, step=1, label="Processes", interactive=editable)
                batch_size = gr.Number(16 if small else 1,
                                       label="Batch size (per process)", interactive=editable,
                                       elem_id="train-batch-size")
                resolution = gr.Number(64 if small else 512,
                                       label="Resolution", interactive=editable, elem_id="train-resolution")
                gradient_accumulation = gr.Number(1,
                                                  label="Gradient accumulation", interactive=editable)
                seed = gr.Number(0, label="Seed", interactive=editable)
                mixed_precision = gr.Dropdown(list(PRECISIONS), value="no", label="Mixed precision",
                                              interactive=editable)
            launch_btn = gr.Button("Launch", variant="primary", interactive=editable, elem_id="train-launch")

        with gr.Accordion("3. Jobs", open=True):
            with gr.Row(equal_height=True):
                job = gr.Dropdown([], label="Job", allow_custom_value=True, scale=4, elem_id="train-job")
                jobs_refresh = gr.Button("Refresh", scale=0, min_width=90)
                stop_btn = gr.Button("Stop", variant="stop", scale=0, min_width=90, interactive=editable,
                                     elem_id="train-stop")
                resume_btn = gr.Button("Resume from latest", scale=0, min_width=150, interactive=editable,
                                       elem_id="train-resume")
            status = gr.Markdown(elem_id="train-status")
            with gr.Row():
                plot = gr.LinePlot(loss_frame(None), x="step", y="loss", title="Training loss", height=280,
                                   elem_id="train-loss-plot")
                pictures = gr.Gallery(label="Validation pictures", columns=2, height=280, object_fit="contain",
                                      elem_id="train-pictures")
            log = gr.Textbox(label="Log", lines=12, max_lines=12, interactive=False, autoscroll=True,
                             elem_id="train-log")
            with gr.Row(equal_height=True):
                checkpoint = gr.Dropdown([], label="Checkpoint", scale=3, elem_id="train-checkpoint")
                use_btn = gr.Button("Use in Compose / Variations", scale=1, interactive=editable,
                                    elem_id="train-use")
            used = gr.Markdown(elem_id="train-used")

        # client endpoints' output, with no widget of its own
        with gr.Group(visible=False):
            api_status = gr.JSON(label="Job status")
            status_btn = gr.Button("status")

        shown = gr.State({})  # what the page shows of the selected job, per user
        timer = gr.Timer(TICK)
        view_outputs = [status, log, plot, pictures, checkpoint, data, job, shown]
        redraw = partial(view, jobs)
        private = {"api_visibility": "private"}

        gr.on([demo.load], lambda: (job_list(jobs), data_list(jobs)), None, [job, data], **private)
        timer.tick(redraw, [job, shown, data, checkpoint], view_outputs, show_progress="hidden", **private)
        job.change(lambda j, d: redraw(j, {}, d), [job, data], view_outputs, show_progress="hidden", **private)
        jobs_refresh.click(lambda j: job_list(jobs, j), job, job, **private)
        data_refresh.click(lambda d: data_list(jobs, d), data, data, **private)
        tb_btn.click(partial(start_toybooru, jobs), [tb_name, tb_num, tb_seed, tb_size], job, **private)
        ds_btn.click(partial(start_dataset, jobs), [ds_images, ds_metadata, ds_name], job, **private)
        launch_btn.click(partial(train_start, jobs),
                         [model, data, run_name, base, task, setting, num_references, steps, learning_rate, drop_rate,
                          lock, checkpoint_every, validation_every, processes, batch_size, resolution,
                          gradient_accumulation, seed, mixed_precision],
                         job, api_name="train_start").then(lambda j: job_list(jobs, j), job, job, **private)
        status_btn.click(partial(train_status, jobs), job, api_status, api_name="train_status")
        stop_btn.click(partial(train_stop, jobs), job, api_status, api_name="train_stop", concurrency_limit=None).then(
            lambda j, d: redraw(j, {}, d), [job, data], view_outputs, **private)
        resume_btn.click(partial(resume, jobs), job, job, **private).then(
            lambda j, d: redraw(j, {}, d), [job, data], view_outputs, **private)
        use_btn.click(partial(use_checkpoint, engine, jobs), [job, checkpoint], used, **private)
    return jobs
