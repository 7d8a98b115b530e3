"""Training and data jobs as subprocesses, with their state on disk. No Gradio here.

The Train tab (``studio/train_tab.py``) starts, watches, stops and resumes jobs through a
``JobManager``. A job runs one command of this project as a subprocess:

- ``toybooru``: ``python -m training.data.toybooru`` draws a Toybooru into ``<workspace>/data/NAME``;
- ``dataset``: ``python -m training.build_dataset`` builds a RetriBooru-style data set from a folder
  of pictures and a metadata file into ``<workspace>/data/NAME``;
- ``retrinet`` / ``semantica``: ``accelerate launch -m training.train_retrinet`` /
  ``training.train_semantica`` into ``<workspace>/runs/NAME`` (checkpoints, ``metrics.jsonl``,
  ``validation/``, and at the end ``retrinet/`` [+ ``unet/``] or ``semantica/``).

State lives in ``<workspace>/jobs/<job id>/``: ``job.json`` (replaced atomically on every change:
kind, request, argv, status, pid, times, return code, output and data folders, attempts) and
``log.txt`` (the subprocess's stdout and stderr). A browser reload, a second tab or a restarted
studio (a new ``JobManager`` on the same folder) sees the same jobs; a manager that finds a job
marked running whose process is gone, or whose pid now belongs to another process (the start
time in ``/proc/<pid>/stat`` differs), marks it failed (or stopped, when a stop was asked for).

Security (issue [12], part 4): every setting is checked against an allow-list or a range and
becomes an argument list (``subprocess.Popen(list, shell=False)``: no shell anywhere); data
folders must lie inside the workspace or a configured data root and outputs inside the
workspace (``..``, absolute paths elsewhere and symlinks that lead out are refused); the
pretrained base is picked by name from ``bases``, never typed as a path. Read-only (a Hugging
Face Space) starts nothing and accepts no local path at all.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from studio.checks import check_integer as _integer
from studio.checks import check_number as _number
from training.checkpoints import list_checkpoints
from training.export import export_retrinet, export_semantica
from training.files import replacing_folder, write_text

try:  # file locks keep two studios on one workspace from racing past the running-job limit
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]  # the project: subprocesses run here (python -m training...)

KINDS = ("toybooru", "dataset", "retrinet", "semantica")
TRAINERS = ("retrinet", "semantica")
STATES = ("running", "finished", "failed", "stopped")
TASKS = ("recon", "compose", "multitask")
SETTINGS = ("a", "b")
LOCKS = ("none", "decoder", "both")
PRECISIONS = ("no", "fp16", "bf16")
MAX_PROCESSES = 8
MAX_STEPS = 1_000_000
MAX_SEED = 2**32 - 1
CHECKPOINTS_KEPT = 5  # --checkpoints-total-limit of the runs the studio starts
LOG_LINES = 40
JOB_ID = re.compile(r"^(toybooru|dataset|retrinet|semantica)-\d{8}-\d{6}-[0-9a-f]{6}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # run and data-set names: one folder, no path
RESULTS = {"toybooru": "annotations.jsonl", "dataset": "report.json", "retrinet": "retrinet/config.json",
           "semantica": "semantica/model_index.json"}  # what a finished job leaves in its output folder
SHARD_DONE = re.compile(r"shard (\d+) of (\d+) done")  # training.build_dataset's progress lines


class ReadOnly(ValueError):
    """The studio runs as a Hugging Face Space: jobs cannot start there and local paths are refused."""


READ_ONLY_MESSAGE = ("This studio runs as a Hugging Face Space, where training and data jobs are disabled and local "
                     "paths are not accepted. Run the studio on your own machine (python app.py) to train.")


# ---------------------------------------------------------------------- checked values



def _choice(what: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _name(what: str, value: Any) -> str:
    """A folder name: letters, digits, '_', '-', '.'; starting with a letter or digit; no '..'."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be given")
    value = value.strip()
    if not NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{what} {value!r} may hold only letters, digits, '_', '-' and '.', start with a letter "
                         f"or digit, and be at most 64 characters (it names one folder)")
    return value


def check_job_id(job_id: Any) -> str:
    """A job id as ``JobManager`` makes them (``KIND-YYYYmmdd-HHMMSS-xxxxxx``); anything else is refused."""
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id.strip()):
        raise ValueError(f"no such job {job_id!r}")
    return job_id.strip()


# ---------------------------------------------------------------------- requests

@dataclass(frozen=True)
class Base:
    """A pretrained base a run may start from; the Train tab offers these by name only."""

    pretrained: str  # a diffusers folder or Hub id with vae/, unet/, scheduler/ (and text_encoder/, tokenizer/)
    image_encoder: str | None = None  # Semantica's frozen encoder: a DINOv2 or CLIP folder or Hub id


