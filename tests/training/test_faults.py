"""Faults, tried and counted (issue 12, part 3).

- The RetriNet trainer is SIGKILLed at 5 seeded random moments, most of them inside the checkpoint
  procedure (weights written but not the rest, every file but the state file, just renamed, half of
  an old checkpoint deleted), and resumed from ``latest`` each time; it must end with the weights and
  the losses of an uninterrupted run. After every kill, every visible ``checkpoint-N`` must be complete.
- The dataset builder is SIGKILLed at 5 seeded random moments (in a shard, while a shard is written,
  when a shard appears, while the data set is copied, when ``annotations.jsonl`` lands) and run
  again each time; it must end with the records of an uninterrupted build, none lost, none twice.
- A checkpoint write that fails half-way (a full disk) keeps the previous checkpoint usable and
  ``latest``, shows no half-written ``checkpoint-N``, and says what happened.

The kill moments are made exact without hooks in the code under test: the killed processes are
started through a small launcher that wraps ``torch.save`` / ``os.replace`` / ``shutil.rmtree`` /
``shutil.copyfile`` / ``PIL.Image.Image.save`` so that, at the chosen moment, it leaves a marker
file and sleeps; the test kills the process as soon as the marker appears. ``FAULT_SEED`` (default 0)
picks the moments. Each suite prints its counts (kills, resumes, mismatches) for the CI log.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.core import CheckpointError, list_checkpoints, read_metrics, resolve_checkpoint
from training.train_retrinet import main as train_main
from training.train_retrinet import parse_args as train_args

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("FAULT_SEED", "0"))

# Runs ``-m MODULE ARGS...`` with fault points armed by FAULT_AT ("kind:number") and FAULT_MARKS (a folder).
LAUNCHER = r'''
import os, re, runpy, shutil, sys, time
from pathlib import Path

kind, _, number = os.environ["FAULT_AT"].partition(":")
number = int(number)
marks = Path(os.environ["FAULT_MARKS"])
seen = {"masks": 0, "copies": 0, "renamed": False}


def stop(event):
    """The chosen moment: say so, then wait for the SIGKILL."""
    (marks / event).write_text(str(os.getpid()))
    time.sleep(600)
    sys.exit("fault launcher: not killed")


import torch  # noqa: E402

real_save = torch.save


def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    p = Path(str(f))
    if p.parent.name == f".checkpoint-{number}.tmp":
        if (kind, p.name) in (("optimizer", "optimizer.bin"), ("rng", "random_states_0.pkl")):
            stop(f"{kind}-{number}")


torch.save = save

real_replace = os.replace


def replace(src, dst, *args, **kwargs):
    s, d = Path(src), Path(dst)
    if kind == "shard-write" and s.name.startswith(".shard-") and d.name == f"shard-{number:06d}.jsonl":
        stop(f"{kind}-{number}")  # the shard's temporary file is written, not yet renamed
    real_replace(src, dst, *args, **kwargs)
    if d.name == f"checkpoint-{number}" and s.name == f".checkpoint-{number}.tmp":
        seen["renamed"] = True
        if kind == "renamed":
            stop(f"{kind}-{number}")
    if kind == "move" and d.name == "annotations.jsonl" and s.parent.name.endswith(".tmp-build"):
        stop(f"{kind}-0")


os.replace = replace

real_rmtree = shutil.rmtree


def rmtree(path, *args, **kwargs):
    p = Path(path)
    if kind == "cleanup" and seen["renamed"] and p.is_dir() and re.search(r"checkpoint-\d+", p.name):
        victim = p / "model.safetensors"  # delete part of the old checkpoint, then die
        if victim.exists():
            victim.unlink()
        stop(f"{kind}-{number}")
    return real_rmtree(path, *args, **kwargs)


shutil.rmtree = rmtree

real_copyfile = shutil.copyfile


def copyfile(src, dst, *args, **kwargs):
    out = real_copyfile(src, dst, *args, **kwargs)
    if kind == "copy" and Path(dst).parent.parent.name.endswith(".tmp-build"):
        seen["copies"] += 1
        if seen["copies"] == number:
            stop(f"{kind}-{number}")
    return out


shutil.copyfile = copyfile

from PIL import Image  # noqa: E402

real_image_save = Image.Image.save


def image_save(self, fp, *args, **kwargs):
    out = real_image_save(self, fp, *args, **kwargs)
    p = Path(str(fp))
    if kind == "mask" and p.parent.name == "masks" and p.parent.parent.name == ".work":
        seen["masks"] += 1
        if seen["masks"] == number:
            stop(f"{kind}-{number}")
    return out


Image.Image.save = image_save

module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
'''


def launch(tmp_path: Path, module: str, args: list[str], fault: str, log: Path) -> tuple[subprocess.Popen, Path]:
    launcher = tmp_path / "fault_launcher.py"
    if not launcher.exists():
        launcher.write_text(LAUNCHER)
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAULT_AT": fault, "FAULT_MARKS": str(marks)}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(launcher), module, *args], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT)
    return proc, marks


def kill_on(proc: subprocess.Popen, path: Path, log: Path, timeout: float = 300, delay: float = 0.0) -> None:
    """SIGKILL ``proc`` once ``path`` exists (after ``delay`` more seconds); it must still be running."""
    deadline = time.time() + timeout
    try:
        while not path.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the process ended (status {proc.returncode}) before the kill moment:\n"
                                     + log.read_text()[-3000:])
            assert time.time() < deadline, f"the kill moment did not come within {timeout} s"
            time.sleep(0.01)
        time.sleep(delay)
        assert proc.poll() is None, "the process ended before the kill:\n" + log.read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


# ---------------------------------------------------------------------- the trainer

def retrinet_argv(tiny_sd, data, out, *extra) -> list[str]:
    """The tiniest run of tests/training/test_train_retrinet.py, every step checkpointed, two kept."""
    return ["--pretrained", str(tiny_sd), "--data", str(data), "--output-dir", str(out), "--resolution", "32",
            "--num-references", "2", "--train-batch-size", "2", "--gradient-accumulation-steps", "2",
            "--task", "compose", "--checkpointing-steps", "1", "--checkpoints-total-limit", "2",
            "--logging-steps", "1", *map(str, extra)]


CHECKPOINT_FILES = ("model.safetensors", "model_1.safetensors", "optimizer.bin", "scheduler.bin",
                    "random_states_0.pkl", "trainer_state.json")


def assert_visible_checkpoints_complete(out: Path) -> list[int]:
    """Every ``checkpoint-N`` folder (complete or not by ``list_checkpoints``) has every file, whole."""
    steps = []
    for folder in sorted(out.glob("checkpoint-*")):
        missing = [n for n in CHECKPOINT_FILES if not (folder / n).is_file()]
        assert not missing, f"{folder.name} is visible but lacks {missing}"
        for n in ("model.safetensors", "model_1.safetensors"):
            load_file(folder / n)  # a cut file does not parse
        state = json.loads((folder / "trainer_state.json").read_text())
        assert f"checkpoint-{state['global_step']}" == folder.name
        steps.append(state["global_step"])
    assert [s for s, _ in list_checkpoints(out)] == sorted(steps)
    return sorted(steps)


def report(capsys, line: str) -> None:
    """Print a count line past pytest's capture, so that CI logs show it."""
    with capsys.disabled():
        print(line, flush=True)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    w = {f"retrinet.{k}": v for k, v in load_file(out / "retrinet" / "diffusion_pytorch_model.safetensors").items()}
    w.update({f"unet.{k}": v for k, v in load_file(out / "unet" / "diffusion_pytorch_model.safetensors").items()})
    return w


