"""studio.jobs: training and data jobs as subprocesses, their state on disk, and what they are allowed to do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines.zoo import ModelZoo
from studio import jobs as jobs_module
from studio.engine import ComposeRequest, Engine, VaryRequest
from studio.jobs import (
    Base,
    DatasetRequest,
    JobManager,
    ReadOnly,
    ToybooruRequest,
    TrainRequest,
    bases_from_spec,
    list_checkpoints,
    read_gaps,
    read_losses,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bases(tiny_zoo_spec):
    """The tiny family's base: its RetriNet pipeline's components and the tiny CLIP as image encoder."""
    return bases_from_spec(tiny_zoo_spec)


@pytest.fixture
def manager(tmp_path, toybooru, bases):
    return JobManager(tmp_path / "workspace", data_roots=[toybooru], bases=bases)


def tiny_run(toybooru, **kw) -> TrainRequest:
    settings = {"data": str(toybooru), "run_name": "tiny", "steps": 1000, "checkpoint_every": 2,
                "validation_every": 2, "resolution": 32, "num_references": 2, "batch_size": 2, "task": "compose",
                "learning_rate": 1e-3}
    return TrainRequest(**{**settings, **kw})


def wait_for(manager: JobManager, job_id: str, done, timeout: float = 240.0):
    """Poll ``status`` until ``done(status)``; fail with the log if the job ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        st = manager.status(job_id, lines=30)
        if done(st):
            return st
        assert st.state == "running", f"{job_id} ended ({st.state}: {st.message}):\n" + "\n".join(st.log)
        assert time.monotonic() < deadline, "timed out:\n" + "\n".join(st.log)
        time.sleep(0.2)


def group_gone(pgid: int) -> bool:
    """No live process of group ``pgid`` (by ``ps``; a zombie waiting for init to reap it does not count)."""
    listing = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True, check=True).stdout
    return not any(int(g) == pgid and not st.startswith("Z") for g, st in (line.split() for line in listing.splitlines()))


def long_toybooru(name: str = "big") -> ToybooruRequest:
    return ToybooruRequest(name=name, num_images=50_000, seed=1, size=32)  # minutes of work: it gets stopped


# ---------------------------------------------------------------------- the life of a run

def test_a_run_checkpoints_stops_resumes_and_its_checkpoint_composes(manager, toybooru, tiny_zoo_spec, files):
    job_id = manager.start(tiny_run(toybooru))
    st = wait_for(manager, job_id, lambda s: s.checkpoints)
    assert st.state == "running" and st.attempt == 1 and st.kind == "retrinet"
    assert st.checkpoints[0] == "checkpoint-2" and st.step >= 2 and st.max_steps == 1000
    assert 0 < st.progress < 1 and all(r["loss"] > 0 for r in st.losses)
    assert any("training" in line for line in manager.status(job_id, lines=500).log)

    # a restarted studio (a new manager on the same folder) sees the same running job
    again = JobManager(manager.root, data_roots=manager.data_roots, bases=manager.bases)
    assert [(j.id, j.state, j.name) for j in again.list_jobs()] == [(job_id, "running", "tiny")]
    st = wait_for(again, job_id, lambda s: s.pictures)  # validation grids, as train_retrinet writes them
    assert Path(st.pictures[0]).name == "step-000002.png"
    assert st.reference_gaps[0]["step"] == 2 and -1 < st.reference_gaps[0]["gap"] < 1  # written before the grid

    pgid = json.loads((manager.jobs_dir / job_id / "job.json").read_text())["pgid"]
    st = again.stop(job_id, timeout=20)
    # ended by the SIGTERM: killed by it (-15), or exiting on it with the conventional 128 + 15 (a CI run saw the
    # launcher do that); None when the manager that stops it did not start it
    assert st.state == "stopped" and st.returncode in (None, -signal.SIGTERM, 128 + signal.SIGTERM)
    assert group_gone(pgid)
    assert manager.status(job_id).state == "stopped"
    stopped_at = max(int(c.split("-")[1]) for c in st.checkpoints)

    st = manager.resume(job_id)
    assert st.state == "running" and st.attempt == 2
    assert st.argv[-2:] == ["--resume-from-checkpoint", "latest"] and "--output-dir" in st.argv
    newer = f"checkpoint-{stopped_at + 2}"
    st = wait_for(manager, job_id, lambda s: newer in s.checkpoints)
    assert "resumed from" in "\n".join(manager.status(job_id, lines=2000).log)
    steps = [r["step"] for r in st.losses]
    assert steps == sorted(set(steps)) and steps[0] == 1  # one line per step across both attempts
    st = manager.stop(job_id, timeout=20)
    assert st.state == "stopped" and [a["attempt"] for a in
                                      json.loads((manager.jobs_dir / job_id / "job.json").read_text())["attempts"]] == [1, 2]

    choice = manager.use_checkpoint(job_id, newer)
    assert choice.name == "retrinet" and choice.checkpoint == newer
    assert (Path(choice.folder) / "model_index.json").is_file()
    assert manager.use_checkpoint(job_id, "latest").checkpoint == st.checkpoints[0]

    engine = Engine(models=ModelZoo(tiny_zoo_spec, device="cpu"), workspace=manager.root)
    before = engine.compose(ComposeRequest("a girl", [(files[0], "face")], steps=2, seed=3, width=32, height=32))
    engine.use_model("retrinet", choice.folder)
    assert engine.models.spec.retrinet == choice.folder
    after = engine.compose(ComposeRequest("a girl", [(files[0], "face")], steps=2, seed=3, width=32, height=32))
    assert after.pictures[0].image.size == (32, 32)
    assert after.pictures[0].image.tobytes() != before.pictures[0].image.tobytes()  # the trained weights count
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        manager.use_checkpoint(job_id, "checkpoint-999")
    with pytest.raises(ValueError, match="no final model yet"):
        manager.use_checkpoint(job_id, "final")
    with pytest.raises(ValueError, match="no model_index.json"):
        engine.use_model("retrinet", manager.root)


