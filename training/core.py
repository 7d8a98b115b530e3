"""The trainer core every training script shares: data order, the loop, checkpoints, resume, logs.

Modelled on diffusers' example scripts (``examples/controlnet/train_controlnet.py``), and
stricter where they are weak:

- a checkpoint is written to ``OUT/.checkpoint-STEP.tmp`` by every process and renamed to
  ``OUT/checkpoint-STEP`` by the main process only when complete (a ``trainer_state.json``
  written last marks it so); ``latest`` is the newest complete one, never a half-written one;
  old checkpoints are removed only after the new one is in place, and each is first renamed out of
  sight (``OUT/.checkpoint-STEP.old.tmp``), so a crash while deleting one never leaves a
  half-deleted folder that still looks complete; the files are fsync'ed before the rename;
- a write that fails (disk full, ...) removes its temporary folder and raises ``CheckpointError``
  (an ``OSError``) naming the step and the last complete checkpoint, which stays usable;
- resuming continues at the exact next batch: the data order depends only on (seed, epoch), the
  consumed batches of the epoch are skipped, and Accelerate restores the model, optimiser,
  scheduler and every process's RNG states; so a resumed run logs the losses an uninterrupted
  run logs;
- ``OUT/metrics.jsonl`` gets one line per logged step (step, loss, lr, seconds, samples/s),
  flushed at once; on resume the lines after the checkpoint's step are dropped.

A script supplies the models, the optimiser, the scheduler, a data set and a ``loss_fn(batch)``;
see ``training/train_retrinet.py``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Sampler

from training.checkpoints import STATE_FILE, list_checkpoints
from training.files import write_text

logger = logging.getLogger(__name__)


class EpochSampler(Sampler[int]):
    """A random order that depends only on (seed, epoch): the same on every process and every run."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


@dataclass
class TrainerState:
    """Where a run is; saved in every checkpoint."""

    global_step: int = 0  # optimiser steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of ``epoch`` consumed (on each process)
    signature: dict[str, Any] = field(default_factory=dict)  # what must match to resume


@dataclass
class TrainerConfig:
    output_dir: str
    max_train_steps: int
    batch_size: int = 1  # per process
    gradient_accumulation_steps: int = 1
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    logging_steps: int = 1
    validation_steps: int | None = None
    seed: int = 0
    num_workers: int = 0
    max_grad_norm: float = 1.0
    ema_decay: float | None = None  # keep an exponential moving average of the weights, and end on it


def make_accelerator(**kwargs) -> Accelerator:
    """An ``Accelerator``; launched as several processes on a machine without a GPU
    (``accelerate launch --multi_gpu --num_processes 2`` on a CPU), it runs them as one
    data-parallel job over gloo instead of as independent single-process runs, which is what
    Accelerate does by itself there."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.cuda.is_available() and "cpu" not in kwargs:
        kwargs["cpu"] = True
    return Accelerator(**kwargs)


# ---------------------------------------------------------------------- checkpoints on disk

def resolve_checkpoint(output_dir: str | os.PathLike, spec: str | None) -> Path | None:
    """``latest`` (None if there is none yet), or a path that must be a complete checkpoint."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{spec} is not a complete checkpoint (no {STATE_FILE})")
    return path