@pytest.mark.slow  # about a minute: six trainer processes (CI runs the slow tests too)
def test_trainer_killed_at_five_random_moments_ends_with_the_uninterrupted_weights(tiny_sd, toybooru, tmp_path, capsys):
    steps = 12
    full = tmp_path / "full"
    train_main(train_args(retrinet_argv(tiny_sd, toybooru, full, "--max-train-steps", steps)))

    rng = random.Random(SEED)
    kinds = ["optimizer", "rng", "renamed", "cleanup", "training"]
    rng.shuffle(kinds)
    out = tmp_path / "killed"
    kills, resumes, in_save, log = 0, 0, 0, tmp_path / "run.log"
    moments = []
    for kind in kinds:
        found = [s for s, _ in list_checkpoints(out)]
        latest = max(found, default=0)
        # a step still to come (from 2: a kill in the first write leaves nothing to resume, which is
        # right, but untested here); "cleanup" needs three checkpoints to delete one of (two are kept)
        target = max(latest + rng.randint(1, 2), 2, latest + 3 - len(found) if kind == "cleanup" else 0)
        assert target <= steps - 2
        extra = ["--resume-from-checkpoint", "latest"] if latest else []
        proc, marks = launch(tmp_path, "training.train_retrinet",
                             retrinet_argv(tiny_sd, toybooru, out, "--max-train-steps", steps, *extra),
                             f"{kind}:{target}", log)
        resumes += bool(latest)
        if kind == "training":  # somewhere in the steps after a checkpoint, at a random time
            delay = rng.uniform(0.0, 0.5)
            kill_on(proc, out / f"checkpoint-{target}" / "trainer_state.json", log, delay=delay)
            moments.append(f"training, {delay:.2f} s after checkpoint-{target}")
        else:
            kill_on(proc, marks / f"{kind}-{target}", log)
            in_save += 1
            moments.append(f"{kind} of checkpoint-{target}")
        kills += 1
        visible = assert_visible_checkpoints_complete(out)
        assert visible, f"no checkpoint left after the kill at {moments[-1]}"
        if kind in ("optimizer", "rng"):  # killed inside the write: that step is not visible
            assert target not in visible and (out / f".checkpoint-{target}.tmp").is_dir()
        if kind in ("renamed", "cleanup"):
            assert target in visible

    resolve_checkpoint(out, "latest")
    train_main(train_args(retrinet_argv(tiny_sd, toybooru, out, "--max-train-steps", steps,
                                        "--resume-from-checkpoint", "latest")))
    resumes += 1
    assert not list(out.glob(".checkpoint-*"))  # what the kills left was removed at start

    a, b = final_weights(full), final_weights(out)
    assert a.keys() == b.keys()
    mismatched = sorted(k for k in a if not torch.allclose(a[k], b[k], rtol=0, atol=1e-6))
    exact = sum(torch.equal(a[k], b[k]) for k in a)
    la = {r["step"]: r["loss"] for r in read_metrics(full / "metrics.jsonl")}
    lb = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(lb) == list(range(1, steps + 1)), sorted(lb)
    loss_mismatches = [s for s in la if abs(la[s] - lb[s]) > 1e-6]
    report(capsys, f"\nfaults: trainer killed {kills} times ({in_save} inside the checkpoint procedure; seed {SEED}: "
          f"{'; '.join(moments)}), resumed {resumes} times; final weights: {len(mismatched)} of {len(a)} tensors "
          f"mismatched ({exact} bit-identical), losses: {len(loss_mismatches)} of {steps} steps mismatched")
    assert kills == 5 and in_save >= 3
    assert not mismatched, mismatched[:5]
    assert not loss_mismatches, [(s, la[s], lb[s]) for s in loss_mismatches]