@pytest.fixture(scope="module")
def files(toybooru, toybooru_records):
    high = [r for r in toybooru_records if r["face_bbox"][3] < r["height"] / 2][:2]
    return [str(toybooru / r["file"]) for r in high]


def test_a_finished_semantica_run_gives_variations_from_a_checkpoint_and_its_final_pipeline(manager, toybooru,
                                                                                            tiny_zoo_spec, files):
    job_id = manager.start(TrainRequest(model="semantica", data=str(toybooru), run_name="sem", steps=2,
                                        checkpoint_every=1, resolution=32, batch_size=2, drop_rate=0.1))
    st = wait_for(manager, job_id, lambda s: s.state != "running")
    assert st.state == "finished" and st.returncode == 0, "\n".join(st.log)
    assert st.checkpoints == ["checkpoint-2", "checkpoint-1"] and st.result and st.progress == 1.0
    engine = Engine(models=ModelZoo(tiny_zoo_spec, device="cpu"), workspace=manager.root)
    for checkpoint in ("checkpoint-1", "final"):
        choice = manager.use_checkpoint(job_id, checkpoint)
        engine.use_model(choice.name, choice.folder)
        out = engine.vary(VaryRequest(files[0], num_images=1, steps=2, seed=0, width=32, height=32))
        assert choice.name == "semantica" and out.pictures[0].image.size == (32, 32)
    with pytest.raises(ReadOnly):
        JobManager(manager.root, read_only=True).use_checkpoint(job_id, "final")


# ---------------------------------------------------------------------- surviving restarts and crashes

def test_data_jobs_finish_and_their_state_survives_a_new_manager(manager):
    job_id = manager.start(ToybooruRequest(name="small", num_images=24, seed=2, size=32))
    st = wait_for(manager, job_id, lambda s: s.state != "running", timeout=120)
    assert st.state == "finished" and st.returncode == 0 and st.progress == 1.0
    assert st.result == str(manager.root / "data" / "small") and len(st.pictures) == 8
    assert manager.data_folders()[0] == "data/small"
    record = json.loads((manager.jobs_dir / job_id / "job.json").read_text())
    assert record["argv"][1:3] == ["-m", "training.data.toybooru"] and record["status"] == "finished"
    fresh = JobManager(manager.root, data_roots=manager.data_roots)
    assert fresh.status(job_id).state == "finished" and fresh.status(job_id).log == st.log
    with pytest.raises(ValueError, match="data set name 'small' is taken"):
        manager.start(ToybooruRequest(name="small", num_images=24))