def _comparable(obj: Any) -> Any:
    """``obj`` without the keys that start with "_" (diffusers' ``_use_default_values`` and the like,
    whose order is not stable between runs), at every depth."""
    if isinstance(obj, dict):
        return {k: _comparable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [_comparable(v) for v in obj]
    return obj


class CheckpointError(OSError):
    """A checkpoint could not be written; the earlier checkpoints are intact."""

    @classmethod
    def failed_write(cls, step: int, output_dir: Path, cause: BaseException) -> CheckpointError:
        found = list_checkpoints(output_dir)
        where = (f"the last complete checkpoint, {found[-1][1]}, is intact: resume from it with "
                 "--resume-from-checkpoint latest" if found else "there is no earlier checkpoint to resume from")
        reason = (cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)) or type(cause).__name__
        message = f"could not write checkpoint {step} in {output_dir}: {reason}; nothing of it was kept, and {where}"
        err = cause.errno if isinstance(cause, OSError) else None
        return cls(err, message) if err is not None else cls(message)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    """fsync a folder, so that the names in it (a rename) reach the disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then the folders themselves."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for p in sorted((q for q in folder.rglob("*") if q.is_dir()), reverse=True):
        _sync_dir(p)
    _sync_dir(folder)


def _hide(checkpoint: Path) -> Path:
    """Rename a checkpoint to ``.NAME.old.tmp`` (atomic) before deleting it: a crash during the
    deletion then leaves a temporary folder, removed at the next start, never a half-deleted
    ``checkpoint-N`` whose state file makes it look complete."""
    hidden = checkpoint.with_name(f".{checkpoint.name}.old.tmp")
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(checkpoint, hidden)
    return hidden


def read_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint / STATE_FILE).read_text()))


class MetricsLog:
    """``metrics.jsonl``: one JSON line per logged step, flushed at once; the main process writes."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Keep the well-formed lines up to ``step`` (a resumed run logs the rest again)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step", math.inf) <= step:
                kept.append(line)
        write_text(self.path, "".join(x + "\n" for x in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The well-formed lines of a ``metrics.jsonl`` (what the studio plots)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ---------------------------------------------------------------------- the trainer

class Trainer:
    """Runs ``loss_fn`` over a data set with Accelerate, checkpointing and resuming exactly.

    ``models``: the modules whose weights train (already passed through ``accelerator.prepare``
    by the caller, with the optimiser and scheduler). ``signature``: facts that a checkpoint must
    share with this run to be resumed (model sizes, task, ...).
    """

    def __init__(self, accelerator: Accelerator, config: TrainerConfig, dataset: Dataset,
                 collate_fn: Callable, models: list[torch.nn.Module], optimizer, lr_scheduler,
                 loss_fn: Callable[[dict[str, Any]], torch.Tensor], signature: dict[str, Any] | None = None,
                 validation_fn: Callable[[int], None] | None = None):
        if config.max_train_steps < 1:
            raise ValueError(f"max_train_steps must be at least 1, got {config.max_train_steps}")
        if config.checkpointing_steps < 1:
            raise ValueError(f"checkpointing_steps must be at least 1, got {config.checkpointing_steps}")
        if config.checkpoints_total_limit is not None and config.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be at least 1, got {config.checkpoints_total_limit}")
        self.accelerator, self.config = accelerator, config
        self.dataset, self.models = dataset, models
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.loss_fn, self.validation_fn = loss_fn, validation_fn
        self.output_dir = Path(config.output_dir)
        self.state = TrainerState(signature=dict(signature or {}))
        self.ema = None
        if config.ema_decay is not None:
            if not 0 < config.ema_decay < 1:
                raise ValueError(f"ema_decay must be between 0 and 1, got {config.ema_decay}")
            from diffusers.training_utils import EMAModel

            # diffusers' EMA (its warm-up: the decay is (1 + step) / (10 + step) until it reaches ema_decay, so a
            # short run averages about its last ninth); saved in every checkpoint, resumed with it
            self.ema = EMAModel(self._trained_parameters(), decay=config.ema_decay)
            accelerator.register_for_checkpointing(self.ema)
            self.state.signature["ema_decay"] = config.ema_decay  # a checkpoint without the average cannot resume
        self.sampler = EpochSampler(len(dataset), config.seed)
        # a private generator: making a DataLoader iterator then draws nothing from torch's global
        # RNG, so a run resumed mid-epoch draws the same noise as an uninterrupted one
        loader = DataLoader(dataset, batch_size=config.batch_size, sampler=self.sampler, collate_fn=collate_fn,
                            num_workers=config.num_workers, drop_last=True,
                            generator=torch.Generator().manual_seed(config.seed))
        if len(loader) == 0:
            raise ValueError(f"{len(dataset)} samples make no batch of {config.batch_size}")
        self.loader = accelerator.prepare(loader)
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl", accelerator.is_main_process)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.output_dir.glob(".checkpoint-*.tmp"):  # left by a crash mid-write
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()

    def _trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.models for p in m.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-STEP`` atomically; then apply ``checkpoints_total_limit``.

        If the write fails (a full disk, a lost mount, ...), the temporary folder is removed and
        ``CheckpointError`` is raised; the earlier checkpoints are untouched."""
        acc, step = self.accelerator, self.state.global_step
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f".checkpoint-{step}.tmp"
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))  # every process writes its RNG state here
            acc.wait_for_everyone()
            if acc.is_main_process:
                _write_synced(tmp / STATE_FILE, json.dumps(asdict(self.state), indent=1))  # last: marks it complete
                _sync_tree(tmp)  # on disk before the rename makes it visible
        except Exception as e:  # safetensors and torch raise their own types for I/O errors
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # never visible as a checkpoint; frees what it took
            raise CheckpointError.failed_write(step, self.output_dir, e) from e
        if acc.is_main_process:
            displaced = None
            if final.exists():  # the same step saved again (a run resumed from an earlier checkpoint)
                displaced = _hide(final)
            os.replace(tmp, final)
            _sync_dir(self.output_dir)
            if displaced is not None:
                shutil.rmtree(displaced, ignore_errors=True)
            limit = self.config.checkpoints_total_limit
            if limit is not None:
                for _, old in list_checkpoints(self.output_dir)[:-limit]:
                    shutil.rmtree(_hide(old), ignore_errors=True)
            logger.info("saved %s", final)
        acc.wait_for_everyone()
        return final

    def resume(self, spec: str | None) -> int:
        """Load ``spec`` ("latest" or a path); return the step the run continues from."""
        checkpoint = resolve_checkpoint(self.output_dir, spec)
        if checkpoint is None:
            if spec and spec != "latest":
                raise ValueError(f"no checkpoint at {spec}")
            self.metrics.truncate_after(0)  # a fresh start: lines of an earlier, lost run go
            return 0
        saved = read_state(checkpoint)
        mine, theirs = _comparable(self.state.signature), _comparable(saved.signature)
        # either side's keys: a setting only some runs record (the EMA's decay, the CLIP's hard negatives) must not be
        # dropped silently by a run without it
        mismatched = {k: (theirs.get(k), mine.get(k)) for k in {**theirs, **mine} if theirs.get(k) != mine.get(k)}
        if mismatched:
            details = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"checkpoint {checkpoint} does not fit this run ({details})")
        try:
            self.accelerator.load_state(str(checkpoint))
        except (RuntimeError, KeyError, ValueError) as e:
            raise ValueError(f"checkpoint {checkpoint} does not fit these models: {e}") from e
        self.state = TrainerState(saved.global_step, saved.epoch, saved.batches_in_epoch, self.state.signature)
        self.metrics.truncate_after(saved.global_step)
        logger.info("resumed from %s at step %d", checkpoint, saved.global_step)
        return saved.global_step

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainerState:
        acc, cfg, st = self.accelerator, self.config, self.state
        samples_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * acc.num_processes
        batches_per_epoch = len(self.loader)
        t_last, step_last = time.perf_counter(), st.global_step
        step_losses: list[torch.Tensor] = []
        while st.global_step < cfg.max_train_steps:
            self.sampler.set_epoch(st.epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(st.epoch)
            loader = acc.skip_first_batches(self.loader, st.batches_in_epoch) if st.batches_in_epoch else self.loader
            for batch in loader:
                with acc.accumulate(*self.models):
                    loss = self.loss_fn(batch)
                    step_losses.append(loss.detach())
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(self._trained_parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                st.batches_in_epoch += 1
                if not acc.sync_gradients:
                    continue
                st.global_step += 1
                if self.ema is not None:
                    self.ema.step(self._trained_parameters())
                step_loss = torch.stack(step_losses).mean()  # over the accumulated micro-batches
                step_losses = []
                if st.global_step % cfg.logging_steps == 0 or st.global_step == cfg.max_train_steps:
                    mean_loss = acc.gather(step_loss.reshape(1)).mean().item()  # and over the processes
                    now = time.perf_counter()
                    seconds = now - t_last
                    record = {"step": st.global_step, "loss": mean_loss, "lr": self.lr_scheduler.get_last_lr()[0],
                              "seconds": seconds, "epoch": st.epoch,
                              "samples_per_second": samples_per_step * (st.global_step - step_last) / max(seconds, 1e-9)}
                    self.metrics.write(record)
                    acc.log({k: v for k, v in record.items() if k != "step"}, step=st.global_step)
                    t_last, step_last = now, st.global_step
                paused = False
                if st.global_step % cfg.checkpointing_steps == 0:
                    self.save_checkpoint()
                    paused = True
                if self.validation_fn and cfg.validation_steps and st.global_step % cfg.validation_steps == 0:
                    self.validation_fn(st.global_step)
                    acc.wait_for_everyone()
                    paused = True
                if paused:  # the next interval's speed counts training only
                    t_last, step_last = time.perf_counter(), st.global_step
                if st.global_step >= cfg.max_train_steps:
                    break
            else:
                st.epoch += 1
                st.batches_in_epoch = 0
                continue
            if st.batches_in_epoch >= batches_per_epoch:
                st.epoch += 1
                st.batches_in_epoch = 0
        if self.ema is not None:  # what the caller saves is the average (the checkpoints keep the raw weights too)
            self.ema.copy_to(self._trained_parameters())
        acc.wait_for_everyone()
        return st


# ---------------------------------------------------------------------- what every script shares

def add_training_arguments(p, *, learning_rate: float, batch_size: int, max_train_steps: int,
                           checkpointing_steps: int) -> None:
    """The optimisation and output arguments of every ``train_*`` script, with its defaults."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning-rate", type=float, default=learning_rate)
    g.add_argument("--lr-warmup-steps", type=int, default=0)
    g.add_argument("--adam-weight-decay", type=float, default=1e-2)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--train-batch-size", type=int, default=batch_size, help="per process")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--max-train-steps", type=int, default=max_train_steps)
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: what `accelerate config` says")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dataloader-num-workers", type=int, default=0)
    add_ema_arguments(g)
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", required=True)
    g.add_argument("--checkpointing-steps", type=int, default=checkpointing_steps)
    g.add_argument("--checkpoints-total-limit", type=int, default=2)
    g.add_argument("--resume-from-checkpoint", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--logging-steps", type=int, default=10)


def add_ema_arguments(g) -> None:
    """``--use-ema`` and ``--ema-decay`` (``ema_decay`` reads them, ``check_ema_arguments`` checks them)."""
    g.add_argument("--use-ema", action="store_true",
                   help="end on an exponential moving average of the weights (diffusers' EMAModel, with its warm-up)")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="the average's largest decay (with --use-ema)")


