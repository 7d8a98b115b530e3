"""The Train tab: its handlers, and /train_start, /train_status, /train_stop through gradio_client."""

from __future__ import annotations

import time

import gradio as gr
import pytest
from helpers import free_port

from pipelines.zoo import ModelZoo
from studio import train_tab
from studio.app import launch
from studio.engine import Engine
from studio.jobs import JobManager, JobStatus, ToybooruRequest, bases_from_spec


@pytest.fixture
def engine(tiny_zoo_spec, toybooru, tmp_path):
    """An engine of its own (using a checkpoint changes its models), with a workspace of its own."""
    return Engine(data=str(toybooru), models=ModelZoo(tiny_zoo_spec, device="cpu"), workspace=tmp_path / "ws")


def served(engine, jobs=None):
    with gr.Blocks() as demo:
        jobs = train_tab.build(engine, demo, jobs)
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    return demo, jobs, f"http://127.0.0.1:{port}/"


def test_a_run_through_the_endpoints_then_its_checkpoint_in_compose(engine, toybooru):
    from gradio_client import Client

    demo, jobs, url = served(engine)
    try:
        client = Client(url, verbose=False)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert set(endpoints) == {"/train_start", "/train_status", "/train_stop"}  # every other event is private
        assert [p["parameter_name"] for p in endpoints["/train_start"]["parameters"]][:6] == [
            "model", "data", "run_name", "base", "task", "setting"]
        with pytest.raises(Exception, match="steps 0 is outside"):
            client.predict(model="retrinet", data=str(toybooru), run_name="bad", base="demo", task="compose",
                           setting="b", num_references=2, steps=0, learning_rate=1e-3, drop_rate=0.5, lock="none",
                           checkpoint_every=2, validation_every=0, processes=1, batch_size=2, resolution=32,
                           api_name="/train_start")
        with pytest.raises(Exception, match="lies outside"):
            client.predict("retrinet", "/etc", "bad", "demo", "compose", "b", 2, 10, 1e-3, 0.5, "none", 2, 0, 1, 2, 32,
                           api_name="/train_start")
        job_id = client.predict("retrinet", str(toybooru), "api-run", "demo", "compose", "b", 2, 1000, 1e-3, 0.5,
                                "none", 2, 0, 1, 2, 32, api_name="/train_start")
        assert job_id.startswith("retrinet-")
        deadline = time.monotonic() + 240
        while True:
            status = client.predict(job_id, api_name="/train_status")
            if status["checkpoints"]:
                break
            assert status["state"] == "running", "\n".join(status["log"])
            assert time.monotonic() < deadline
            time.sleep(0.3)
        # newest first, every 2 steps (a loaded CPU can be slow enough between two polls for more than one)
        steps = [int(name.removeprefix("checkpoint-")) for name in status["checkpoints"]]
        assert steps == sorted(steps, reverse=True) and steps[-1] == 2 and all(k % 2 == 0 for k in steps)
        assert status["step"] >= steps[0] and status["max_steps"] == 1000
        assert status["losses"] and 0 < status["progress"] < 1
        stopped = client.predict(job_id, api_name="/train_stop")
        assert stopped["state"] == "stopped" and jobs.status(job_id).state == "stopped"
        with pytest.raises(Exception, match="no such job"):
            client.predict("../../etc/passwd", api_name="/train_status")
    finally:
        demo.close()

    message = train_tab.use_checkpoint(engine, jobs, job_id, "latest", progress=lambda *a, **k: None)
    assert message.startswith("Compose now uses checkpoint-") and engine.models.spec.retrinet in message
    with pytest.raises(gr.Error, match="Choose a job first"):
        train_tab.use_checkpoint(engine, jobs, None, "latest", progress=lambda *a, **k: None)


def test_the_view_redraws_only_what_changed(engine, tmp_path):
    jobs = train_tab.manager_for(engine)
    job_id = jobs.start(ToybooruRequest(name="view", num_images=12, size=32))
    deadline = time.monotonic() + 120
    while jobs.status(job_id).state == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    summary, log, plot, pictures, checkpoints, data, job_list, shown = train_tab.view(jobs, job_id, {})
    assert "**view** · toybooru · **finished**" in summary and "wrote 12 pictures" in log
    assert len(plot) == 0 and len(pictures) == 8 and checkpoints.choices == [] and data.choices[0] == ("data/view", "data/view")
    assert job_list == gr.skip()  # the list changes when the state does
    again = train_tab.view(jobs, job_id, shown)
    assert all(part == gr.skip() for part in again[:7]) and again[7] == shown
    changed = train_tab.view(jobs, job_id, {**shown, "state": "running"})
    assert changed[6].value == job_id and "finished" in changed[6].choices[0][0]
    empty = train_tab.view(jobs, None, {})
    assert "No job yet" in empty[0] and len(empty[2]) == 0
    missing = train_tab.view(jobs, "retrinet-20250101-000000-abcdef", {})
    assert "no such job" in missing[0]
    assert train_tab.job_list(jobs).value == job_id