def test_a_killed_process_and_a_reused_pid_are_detected(manager):
    job_id = manager.start(long_toybooru())
    path = manager.jobs_dir / job_id / "job.json"
    os.kill(json.loads(path.read_text())["pid"], signal.SIGKILL)
    other = JobManager(manager.root, data_roots=manager.data_roots)  # a second studio on the same folder
    deadline = time.monotonic() + 30
    while other.status(job_id).state == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    st = other.status(job_id)
    assert st.state == "failed" and ("killed by signal 9" in st.message or "gone" in st.message)
    assert manager.status(job_id).state == "failed"

    # a studio restarted while its job ran: the job's process is no child of the new manager
    record = json.loads(path.read_text())
    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)
    threading.Thread(target=orphan.wait, daemon=True).start()  # reaped as init would reap it
    ticks = jobs_module._proc_start(orphan.pid)
    path.write_text(json.dumps({**record, "status": "running", "pid": orphan.pid, "pgid": orphan.pid,
                                "start_ticks": ticks, "stop_requested": False}))
    restarted = JobManager(manager.root)
    assert restarted.status(job_id).state == "running"
    orphan.kill()
    deadline = time.monotonic() + 30
    while restarted.status(job_id).state == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    st = restarted.status(job_id)
    assert st.state == "failed" and "gone" in st.message and st.returncode is None

    # a record whose pid now belongs to another process (this one) is not taken for running, nor signalled
    path.write_text(json.dumps({**record, "status": "running", "pid": os.getpid(), "pgid": os.getpid(),
                                "start_ticks": 1}))
    assert JobManager(manager.root).status(job_id).state == "failed"
    leader = subprocess.Popen(["sleep", "60"], start_new_session=True)  # the pid went to a new group's leader
    try:
        path.write_text(json.dumps({**record, "status": "running", "pid": leader.pid, "pgid": leader.pid,
                                    "start_ticks": 1}))
        assert JobManager(manager.root).status(job_id).state == "failed"
    finally:
        leader.kill()
        leader.wait()
    path.write_text(json.dumps({**record, "status": "running", "pid": 2**22 + 12345, "start_ticks": None}))
    assert JobManager(manager.root).list_jobs()[0].state == "failed"


def test_one_job_at_a_time_unless_configured(manager, tmp_path, toybooru, bases):
    first = manager.start(long_toybooru("one"))
    try:
        with pytest.raises(ValueError, match=r"already running .*at most 1 may run at once"):
            manager.start(long_toybooru("two"))
        with pytest.raises(ValueError, match="already running"):  # another manager on the folder agrees
            JobManager(manager.root, data_roots=[toybooru], bases=bases).start(long_toybooru("two"))
        with pytest.raises(ValueError, match="is running; stop it"):
            manager.resume(first)
        two = JobManager(manager.root, max_running=2)
        second = two.start(long_toybooru("two"))
        assert {j.state for j in two.list_jobs()} == {"running"}
        st = two.stop(second, timeout=10)
        assert st.state == "stopped" and st.returncode == -signal.SIGTERM
    finally:
        st = manager.stop(first, timeout=10)
    assert st.state == "stopped" and manager.stop(first).state == "stopped"  # stopping twice is harmless
    assert all(j.state == "stopped" for j in manager.list_jobs())


def test_stop_kills_a_job_that_ignores_sigterm(manager, monkeypatch):
    stubborn = ["-c", ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
                       "time.sleep(600)")]
    real = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **kw: real([argv[0], *stubborn], **kw))
    job_id = manager.start(ToybooruRequest(name="stubborn"))
    wait_for(manager, job_id, lambda s: "up" in s.log)
    t0 = time.monotonic()
    st = manager.stop(job_id, timeout=0.5)
    assert st.state == "stopped" and st.returncode == -signal.SIGKILL and time.monotonic() - t0 < 10


# ---------------------------------------------------------------------- what may run