def check_ema_arguments(p, args) -> None:
    if args.use_ema and not 0 < args.ema_decay < 1:
        p.error("--ema-decay must be between 0 and 1")


def ema_decay(args) -> float | None:
    """``TrainerConfig.ema_decay`` from ``--use-ema`` / ``--ema-decay``: None without the average."""
    return args.ema_decay if getattr(args, "use_ema", False) else None


def check_training_arguments(p, args) -> None:
    """``parser.error`` for the shared arguments that are out of range."""
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                 "logging_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.learning_rate > 0:
        p.error("--learning-rate must be positive")
    check_ema_arguments(p, args)


def trainer_config(args) -> TrainerConfig:
    return TrainerConfig(
        output_dir=str(args.output_dir), max_train_steps=args.max_train_steps, batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit, logging_steps=args.logging_steps,
        validation_steps=getattr(args, "validation_steps", None), seed=args.seed,
        num_workers=args.dataloader_num_workers, max_grad_norm=args.max_grad_norm,
        ema_decay=ema_decay(args))


def start_run(args) -> Accelerator:
    """The Accelerator, logging and seeds of a ``train_*`` script run, from its shared arguments."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                                   mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    return accelerator


def prepare_optimisation(accelerator: Accelerator, args, model: torch.nn.Module):
    """AdamW over ``model``'s parameters with ``warmup_cosine``, all passed through
    ``accelerator.prepare``; returns (model, optimizer, lr_scheduler). Accelerate steps a prepared
    scheduler once per process per optimiser step, so the schedule counts in those."""
    params = [p for p in model.parameters() if p.requires_grad]  # frozen parts stay out of AdamW's decay
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    n = accelerator.num_processes
    lr_scheduler = warmup_cosine(optimizer, args.max_train_steps * n, args.lr_warmup_steps * n)
    return accelerator.prepare(model, optimizer, lr_scheduler)


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 0):
    """Linear warm-up, then cosine to 10 % of the learning rate at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        phase = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * phase))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class WithLoss(torch.nn.Module):
    """``model`` and a ``loss(model, *inputs)`` in one ``forward``: a data-parallel wrapper syncs
    gradients only through ``forward``, so a loss that calls other methods of the model (an
    encoder, then a decoder) must be run this way to train on several processes."""

    def __init__(self, model: torch.nn.Module, loss: Callable[..., torch.Tensor]):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, *inputs, **kwargs) -> torch.Tensor:
        return self.loss(self.model, *inputs, **kwargs)