def test_status_helpers(tmp_path):
    st = JobStatus(id="retrinet-20250101-000000-abcdef", kind="retrinet", state="running", message="running",
                   created=0.0, started=1.0, ended=None, returncode=None, attempt=2, output_dir=str(tmp_path),
                   data_dir=None, argv=[], request={"run_name": "r"},
                   losses=[{"step": i, "loss": 1.0 / i, "lr": 1e-4} for i in range(1, 5001)],
                   checkpoints=["checkpoint-4000", "checkpoint-2000"], step=5000, max_steps=10000)
    frame = train_tab.loss_frame(st)
    assert len(frame) <= 2001 and frame["step"].iloc[0] == 1 and frame["step"].iloc[-1] == 5000
    assert "step 5000 of 10000 (50 %)" in train_tab.summary(st) and "attempt 2" in train_tab.summary(st)
    assert "reference gap" not in train_tab.summary(st)
    st.reference_gaps = [{"step": 2000, "gap": 0.0123}, {"step": 4000, "gap": 0.0456}]
    assert "reference gap 4.6 % at step 4000" in train_tab.summary(st)  # the newest
    assert train_tab.checkpoint_choices(st) == ["latest", "checkpoint-4000", "checkpoint-2000"]
    st.result = str(tmp_path / "retrinet")
    assert train_tab.checkpoint_choices(st)[0] == "final"


def test_handlers_turn_errors_into_gr_error(engine, toybooru):
    jobs = train_tab.manager_for(engine)
    form = ("retrinet", str(toybooru), "r", "demo", "compose", "b", 2, 10, 1e-3, 0.5, "none", 2, 0, 1, 2, 32)
    with pytest.raises(gr.Error, match="learning rate"):
        train_tab.train_start(jobs, *form[:8], 5.0, *form[9:])
    with pytest.raises(gr.Error, match="run name"):
        train_tab.train_start(jobs, *form[:2], "../r", *form[3:])
    with pytest.raises(gr.Error, match="Choose a job first"):
        train_tab.train_status(jobs, "")
    with pytest.raises(gr.Error, match="no such job"):
        train_tab.train_stop(jobs, "nope")
    with pytest.raises(gr.Error, match="no such job"):
        train_tab.resume(jobs, "nope")
    with pytest.raises(gr.Error, match="data set name"):
        train_tab.start_toybooru(jobs, "a/b", 24, 0, 64)
    with pytest.raises(gr.Error, match="lies outside"):
        train_tab.start_dataset(jobs, "/etc", "/etc/passwd", "mine")


def test_the_studio_workspace_data_and_family_reach_the_manager(engine, toybooru, tiny_zoo_spec):
    jobs = train_tab.manager_for(engine)
    assert jobs.root == (engine.workspace).resolve() and jobs.data_roots == [toybooru.resolve()]
    assert jobs.bases == bases_from_spec(tiny_zoo_spec) and not jobs.read_only
    assert jobs.data_folders() == [str(toybooru.resolve())]


def test_read_only_on_a_space(engine, toybooru, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/retrinet-studio")
    with gr.Blocks() as demo:
        jobs = train_tab.build(engine, demo)
    assert isinstance(jobs, JobManager) and jobs.read_only
    props = {c["props"].get("elem_id"): c["props"] for c in demo.config["components"] if c["props"].get("elem_id")}
    assert props["train-launch"]["interactive"] is False and props["train-steps"]["interactive"] is False
    assert props["train-stop"]["interactive"] is False and props["train-use"]["interactive"] is False
    assert "train-read-only" in props
    form = ("retrinet", str(toybooru), "r", "demo", "compose", "b", 2, 10, 1e-3, 0.5, "none", 2, 0, 1, 2, 32)
    with pytest.raises(gr.Error, match="Hugging Face Space"):
        train_tab.train_start(jobs, *form)
    with pytest.raises(gr.Error, match="Hugging Face Space"):
        train_tab.start_toybooru(jobs, "tb", 24, 0, 64)
    assert jobs.data_folders() == []