def test_commands_are_argument_lists_and_no_shell_is_ever_used(manager, toybooru, monkeypatch):
    calls = []
    real = subprocess.Popen

    def spy(argv, **kw):
        calls.append((argv, kw))
        assert kw.get("shell") is False and isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        return real(argv, **kw)

    monkeypatch.setattr(subprocess, "Popen", spy)
    job_id = manager.start(ToybooruRequest(name="listed", num_images=12, size=32))
    wait_for(manager, job_id, lambda s: s.state != "running", timeout=120)
    assert len(calls) == 1 and calls[0][1]["start_new_session"] is True

    # a folder whose name looks like shell code is one argument, and runs nothing
    odd = manager.root / "data" / "x; touch pwned $(touch pwned2) `touch pwned3`"
    odd.mkdir(parents=True)
    (odd / "annotations.jsonl").write_text("")
    plan = manager.plan(tiny_run(odd, processes=2))
    assert str(odd) in plan.argv and plan.argv[plan.argv.index("--data") + 1] == str(odd)
    assert plan.argv[:3] == [manager.python, "-m", "accelerate.commands.launch"]
    launch = plan.argv[:plan.argv.index("-m", 3)]
    assert launch[launch.index("--num_processes") + 1] == "2" and "--multi_gpu" in launch
    assert plan.argv[plan.argv.index("-m", 3) + 1] == "training.train_retrinet"
    assert "--multi_gpu" not in manager.plan(tiny_run(odd)).argv
    sem = manager.plan(tiny_run(odd, model="semantica"))
    assert "training.train_semantica" in sem.argv and "--image-encoder" in sem.argv and "--lock" not in sem.argv
    source = Path(jobs_module.__file__).read_text()
    assert "shell=True" not in source and "os.system" not in source and "os.popen" not in source
    assert not list(Path.cwd().glob("pwned*")) and not list(manager.root.rglob("pwned*"))


def test_paths_outside_the_workspace_and_data_roots_are_refused(manager, tmp_path, toybooru):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "annotations.jsonl").write_text("")
    (manager.root / "data").mkdir(parents=True)
    (manager.root / "data" / "escape").symlink_to(outside)
    for bad, match in (("../outside", r"may not contain '\.\.'"), ("data/../../outside", r"'\.\.'"),
                       (str(outside), "lies outside"), ("/etc", "lies outside"), ("data/escape", "lies outside"),
                       ("~/anything", "not an accepted path"), ("", "must be given")):
        with pytest.raises(ValueError, match=match):
            manager.plan(tiny_run(bad))
    with pytest.raises(ValueError, match="lies outside"):
        manager.plan(DatasetRequest(images="/etc", metadata="/etc/passwd"))
    with pytest.raises(ValueError, match="lies outside"):
        manager.plan(DatasetRequest(images=str(toybooru), metadata="data/escape/annotations.jsonl"))
    for name in ("../evil", "/tmp/evil", "a/b", ".hidden", "x" * 65, "a;b"):
        with pytest.raises(ValueError, match="run name"):
            manager.plan(tiny_run(toybooru, run_name=name))
    # an output folder whose parent is a symlink that leads out
    (manager.root / "runs").symlink_to(outside)
    with pytest.raises(ValueError, match="lies outside"):
        manager.plan(tiny_run(toybooru))
    # inside the workspace, relative or absolute, and inside a data root: accepted
    inside = manager.root / "data" / "mine"
    inside.mkdir()
    (inside / "annotations.jsonl").write_text("")
    assert manager.resolve_input("data/mine") == inside.resolve() == manager.resolve_input(str(inside))
    assert manager.resolve_input(str(toybooru)) == toybooru.resolve()
    # a job record edited on disk to point outside is refused too
    job_id = manager.start(ToybooruRequest(name="t", num_images=12, size=32))
    wait_for(manager, job_id, lambda s: s.state != "running", timeout=120)
    record = json.loads((manager.jobs_dir / job_id / "job.json").read_text())
    (manager.jobs_dir / job_id / "job.json").write_text(json.dumps({**record, "output_dir": str(outside)}))
    with pytest.raises(ValueError, match="outside"):
        manager.status(job_id)
    for bad_id in ("../../etc", "x", "retrinet-20250101-000000-zzzzzz", None):
        with pytest.raises(ValueError, match="no such job"):
            manager.status(bad_id)