# ---------------------------------------------------------------------- diffusion loss weighting

WEIGHTINGS = ("uniform", "min-snr", "p2")


def timestep_weights(noise_scheduler, timesteps: torch.Tensor, weighting: str = "uniform",
                     snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights (B,) of a diffusion MSE at ``timesteps``, for the scheduler's prediction type:

    - ``uniform``: 1, the plain objective;
    - ``min-snr``: min(SNR, ``snr_gamma``) / SNR for epsilon, / (SNR + 1) for v (Hang et al., 2023):
      the low-noise timesteps, whose loss is large and mostly about fine detail, count less;
    - ``p2``: 1 / (1 + SNR) for epsilon, times SNR / (SNR + 1) for v, then scaled to mean 1 over all
      timesteps (Choi et al., 2022, k = gamma = 1): the loss of the high-noise timesteps, where
      colours and layout are decided and the epsilon loss is small, is no longer drowned by the
      low-noise ones.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
    if weighting == "uniform":
        return torch.ones(timesteps.shape[0], device=timesteps.device)
    from diffusers.training_utils import compute_snr

    v = noise_scheduler.config.prediction_type == "v_prediction"
    if weighting == "min-snr":
        if snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive, got {snr_gamma}")
        snr = compute_snr(noise_scheduler, timesteps)
        if v:
            return torch.minimum(snr, torch.full_like(snr, snr_gamma)) / (snr + 1)
        # min(SNR, gamma) / SNR written as min(1, gamma / SNR): 1 at the SNR 0 of a zero-terminal-SNR schedule's last step
        return (snr_gamma / snr).clamp(max=1.0)

    def p2(snr: torch.Tensor) -> torch.Tensor:
        return (snr / (snr + 1) if v else torch.ones_like(snr)) / (1 + snr)

    every = torch.arange(noise_scheduler.config.num_train_timesteps, device=timesteps.device)
    return p2(compute_snr(noise_scheduler, timesteps)) / p2(compute_snr(noise_scheduler, every)).mean()


def unweighted_last_step(noise_scheduler, weighting: str, snr_gamma: float = 5.0) -> bool:
    """Whether ``weighting`` gives the last timestep no weight: a zero-terminal-SNR schedule under
    v-prediction with ``min-snr`` or ``p2``, whose v weights are 0 at SNR 0. That step is the one
    where the noisy latent holds nothing of the picture, where colours and layout must come from
    the conditioning: a run that does not train it samples its first step untrained."""
    last = torch.tensor([noise_scheduler.config.num_train_timesteps - 1])
    return bool(timestep_weights(noise_scheduler, last, weighting, snr_gamma)[0] < 1e-6)


def pyramid_noise(shape: tuple[int, ...], discount: float, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gaussian noise of ``shape`` (B, C, H, W) with more of its energy at low frequencies: white
    noise plus, at every halving of the side down to 1 x 1, white noise at that size upsampled
    (bilinear) and weighted ``discount ** level``, each sample then scaled to unit variance
    (multi-resolution or "pyramid" noise, Whitaker 2023; kohya-ss's ``--multires_noise_discount``).

    With white noise a latent's colour blobs stay legible in the noisy latent up to the last
    timestep (SD's schedule keeps sqrt(alpha_bar) = 0.068 of the signal there, and a blob's noise
    falls with its area), so a model can learn to read them off the noise it is given instead of
    off its conditioning, and at sampling time the first noise then decides them. ``discount`` 0 is
    white noise.
    """
    if len(shape) != 4:
        raise ValueError(f"pyramid noise needs a (B, C, H, W) shape, got {tuple(shape)}")
    if not 0 <= discount < 1:
        raise ValueError(f"discount must lie in [0, 1), got {discount}")
    b, c, h, w = shape
    # drawn where the generator lives (without one, on the target device: no host-to-device copy per step)
    where = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=where)
    if discount > 0:
        level, sh, sw = 1, h, w
        while sh > 1 or sw > 1:
            sh, sw = max(1, sh // 2), max(1, sw // 2)
            coarse = torch.randn((b, c, sh, sw), generator=generator, device=where)
            noise = noise + discount ** level * F.interpolate(coarse, size=(h, w), mode="bilinear",
                                                              align_corners=False)
            level += 1
        noise = noise / noise.flatten(1).std(dim=1).view(b, 1, 1, 1)
    return noise.to(device=device, dtype=dtype)