def bases_from_spec(spec: Any) -> dict[str, Base]:
    """The bases a model family offers (``pipelines.zoo.ZooSpec``): its Stable Diffusion model, or the
    components of its RetriNet pipeline folder (the demo family), with its image encoder (or CLIP)."""
    pretrained = spec.stable_diffusion
    if not pretrained and spec.retrinet and (Path(spec.retrinet) / "model_index.json").is_file():
        pretrained = spec.retrinet
    if not pretrained:
        return {}
    return {spec.family: Base(str(pretrained), spec.image_encoder or spec.clip)}


@dataclass(frozen=True)
class ToybooruRequest:
    """Draw a Toybooru (``training.data.toybooru``) into ``<workspace>/data/<name>``."""

    name: str = "toybooru"
    num_images: int = 240
    seed: int = 0
    size: int = 128  # picture side in pixels

    def checked(self) -> ToybooruRequest:
        return ToybooruRequest(_name("data set name", self.name), _integer("number of pictures", self.num_images, 12, 50_000),
                               _integer("seed", self.seed, 0, MAX_SEED), _integer("picture size", self.size, 32, 1024))


@dataclass(frozen=True)
class DatasetRequest:
    """Build a RetriBooru-style data set (``training.build_dataset``) into ``<workspace>/data/<name>``."""

    images: str  # the pictures' folder, inside the workspace or a data root
    metadata: str  # JSON / JSONL records (id, file, tags), inside the workspace or a data root
    name: str = "dataset"
    test_share: float = 0.1  # share of characters put in the test split

    def checked(self) -> DatasetRequest:
        for what, v in (("pictures folder", self.images), ("metadata file", self.metadata)):
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{what} must be given")
        return DatasetRequest(self.images.strip(), self.metadata.strip(), _name("data set name", self.name),
                              _number("test share", self.test_share, 0.0, 0.9))


@dataclass(frozen=True)
class TrainRequest:
    """One training run. Every field is checked against an allow-list or a range (``checked``)."""

    model: str = "retrinet"  # "retrinet" or "semantica"
    data: str = ""  # a data folder, inside the workspace (relative paths are) or a data root
    run_name: str = "run"  # the output folder: <workspace>/runs/<run_name>
    base: str = ""  # a name of ``JobManager.bases``; "" picks the first
    task: str = "multitask"  # RetriNet: recon | compose | multitask
    setting: str = "b"  # RetriNet: a (augmented target) | b (other pictures of the cluster)
    num_references: int = 4  # RetriNet: N
    steps: int = 500  # optimiser steps (--max-train-steps)
    learning_rate: float = 1e-4
    drop_rate: float = 0.5  # RetriNet: prompt dropout; Semantica: conditioning dropout
    lock: str = "none"  # RetriNet: none | decoder | both
    checkpoint_every: int = 100
    validation_every: int = 0  # 0: no validation pictures
    processes: int = 1  # data-parallel processes (accelerate launch --num_processes)
    batch_size: int = 1  # per process
    gradient_accumulation: int = 1
    resolution: int = 256
    seed: int = 0
    mixed_precision: str = "no"

    def checked(self) -> TrainRequest:
        """This request with numbers as ints / floats; ``ValueError`` naming the first bad field."""
        resolution = _integer("resolution", self.resolution, 32, 1024)
        if resolution % 8:
            raise ValueError(f"resolution {resolution} is not a multiple of 8")
        if not isinstance(self.data, str) or not self.data.strip():
            raise ValueError("data folder must be given")
        if not isinstance(self.base, str):
            raise ValueError(f"base must be a name, got {self.base!r}")  # noqa: TRY004
        return TrainRequest(
            model=_choice("model", self.model, TRAINERS),
            data=self.data.strip(),
            run_name=_name("run name", self.run_name),
            base=self.base.strip(),
            task=_choice("task", self.task, TASKS),
            setting=_choice("setting", self.setting, SETTINGS),
            num_references=_integer("number of references", self.num_references, 1, 8),
            steps=_integer("steps", self.steps, 1, MAX_STEPS),
            learning_rate=_number("learning rate", self.learning_rate, 1e-8, 0.1),
            drop_rate=_number("drop rate", self.drop_rate, 0.0, 1.0),
            lock=_choice("lock", self.lock, LOCKS),
            checkpoint_every=_integer("checkpoint interval", self.checkpoint_every, 1, MAX_STEPS),
            validation_every=_integer("validation interval", self.validation_every, 0, MAX_STEPS),
            processes=_integer("processes", self.processes, 1, MAX_PROCESSES),
            batch_size=_integer("batch size", self.batch_size, 1, 256),
            gradient_accumulation=_integer("gradient accumulation", self.gradient_accumulation, 1, 256),
            resolution=resolution,
            seed=_integer("seed", self.seed, 0, MAX_SEED),
            mixed_precision=_choice("mixed precision", self.mixed_precision, PRECISIONS),
        )