def test_read_only_mode_starts_nothing_and_accepts_no_local_path(tmp_path, toybooru, bases):
    ro = JobManager(tmp_path / "space", read_only=True, data_roots=[toybooru], bases=bases)
    for call in (lambda: ro.start(tiny_run(toybooru)), lambda: ro.start(ToybooruRequest()),
                 lambda: ro.resolve_input(str(toybooru)), lambda: ro.plan(tiny_run(toybooru)),
                 lambda: ro.stop("toybooru-20250101-000000-abcdef"), lambda: ro.resume("toybooru-20250101-000000-abcdef")):
        with pytest.raises(ReadOnly, match="Hugging Face Space"):
            call()
    assert ro.list_jobs() == [] and ro.data_folders() == [] and not (tmp_path / "space").exists()


@pytest.mark.parametrize(("changes", "field"), [
    ({"model": "dalle"}, "model"), ({"task": "paint"}, "task"), ({"setting": "c"}, "setting"),
    ({"lock": "all"}, "lock"), ({"num_references": 0}, "number of references"), ({"num_references": 9}, "number of references"),
    ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": True}, "steps"), ({"steps": "10"}, "steps"),
    ({"learning_rate": 0}, "learning rate"), ({"learning_rate": float("nan")}, "learning rate"),
    ({"learning_rate": 1.0}, "learning rate"), ({"drop_rate": 1.5}, "drop rate"), ({"drop_rate": -0.1}, "drop rate"),
    ({"checkpoint_every": 0}, "checkpoint interval"), ({"validation_every": -1}, "validation interval"),
    ({"processes": 0}, "processes"), ({"processes": 99}, "processes"), ({"batch_size": 0}, "batch size"),
    ({"resolution": 31}, "resolution"), ({"resolution": 100}, "resolution 100 is not a multiple of 8"),
    ({"resolution": 4096}, "resolution"), ({"gradient_accumulation": 0}, "gradient accumulation"),
    ({"seed": -1}, "seed"), ({"seed": 2**32}, "seed"), ({"mixed_precision": "fp8"}, "mixed precision"),
    ({"base": "sdxl"}, "base must be one of"), ({"run_name": ""}, "run name"), ({"data": ""}, "data folder"),
])
def test_bad_values_give_a_value_error_naming_the_field(manager, toybooru, changes, field):
    with pytest.raises(ValueError, match=field):
        manager.plan(tiny_run(toybooru, **changes))


def test_bad_data_requests_and_calls_name_what_is_wrong(manager, toybooru):
    for req, field in ((ToybooruRequest(num_images=0), "number of pictures"), (ToybooruRequest(size=16), "picture size"),
                       (ToybooruRequest(seed=-3), "seed"), (ToybooruRequest(name="../x"), "data set name"),
                       (DatasetRequest(images="", metadata="m.jsonl"), "pictures folder"),
                       (DatasetRequest(images=str(toybooru), metadata=str(toybooru / "images")), "not a file"),
                       (DatasetRequest(images=str(toybooru), metadata=str(toybooru / "annotations.jsonl"),
                                       test_share=2), "test share")):
        with pytest.raises(ValueError, match=field):
            manager.plan(req)
    with pytest.raises(ValueError, match="unknown request"):
        manager.plan("toybooru")
    with pytest.raises(ValueError, match="no annotations.jsonl"):
        manager.plan(tiny_run(toybooru / "images"))
    with pytest.raises(ValueError, match="no image encoder"):
        JobManager(manager.root, data_roots=[toybooru], bases={"sd": Base("somewhere")}).plan(
            tiny_run(toybooru, model="semantica"))
    with pytest.raises(ValueError, match="no pretrained base is configured"):
        JobManager(manager.root, data_roots=[toybooru]).plan(tiny_run(toybooru))
    with pytest.raises(ValueError, match="max_running"):
        JobManager(manager.root, max_running=0)
    job_id = manager.start(ToybooruRequest(name="data-only", num_images=12, size=32))
    wait_for(manager, job_id, lambda s: s.state != "running", timeout=120)
    with pytest.raises(ValueError, match="only training runs have checkpoints"):
        manager.use_checkpoint(job_id)
    with pytest.raises(ValueError, match="timeout"):
        manager.stop(job_id, timeout=-1)
    with pytest.raises(ValueError, match="lines"):
        manager.status(job_id, lines=-1)