# ---------------------------------------------------------------------- a full disk

def _retrinet_run(tiny_sd, toybooru, out, steps, *extra):
    return train_main(train_args(retrinet_argv(tiny_sd, toybooru, out, "--max-train-steps", steps,
                                               "--checkpoints-total-limit", "3", *extra)))


@pytest.fixture(scope="module")
def five_steps(tiny_sd, toybooru, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of an uninterrupted five-step run."""
    out = tmp_path_factory.mktemp("five") / "run"
    _retrinet_run(tiny_sd, toybooru, out, 5)
    return final_weights(out)


@pytest.mark.parametrize("where", ["optimizer", "weights"])
def test_a_checkpoint_write_that_fails_half_way_keeps_the_previous_one(tiny_sd, toybooru, tmp_path, monkeypatch,
                                                                       where, five_steps, capsys):
    import accelerate.utils.other as acc_other

    out = tmp_path / "run"
    failures = []

    def half_then_full(real):
        def save(obj, f, *args, **kwargs):
            p = Path(str(f))
            if p.parent.name != ".checkpoint-3.tmp":
                return real(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            torch.save(obj, buf) if where == "optimizer" else real(obj, str(tmp_path / "whole"), *args, **kwargs)
            data = buf.getvalue() if where == "optimizer" else (tmp_path / "whole").read_bytes()
            with open(p, "wb") as fh:
                fh.write(data[: len(data) // 2])  # half of the file, then the disk is full
            failures.append(p.name)
            if where == "optimizer":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p))
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save

    if where == "optimizer":
        monkeypatch.setattr(torch, "save", half_then_full(torch.save))
    else:  # safetensors raises its own error type, not OSError
        monkeypatch.setattr(acc_other, "safe_save_file", half_then_full(acc_other.safe_save_file))
    with pytest.raises(CheckpointError) as info:
        _retrinet_run(tiny_sd, toybooru, out, 5)
    monkeypatch.undo()
    message = str(info.value)
    assert failures == (["optimizer.bin"] if where == "optimizer" else ["model.safetensors"])
    assert "could not write checkpoint 3" in message and "No space left on device" in message
    assert "checkpoint-2" in message and "--resume-from-checkpoint latest" in message
    if where == "optimizer":
        assert info.value.errno == errno.ENOSPC
    # the earlier checkpoints are whole and latest points at the newest of them; nothing of step 3 shows
    assert assert_visible_checkpoints_complete(out) == [1, 2]
    assert resolve_checkpoint(out, "latest") == out / "checkpoint-2"
    assert not list(out.glob("*checkpoint-3*")), sorted(p.name for p in out.iterdir())
    # and it is usable: resumed, the run ends as one that never failed
    _retrinet_run(tiny_sd, toybooru, out, 5, "--resume-from-checkpoint", "latest")
    a, b = five_steps, final_weights(out)
    mismatched = [k for k in a if not torch.allclose(a[k], b[k], rtol=0, atol=1e-6)]
    report(capsys, f"\nfaults: disk full while writing {failures[0]} of checkpoint 3: 1 failed write, latest stayed "
          f"checkpoint-2, 1 resume, {len(mismatched)} of {len(a)} tensors mismatched")
    assert not mismatched


# ---------------------------------------------------------------------- the dataset builder

def hidden_metadata(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"id": r["id"], "file": r["file"], "tags": r["tags"], "character": r["character"],
                                        "artist": r["artist"]}) + "\n" for r in records))
    return path


def assert_complete_or_absent(out: Path) -> None:
    """``annotations.jsonl`` in the output means a whole data set: every file it names, and the report."""
    ann = out / "annotations.jsonl"
    if not ann.exists():
        return
    recs = [json.loads(x) for x in ann.read_text().splitlines()]
    missing = [p for r in recs for p in (r["file"], r["mask_file"]) if not (out / p).is_file()]
    assert not missing, f"annotations.jsonl is there but {len(missing)} of its files are not (first: {missing[0]})"
    assert (out / "report.json").is_file(), "annotations.jsonl is there but report.json is not"


def test_dataset_builder_killed_at_five_random_moments_loses_and_duplicates_nothing(toybooru, toybooru_records,
                                                                                    tmp_path, capsys):
    from training.build_dataset import main as build_main
    from training.build_dataset import parse_args as build_args

    meta = hidden_metadata(tmp_path / "meta.jsonl", toybooru_records)

    def argv(out):
        return ["--images", str(toybooru), "--metadata", str(meta), "--out", str(out), "--shard-size", "12"]

    reference = tmp_path / "reference"
    built = build_main(build_args(argv(reference)))
    ref_lines = (reference / "annotations.jsonl").read_text().splitlines()
    ref_ids = [json.loads(x)["id"] for x in ref_lines]
    shards = len(list((reference / ".work").glob("shard-*.jsonl")))
    assert shards >= 6 and built["kept"] >= 10

    rng = random.Random(SEED)
    out = tmp_path / "out"
    work = out / ".work"
    phase_one = ["shard", "mask", "shard-write"]
    rng.shuffle(phase_one)
    kills, reruns, moments, log = 0, 0, [], tmp_path / "build.log"
    for kind in phase_one + ["copy", "move"]:
        done = {int(p.stem.split("-")[1]) for p in work.glob("shard-*.jsonl")} if work.exists() else set()
        todo = [i for i in range(shards) if i not in done]
        assert kind not in phase_one or len(todo) >= 3, f"too few shards left to kill in: {todo}"
        early = todo[: len(todo) // 3 + 1]  # leave shards for the kills still to come
        if kind == "shard":
            number = rng.choice(early)  # killed as soon as this shard is on disk
        elif kind == "mask":
            number = rng.randint(1, 10)  # killed after this many masks of the run, inside a shard
        elif kind == "shard-write":
            number = rng.choice(early)  # killed between writing a shard's temporary file and renaming it
        elif kind == "copy":
            number = rng.randint(1, built["kept"])  # killed while the data set is copied together
        else:
            number = 0  # killed when annotations.jsonl lands in the output
        proc, marks = launch(tmp_path, "training.build_dataset", argv(out), f"{kind}:{number}", log)
        reruns += kills > 0
        if kind == "shard":
            kill_on(proc, work / f"shard-{number:06d}.jsonl", log)
        else:
            kill_on(proc, marks / f"{kind}-{number}", log)
        kills += 1
        moments.append(f"{kind} {number}")
        assert_complete_or_absent(out)
    build_main(build_args(argv(out)))
    reruns += 1

    lines = (out / "annotations.jsonl").read_text().splitlines()
    ids = [json.loads(x)["id"] for x in lines]
    lost = sorted(set(ref_ids) - set(ids))
    duplicated = len(ids) - len(set(ids))
    extra = sorted(set(ids) - set(ref_ids))
    files = sorted(p.relative_to(out).as_posix() for d in ("images", "masks") for p in (out / d).iterdir())
    ref_files = sorted(p.relative_to(reference).as_posix() for d in ("images", "masks")
                       for p in (reference / d).iterdir())
    stray = sorted(p.name for p in work.iterdir() if p.name.startswith("."))
    report(capsys, f"\nfaults: dataset builder killed {kills} times (seed {SEED}: {'; '.join(moments)}), run again {reruns} "
          f"times; {len(ids)} records of {len(ref_ids)}: {len(lost)} lost, {duplicated} duplicated, {len(extra)} "
          f"unexpected; {len(stray)} stray temporary files")
    assert kills == 5
    assert not lost and not duplicated and not extra
    assert ids == ref_ids and lines == ref_lines
    assert files == ref_files
    assert not stray, stray
    assert not (tmp_path / ".out.tmp-build").exists()