Request = ToybooruRequest | DatasetRequest | TrainRequest
REQUESTS = {"toybooru": ToybooruRequest, "dataset": DatasetRequest, "retrinet": TrainRequest,
            "semantica": TrainRequest}


def _request_from(kind: str, raw: Mapping[str, Any]) -> Request:
    if kind not in REQUESTS or not isinstance(raw, Mapping):
        raise ValueError(f"no {kind!r} request can be made from {type(raw).__name__}")
    cls = REQUESTS[kind]
    return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


# ---------------------------------------------------------------------- what status() reports

@dataclass
class JobStatus:
    """A job as the Train tab shows it."""

    id: str
    kind: str
    state: str  # running | finished | failed | stopped
    message: str
    created: float
    started: float | None
    ended: float | None
    returncode: int | None
    attempt: int  # 1, then 2, 3, ... after each resume
    output_dir: str
    data_dir: str | None
    argv: list[str]
    request: dict[str, Any]
    log: list[str] = field(default_factory=list)  # the last lines of log.txt
    losses: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "lr"} from metrics.jsonl
    reference_gaps: list[dict[str, float]] = field(default_factory=list)  # {"step", "gap"}: RetriNet validations
    checkpoints: list[str] = field(default_factory=list)  # complete "checkpoint-N" folders, newest first
    pictures: list[str] = field(default_factory=list)  # validation pictures (data jobs: a few samples / report)
    step: int | None = None
    max_steps: int | None = None
    result: str | None = None  # the final model or data folder, once written

    @property
    def progress(self) -> float | None:
        """0..1 when known."""
        if self.state == "finished":
            return 1.0
        if self.step is not None and self.max_steps:
            return min(1.0, self.step / self.max_steps)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "progress": self.progress}


@dataclass(frozen=True)
class JobInfo:
    id: str
    kind: str
    state: str
    name: str  # the run or data-set name
    created: float

    def label(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created))
        return f"{self.name} ({self.kind}, {self.state}, {when})"


@dataclass(frozen=True)
class Plan:
    """What a checked request runs: nothing is started yet (``JobManager.plan``)."""

    kind: str
    argv: list[str]  # the command: an argument list, never a shell string
    output_dir: Path
    data_dir: Path | None
    request: Request  # the checked request (a training request with its base name filled in)
    base: dict[str, Any] = field(default_factory=dict)  # the training base: name, pretrained, image_encoder


@dataclass(frozen=True)
class ModelChoice:
    """What ``use_checkpoint`` made: a pipeline folder for ``Engine.use_model(name, folder)``."""

    name: str  # "retrinet" or "semantica"
    folder: str
    checkpoint: str  # "checkpoint-N" or "final"


# ---------------------------------------------------------------------- processes

def _proc_start(pid: int) -> int | None:
    """The start time (clock ticks after boot) of a live process ``pid``; None if it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    rest = raw.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    if len(rest) < 20 or rest[0] in ("Z", "X"):
        return None
    return int(rest[19])  # field 22 of proc(5)


def _group_alive(pgid: int) -> bool:
    """Does a live process of group ``pgid`` remain? (Zombies, which no signal can end, do not count.)"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():  # pragma: no cover (no /proc: a zombie counts as alive)
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid pgrp ...": comm may hold spaces and brackets, so split after the last ")"
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _tail(path: Path, lines: int, max_bytes: int = 64 * 1024) -> list[str]:
    """The last ``lines`` lines of a text file, reading at most ``max_bytes`` from its end; a progress
    bar's carriage returns keep only its last state."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            raw = f.read()
    except OSError:
        return []
    text = raw.decode("utf-8", errors="replace")
    rows = text.split("\n")  # not splitlines(): a bare carriage return does not end a line here
    if rows and not rows[-1]:
        rows.pop()
    out = [ln.rstrip("\r").rsplit("\r", 1)[-1] for ln in rows] if lines else []
    if size > max_bytes and out:
        out = out[1:]  # the first line is cut
    return out[-lines:] if lines else []


def _records(path: Path):
    """The well-formed records (dicts with an integer ``step``) of a JSON-lines file; a half-written
    last line, or any broken one, is skipped; a missing file has none."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool):
            yield rec


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_losses(path: Path) -> list[dict[str, float]]:
    """``{"step", "loss", "lr"}`` of each well-formed line of a ``metrics.jsonl``."""
    return [{"step": rec["step"], "loss": float(rec["loss"]), "lr": float(rec["lr"]) if _finite(rec.get("lr")) else None}
            for rec in _records(path) if _finite(rec.get("loss"))]


def read_gaps(path: Path) -> list[dict[str, float]]:
    """``{"step", "gap"}`` of each well-formed line of a RetriNet run's ``validation/reference_gap.jsonl``
    (``training.train_retrinet.reference_gap``: how much of the loss a sample's own references explain)."""
    return [{"step": rec["step"], "gap": float(rec["gap"])} for rec in _records(path) if _finite(rec.get("gap"))]