def test_a_data_set_build_runs_as_a_job_with_progress(manager, toybooru, toybooru_records):
    records = toybooru_records[:24]
    meta = manager.root / "uploads" / "posts.jsonl"
    meta.parent.mkdir(parents=True)
    meta.write_text("".join(json.dumps({"id": r["id"], "file": r["file"], "tags": r["tags"], "character": r["character"],
                                        "artist": r["artist"]}) + "\n" for r in records))
    job_id = manager.start(DatasetRequest(images=str(toybooru), metadata="uploads/posts.jsonl", name="built"))
    st = wait_for(manager, job_id, lambda s: s.state != "running", timeout=240)
    assert st.state == "finished", "\n".join(st.log)
    assert (st.step, st.max_steps) == (1, 1) and st.pictures == [str(manager.root / "data" / "built" / "report.png")]
    assert "data/built" in manager.data_folders()


# ---------------------------------------------------------------------- reading a run's files

def test_losses_and_checkpoints_are_read_tolerantly(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 0.5, "lr": 0.001}\nnot json\n{"step": 2, "loss": NaN}\n'
                       '{"step": 3, "loss": 0.25}\n{"step": 4, "lo')
    assert read_losses(metrics) == [{"step": 1, "loss": 0.5, "lr": 0.001}, {"step": 3, "loss": 0.25, "lr": None}]
    assert read_losses(tmp_path / "missing.jsonl") == []
    gaps = tmp_path / "reference_gap.jsonl"
    gaps.write_text('{"step": 100, "gap": 0.01, "own": [0.1]}\n{"step": 200, "gap": Infinity}\n{"step": true, "gap": 0.5}\n'
                    '{"step": 300, "gap": 0.05}\n{"step": 400, "ga')
    assert read_gaps(gaps) == [{"step": 100, "gap": 0.01}, {"step": 300, "gap": 0.05}]
    assert read_gaps(tmp_path / "missing.jsonl") == []
    for name, complete in (("checkpoint-2", True), ("checkpoint-10", True), (".checkpoint-12.tmp", True),
                           ("checkpoint-11", False), ("checkpoint-x", True)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    assert [p.name for _, p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]  # by step, oldest first
    log = tmp_path / "log.txt"
    log.write_text("a\nprogress 10%\rprogress 50%\rprogress 100%\nb\n")
    assert jobs_module._tail(log, 2) == ["progress 100%", "b"]


def test_the_studio_lists_checkpoints_without_importing_accelerate():
    """``studio.jobs`` shares ``training.checkpoints`` with the trainer, not ``training.core`` (Accelerate, torch)."""
    code = "import sys, studio.jobs; print(sorted(m for m in ('accelerate', 'training.core') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_job_runs_until_the_last_process_of_its_group_ends(manager, monkeypatch):
    """``accelerate launch`` can end at SIGTERM before the trainer it started has saved and exited: the job is
    shown running (and cannot be resumed into the same folder) until that trainer has ended too."""
    child = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (time.sleep(2), sys.exit(0))); "
             "print('child up', flush=True); time.sleep(600)")
    launcher = ["-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); "
                      "time.sleep(600)"]
    real = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **kw: real([argv[0], *launcher], **kw))
    job_id = manager.start(ToybooruRequest(name="launcher"))
    monkeypatch.undo()  # started; group_gone runs ps
    wait_for(manager, job_id, lambda s: "child up" in s.log)
    record = json.loads((manager.jobs_dir / job_id / "job.json").read_text())
    stopped = []
    t0 = time.monotonic()
    stopping = threading.Thread(target=lambda: stopped.append(manager.stop(job_id, timeout=30)))
    stopping.start()
    while jobs_module._proc_start(record["pid"]) is not None:  # the launcher ends at once
        assert time.monotonic() - t0 < 10
        time.sleep(0.02)
    assert not group_gone(record["pgid"])  # the child is still saving
    assert manager.status(job_id).state == "running"
    assert JobManager(manager.root).status(job_id).state == "running"  # another studio sees the same
    with pytest.raises(ValueError, match="is running; stop it"):
        manager.resume(job_id)
    stopping.join(timeout=60)
    st = stopped[0]
    assert st.state == "stopped" and st.message == "stopped on request"  # no SIGKILL was needed
    assert group_gone(record["pgid"]) and time.monotonic() - t0 < 30