# ---------------------------------------------------------------------- the manager

class JobManager:
    """Starts, watches, stops and resumes jobs whose state lives in ``<workspace>/jobs``. Thread-safe.

    ``data_roots``: folders besides the workspace that training data and pictures may come from
    (the studio's ``--data`` folder, for instance). ``bases``: the pretrained bases runs may start
    from, by name (``bases_from_spec`` gives a model family's). ``max_running``: jobs that may run
    at once, across every manager on this workspace. ``read_only``: a Space; nothing starts.
    """

    def __init__(self, workspace: str | os.PathLike, read_only: bool = False, max_running: int = 1,
                 data_roots: Sequence[str | os.PathLike] = (), bases: Mapping[str, Base] | None = None,
                 python: str | None = None):
        if workspace is None or not str(workspace).strip():
            raise ValueError("workspace must be a folder")
        self.root = Path(workspace).expanduser().resolve()
        self.read_only = bool(read_only)
        self.max_running = _integer("max_running", max_running, 1, 64)
        self.data_roots = [Path(r).expanduser().resolve() for r in data_roots if r]
        self.bases = dict(bases or {})
        for name, base in self.bases.items():
            if not isinstance(base, Base) or not base.pretrained:
                raise ValueError(f"base {name!r} must be a Base with a pretrained model")
        self.python = python or sys.executable
        self.jobs_dir = self.root / "jobs"
        self._lock = threading.RLock()
        self._procs: dict[str, subprocess.Popen] = {}  # the jobs this manager started and still waits for
        self._exports: dict[str, threading.Lock] = {}

    # ------------------------------------------------------------------ paths

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnly(READ_ONLY_MESSAGE)

    def resolve_input(self, value: Any, what: str = "data folder") -> Path:
        """A folder or file inside the workspace or a data root (relative paths are relative to the
        workspace), with every symlink followed; ``..``, ``~`` and anything outside are refused."""
        if self.read_only:
            raise ReadOnly(f"{what}: local paths are not accepted on a Hugging Face Space")
        return self._inside(value, [self.root, *self.data_roots], what)

    def _inside(self, value: Any, roots: Sequence[Path], what: str) -> Path:
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
            raise ValueError(f"{what} must be given")
        text = str(value).strip()
        if "\x00" in text or text.startswith("~"):
            raise ValueError(f"{what} {text!r} is not an accepted path")
        path = Path(text)
        if ".." in path.parts:
            raise ValueError(f"{what} {text!r} may not contain '..'")
        real = (path if path.is_absolute() else self.root / path).resolve()  # follows symlinks
        if any(real == r or real.is_relative_to(r) for r in roots):
            return real
        where = " or ".join(str(r) for r in roots)
        raise ValueError(f"{what} {text!r} lies outside {where}; only folders there are accepted")

    def _output(self, folder: str, name: str) -> Path:
        """``<workspace>/<folder>/<name>``, checked to stay inside the workspace after symlinks."""
        out = self._inside(f"{folder}/{name}", [self.root], "output folder")
        if out.parent != (self.root / folder).resolve() or out.name != name:
            raise ValueError(f"output folder {folder}/{name} leads outside the workspace {self.root}")
        return out

    def data_folders(self) -> list[str]:
        """Data sets (folders with ``annotations.jsonl``) under ``<workspace>/data`` and the data roots;
        paths inside the workspace relative to it."""
        if self.read_only:
            return []
        found: list[Path] = []
        for root in [self.root / "data", *self.data_roots]:
            if (root / "annotations.jsonl").is_file():
                found.append(root)
            with contextlib.suppress(OSError):
                found += sorted(p for p in root.iterdir() if (p / "annotations.jsonl").is_file()
                                and not p.name.startswith("."))
        out = []
        for p in found:
            try:
                real = self.resolve_input(p)
            except ValueError:
                continue  # a symlink that leads out
            shown = str(real.relative_to(self.root)) if real.is_relative_to(self.root) else str(real)
            if shown not in out:
                out.append(shown)
        return out

    # ------------------------------------------------------------------ argv

    def _base(self, name: str) -> tuple[str, Base]:
        if not self.bases:
            raise ValueError("base: no pretrained base is configured for this model family")
        name = name or next(iter(self.bases))
        if name not in self.bases:
            raise ValueError(f"base must be one of {', '.join(self.bases)}; got {name!r}")
        return name, self.bases[name]

    def _launcher(self, processes: int, mixed_precision: str) -> list[str]:
        """``accelerate launch`` of this interpreter's environment, as in tests/training (gloo on a CPU)."""
        argv = [self.python, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
        return argv + ["--multi_gpu"] if processes > 1 else argv

    def plan(self, request: Request, resume: bool = False) -> Plan:
        """Check ``request`` and return what it would run, without starting anything. ``resume``: the
        output folder of an earlier attempt may exist."""
        self._writable()
        if isinstance(request, ToybooruRequest):
            req = request.checked()
            out = self._output("data", req.name)
            if out.exists() and not resume:
                raise ValueError(f"data set name {req.name!r} is taken (data/{req.name} exists); choose another")
            argv = [self.python, "-m", "training.data.toybooru", "--out", str(out), "--num-images",
                    str(req.num_images), "--seed", str(req.seed), "--size", str(req.size)]
            return Plan("toybooru", argv, out, None, req)
        if isinstance(request, DatasetRequest):
            req = request.checked()
            images = self.resolve_input(req.images, "pictures folder")
            metadata = self.resolve_input(req.metadata, "metadata file")
            if not images.is_dir():
                raise ValueError(f"pictures folder {req.images!r} is not a folder")
            if not metadata.is_file():
                raise ValueError(f"metadata file {req.metadata!r} is not a file")
            out = self._output("data", req.name)
            if (out / "annotations.jsonl").exists() and not resume:
                raise ValueError(f"data set name {req.name!r} is taken (data/{req.name} is built); choose another")
            argv = [self.python, "-m", "training.build_dataset", "--images", str(images), "--metadata",
                    str(metadata), "--out", str(out), "--test-share", repr(req.test_share)]
            return Plan("dataset", argv, out, images, req)
        if not isinstance(request, TrainRequest):
            raise ValueError(f"unknown request {type(request).__name__}; expected a Toybooru, data set or "  # noqa: TRY004
                             f"training request")
        req = request.checked()
        base_name, base = self._base(req.base)
        req = replace(req, base=base_name)
        data = self.resolve_input(req.data, "data folder")
        if not data.is_dir():
            raise ValueError(f"data folder {req.data!r} is not a folder")
        if req.model == "retrinet" and not (data / "annotations.jsonl").is_file():
            raise ValueError(f"data folder {req.data!r} has no annotations.jsonl; RetriNet trains on a "
                             f"RetriBooru-style data set (generate a Toybooru or build one first)")
        out = self._output("runs", req.run_name)
        if out.exists() and any(out.iterdir()) and not resume:
            raise ValueError(f"run name {req.run_name!r} is taken (runs/{req.run_name} exists); choose another "
                             f"or resume its job")
        common = ["--data", str(data), "--output-dir", str(out), "--resolution", str(req.resolution),
                  "--train-batch-size", str(req.batch_size), "--gradient-accumulation-steps",
                  str(req.gradient_accumulation), "--max-train-steps", str(req.steps), "--learning-rate",
                  repr(req.learning_rate), "--checkpointing-steps", str(req.checkpoint_every),
                  "--checkpoints-total-limit", str(CHECKPOINTS_KEPT), "--logging-steps", "1", "--seed",
                  str(req.seed), "--mixed-precision", req.mixed_precision]
        if req.validation_every:
            common += ["--validation-steps", str(req.validation_every)]
        launch = self._launcher(req.processes, req.mixed_precision)
        if req.model == "retrinet":
            argv = [*launch, "-m", "training.train_retrinet", "--pretrained", base.pretrained, *common,
                    "--task", req.task, "--setting", req.setting, "--num-references", str(req.num_references),
                    "--prompt-dropout", repr(req.drop_rate), "--lock", req.lock]
        else:
            if not base.image_encoder:
                raise ValueError(f"base {base_name!r} has no image encoder, which Semantica needs")
            argv = [*launch, "-m", "training.train_semantica", "--pretrained", base.pretrained, "--image-encoder",
                    base.image_encoder, *common, "--conditioning-dropout", repr(req.drop_rate)]
        if resume:
            argv += ["--resume-from-checkpoint", "latest"]
        return Plan(req.model, argv, out, data, req, {"name": base_name, **asdict(base)})

    # ------------------------------------------------------------------ job records

    def _dir(self, job_id: str) -> Path:
        return self.jobs_dir / check_job_id(job_id)

    def _read(self, job_id: str) -> dict[str, Any]:
        path = self._dir(job_id) / "job.json"
        try:
            job = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"no such job {job_id!r}") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"job {job_id}: job.json cannot be read ({e})") from e
        if not isinstance(job, dict) or job.get("id") != job_id or job.get("kind") not in KINDS:
            raise ValueError(f"job {job_id}: job.json is not a job record")
        return job

    def _write(self, job: dict[str, Any]) -> None:
        write_text(self._dir(job["id"]) / "job.json", json.dumps(job, indent=1) + "\n")

    def _ids(self) -> list[str]:
        if not self.jobs_dir.is_dir():
            return []
        return sorted((p.name for p in self.jobs_dir.iterdir() if JOB_ID.fullmatch(p.name)), reverse=True)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This manager's lock, and a file lock shared with every other manager on the workspace."""
        with self._lock:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            if fcntl is None:  # pragma: no cover
                yield
                return
            with open(self.jobs_dir / ".lock", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def _alive(self, job: dict[str, Any]) -> bool:
        """Is a process of the job's current attempt still running: its own process (not a reused pid),
        or any process of its group (``accelerate launch`` can end before the trainers it started)?"""
        pid, pgid = job.get("pid"), job.get("pgid")
        if not isinstance(pid, int) or pid <= 0:
            return False
        proc = self._procs.get(job["id"])
        if proc is not None and proc.pid == pid and proc.poll() is None:
            return True
        if Path("/proc/self/stat").is_file():
            ticks = _proc_start(pid)
            if ticks is not None:  # the pid runs: the job's own process, or another that was given the pid since
                return ticks == job.get("start_ticks")
        else:  # pragma: no cover (no /proc: a reused pid cannot be told apart)
            try:
                os.kill(pid, 0)
                return True
            except (ProcessLookupError, PermissionError):
                pass
        # the pid is free: the kernel gives no pid out while a group of that id lives, so a live group
        # with the job's pgid (= its launcher's pid) is the job's
        return isinstance(pgid, int) and pgid == pid and _group_alive(pgid)

    def _refresh(self, job: dict[str, Any]) -> dict[str, Any]:
        """Mark a job whose process has ended as ended (called under ``self._lock``)."""
        if job.get("status") != "running" or self._alive(job):
            return job
        proc = self._procs.pop(job["id"], None)
        code = proc.poll() if proc is not None and proc.pid == job.get("pid") else None
        self._close(job, code)
        return job

    def _close(self, job: dict[str, Any], code: int | None) -> None:
        """Record the end of the job's current attempt; ``code`` is None when no one could wait for the
        process (it was started by another manager, or by a studio that is gone)."""
        job["returncode"] = code
        job["ended"] = job.get("ended") or time.time()
        done = (self._output_dir(job) / RESULTS[job["kind"]]).exists()
        if job.get("stop_requested"):
            job["status"], job["message"] = "stopped", "stopped on request"
        elif code == 0 or (code is None and done):
            job["status"], job["message"] = "finished", "finished"
        elif code is None:
            job["status"] = "failed"
            job["message"] = ("the process is gone (killed, or the machine restarted while the studio was not "
                              "watching); resume it to continue from the latest checkpoint")
        elif code < 0:
            job["status"], job["message"] = "failed", f"killed by signal {-code}"
        else:
            job["status"], job["message"] = "failed", f"exited with code {code}; see the log"
        if job.get("attempts"):
            job["attempts"][-1].update(ended=job["ended"], returncode=code, status=job["status"])
        self._write(job)

    def _output_dir(self, job: dict[str, Any]) -> Path:
        """The job's output folder, checked again (job.json is a file on disk, not a trusted input)."""
        out = self._inside(job.get("output_dir", ""), [self.root], "output folder")
        if out.parent.name not in ("runs", "data") or out.parent.parent != self.root:
            raise ValueError(f"job {job['id']}: output folder {out} is not in the workspace's runs/ or data/")
        return out

    def _running(self) -> list[str]:
        running = []
        for job_id in self._ids():
            try:
                job = self._refresh(self._read(job_id))
            except ValueError:
                continue
            if job["status"] == "running":
                running.append(job_id)
        return running

    # ------------------------------------------------------------------ start, stop, resume

    def start(self, request: Request) -> str:
        """Check ``request``, start its subprocess and return the new job's id."""
        self._writable()
        with self._exclusive():  # the checks and the start are one step for every manager on the workspace
            plan = self.plan(request)
            for other in self._ids():
                with contextlib.suppress(ValueError):
                    if self._read(other).get("output_dir") == str(plan.output_dir):
                        raise ValueError(f"{plan.output_dir.parent.name}/{plan.output_dir.name} belongs to job {other}; "
                                         f"choose another name or resume that job")
            self._check_limit()
            job_id = f"{plan.kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            (self.jobs_dir / job_id).mkdir(parents=True)
            job = {"id": job_id, "kind": plan.kind, "request": asdict(plan.request), "base": plan.base,
                   "argv": plan.argv, "output_dir": str(plan.output_dir),
                   "data_dir": str(plan.data_dir) if plan.data_dir else None, "status": "starting", "message": "",
                   "pid": None, "pgid": None, "start_ticks": None, "created": time.time(), "started": None,
                   "ended": None, "returncode": None, "attempt": 0, "attempts": [], "stop_requested": False}
            self._launch(job, plan.argv)
        return job_id

    def _check_limit(self) -> None:
        running = self._running()
        if len(running) >= self.max_running:
            raise ValueError(f"{len(running)} job(s) already running ({', '.join(running)}); at most "
                             f"{self.max_running} may run at once: stop one or wait for it to end")

    def _launch(self, job: dict[str, Any], argv: list[str]) -> None:
        """Start ``argv`` (a list; never a shell) as attempt ``job["attempt"] + 1`` of ``job``."""
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ValueError("a job's command must be a list of strings")
        attempt = job["attempt"] + 1
        log_path = self._dir(job["id"]) / "log.txt"
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        with open(log_path, "ab") as log:
            header = f"=== attempt {attempt}, {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(argv)}\n"
            log.write(header.encode())
            log.flush()
            try:
                proc = subprocess.Popen(argv, shell=False, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
            except OSError as e:
                job.update(status="failed", message=f"cannot start: {e}", attempt=attempt, ended=time.time())
                self._write(job)
                raise ValueError(f"job {job['id']} cannot start: {e}") from e
        now = time.time()
        job.update(status="running", message="running", pid=proc.pid, pgid=proc.pid, start_ticks=_proc_start(proc.pid),
                   started=now, ended=None, returncode=None, attempt=attempt, stop_requested=False, argv=argv)
        job["attempts"].append({"attempt": attempt, "argv": argv, "pid": proc.pid, "started": now, "ended": None,
                                "returncode": None, "status": "running"})
        self._procs[job["id"]] = proc
        self._write(job)
        threading.Thread(target=self._watch, args=(job["id"], attempt, proc), daemon=True,
                         name=f"job-{job['id']}").start()

    def _watch(self, job_id: str, attempt: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        while _group_alive(proc.pid):  # the launcher has ended; the attempt ends with its last process
            time.sleep(0.1)
        with self._lock:
            try:
                job = self._read(job_id)
            except ValueError:
                return
            if job.get("attempt") == attempt and job.get("status") == "running" and job.get("pid") == proc.pid:
                self._procs.pop(job_id, None)
                self._close(job, code)

    def stop(self, job_id: str, timeout: float = 30.0) -> JobStatus:
        """SIGTERM to the job's process group; SIGKILL after ``timeout`` seconds. A job that is not
        running is left as it is. The job is never left shown as running."""
        self._writable()
        timeout = _number("timeout", timeout, 0.0, 3600.0)
        with self._lock:
            job = self._refresh(self._read(job_id))
            if job["status"] != "running":
                return self.status(job_id)
            job["stop_requested"] = True
            job["message"] = "stopping"
            self._write(job)
        pgid, attempt = job["pgid"], job["attempt"]
        _signal_group(pgid, signal.SIGTERM)
        if not self._wait_gone(job, timeout):
            _signal_group(pgid, signal.SIGKILL)
            self._wait_gone(job, 10.0)
        with self._lock:
            job = self._read(job_id)
            if job["status"] == "running" and job["attempt"] == attempt:  # not a later attempt started meanwhile
                proc = self._procs.pop(job_id, None)
                code = proc.poll() if proc is not None else None
                self._close(job, code)
                if self._alive(job) or _group_alive(pgid):
                    job["message"] = "stopped on request, but a process of the job did not end even after SIGKILL"
                    self._write(job)
        return self.status(job_id)

    def _wait_gone(self, job: dict[str, Any], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if not self._alive(job) and not _group_alive(job["pgid"]):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def resume(self, job_id: str) -> JobStatus:
        """Start an ended job again as a new attempt, into the same output folder: training continues
        from its latest checkpoint (``--resume-from-checkpoint latest``); a data set build continues
        with the shards it has not done; a Toybooru is drawn again."""
        self._writable()
        with self._exclusive():
            job = self._refresh(self._read(job_id))
            if job["status"] == "running":
                raise ValueError(f"job {job_id} is running; stop it before resuming it")
            # the command is rebuilt from the checked request, never taken from job.json as it is
            try:
                plan = self.plan(_request_from(job["kind"], job.get("request") or {}), resume=True)
            except TypeError as e:  # a record without a field the request needs
                raise ValueError(f"job {job_id}: its record holds no usable request ({e})") from e
            if plan.kind != job["kind"] or plan.output_dir != self._output_dir(job):
                raise ValueError(f"job {job_id}: its record does not match its request")
            self._check_limit()
            job["base"] = plan.base or job.get("base", {})
            self._launch(job, plan.argv)
        return self.status(job_id)

    # ------------------------------------------------------------------ reading

    def list_jobs(self) -> list[JobInfo]:
        """Every job of the workspace, newest first."""
        out = []
        with self._lock:
            for job_id in self._ids():
                try:
                    job = self._refresh(self._read(job_id))
                except ValueError:
                    continue
                req = job.get("request", {})
                out.append(JobInfo(job_id, job["kind"], job["status"], str(req.get("run_name") or req.get("name") or ""),
                                   float(job.get("created") or 0)))
        return out

    def status(self, job_id: str, lines: int = LOG_LINES) -> JobStatus:
        """The job's state, last ``lines`` log lines, losses, checkpoints, pictures and progress."""
        lines = _integer("lines", lines, 0, 10_000)
        with self._lock:
            job = self._refresh(self._read(job_id))
        out = self._output_dir(job)
        st = JobStatus(id=job["id"], kind=job["kind"], state=job["status"], message=job.get("message", ""),
                       created=job["created"], started=job.get("started"), ended=job.get("ended"),
                       returncode=job.get("returncode"), attempt=job.get("attempt", 0), output_dir=str(out),
                       data_dir=job.get("data_dir"), argv=list(job.get("argv", [])), request=job.get("request", {}),
                       log=_tail(self._dir(job_id) / "log.txt", lines))
        result = out / RESULTS[job["kind"]]
        if result.exists():
            st.result = str(result.parent if job["kind"] in TRAINERS else out)
        if job["kind"] in TRAINERS:
            # the pictures before the gaps: train_retrinet writes a validation's gap before its grid, so a status
            # that lists a grid also holds its gap (read the other way round, a validation landing between the
            # two reads gave a grid without its gap)
            st.pictures = [str(p) for p in sorted((out / "validation").glob("step-*.png"))] \
                if (out / "validation").is_dir() else []
            st.losses = read_losses(out / "metrics.jsonl")
            st.reference_gaps = read_gaps(out / "validation" / "reference_gap.jsonl")
            st.checkpoints = [p.name for _, p in reversed(list_checkpoints(out))]
            st.max_steps = st.request.get("steps")
            st.step = st.losses[-1]["step"] if st.losses else 0
        elif job["kind"] == "dataset":
            shards = [SHARD_DONE.search(line) for line in st.log]
            last = next((m for m in reversed(shards) if m), None)
            if last:
                st.step, st.max_steps = int(last.group(1)), int(last.group(2))
            if (out / "report.png").is_file():
                st.pictures = [str(out / "report.png")]
        elif st.result:
            st.pictures = [str(p) for p in sorted((out / "images").glob("*.png"))[:8]]
        return st

    # ------------------------------------------------------------------ using what a run made

    def use_checkpoint(self, job_id: str, checkpoint: str | int = "latest") -> ModelChoice:
        """A pipeline folder made from a run's checkpoint (``"latest"``, ``"checkpoint-N"`` or N) or
        its final models (``"final"``), for ``Engine.use_model(choice.name, choice.folder)``.

        A training checkpoint holds Accelerate's state: the trained models' weights as safetensors
        (RetriNet, and the UNet when it trained; Semantica's UNet and conditioner), the optimiser,
        and ``trainer_state.json`` whose signature gives the models' configs. The rest (VAE, text
        encoder, scheduler, image encoder) comes from the run's base. The folder is written once, to
        ``<run>/pipelines/<checkpoint>``, atomically; only safetensors are read (never the checkpoint's
        pickled RNG states, nor a base's ``.bin`` weights).
        """
        self._writable()
        job = self.status(job_id, lines=0)
        if job.kind not in TRAINERS:
            raise ValueError(f"job {job_id} is a {job.kind} job; only training runs have checkpoints")
        out = Path(job.output_dir)
        record = self._read(job_id)
        base = record.get("base") or {}
        if isinstance(checkpoint, int) and not isinstance(checkpoint, bool):
            checkpoint = f"checkpoint-{checkpoint}"
        if not isinstance(checkpoint, str) or not checkpoint.strip():
            raise ValueError(f"checkpoint must be 'latest', 'final' or 'checkpoint-N'; got {checkpoint!r}")
        checkpoint = checkpoint.strip()
        if checkpoint == "latest":
            if not job.checkpoints:
                raise ValueError(f"job {job_id} has no complete checkpoint yet")
            checkpoint = job.checkpoints[0]
        if checkpoint == "final":
            if not job.result:
                raise ValueError(f"job {job_id} has no final model yet (the run writes it when it finishes)")
            if job.kind == "semantica":
                return ModelChoice("semantica", str(out / "semantica"), "final")
            source = out
        elif checkpoint in job.checkpoints:
            source = out / checkpoint
        else:
            have = ", ".join(job.checkpoints) or "none yet"
            raise ValueError(f"checkpoint {checkpoint!r} is not a complete checkpoint of job {job_id} (have: {have})")
        target = out / "pipelines" / checkpoint
        with self._lock:
            lock = self._exports.setdefault(str(target), threading.Lock())
        with lock:
            if not (target / "model_index.json").is_file():
                with replacing_folder(target) as tmp:
                    if job.kind == "retrinet":
                        export_retrinet(source, base.get("pretrained"), tmp)
                    else:
                        export_semantica(source, base.get("pretrained"), base.get("image_encoder"), tmp)
        return ModelChoice(job.kind, str(target), checkpoint)
