"""Build the demo family: every model trained on Toybooru by this project's own scripts.

    python -m training.demo_zoo --out assets/demo-zoo [--work .cache/demo-zoo] [--jobs 2]
    python -m training.demo_zoo --out assets/demo-zoo --report

Stages (each a subprocess running one of the project's command lines, resumable through its
checkpoints, and skipped when its output is already complete):

    data       Toybooru at 64 px, cowboy shots        python -m training.data.toybooru
    vae        AutoencoderKL, 64 px -> 16x16x4        training.train_vae
    clip       CLIPModel + word-level tokenizer       training.train_clip
    base       text-to-image UNet (the demo's "SD")   training.train_text_to_image (shipped as base/)
    base-zsnr  its zero-terminal-SNR, v twin          training.train_text_to_image (RetriNet's base)
    retrinet   RetriNet, multitask, setting b         training.train_retrinet
    retrinet-a the same budget in setting a           training.train_retrinet (for the report)
    semantica  Semantica on the CLIP vision tower     training.train_semantica
    judge      attribute classifier for the report    training.train_judge
    detector   YOLO11n-seg concept detector           training.train_detector (on 128 px pictures)

Independent stages run side by side (``--jobs``, each with its share of the CPU threads), the longest chains
of stages first (each stage's ``minutes``, measured on one thread of a 2-core machine).
Work files (data, checkpoints, logs) live in ``--work``; ``--out`` receives only what ships:
``base/`` (a ``StableDiffusionPipeline`` folder), ``clip/``, ``retrinet/`` (a ``RetriNetPipeline``
folder), ``semantica/``, ``judge/``, ``detector/`` and ``manifest.json`` (data seed, command lines,
steps, final losses, durations, checksums). ``--report`` writes ``REPORT.md`` (see
``training.demo_report``).

A stage whose models ship in ``--out`` is complete there too: the CLIP and the judge learn from
Toybooru's pictures alone (no other stage's output), so when ``--out`` holds them, unchanged since
its manifest recorded them (the same checksums) and trained by the plan's own command line (up
to the work folder), they are copied into the work folder instead of trained again (``restore``).
A build into an empty ``--out`` trains them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.core import read_metrics
from training.files import copy_folder, replacing_folder, write_text

logger = logging.getLogger("demo_zoo")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    """One step of the build: a command line, what it needs, and how to tell it is done."""

    name: str
    module: str
    args: list[str]
    done: Callable[[], bool]
    needs: tuple[str, ...] = ()
    run_dir: Path | None = None  # where metrics.jsonl is
    threads: int | None = None  # None: the share --jobs gives
    # about how long it runs on one CPU thread beside another stage: what the build's scheduler orders by (the plan's
    # figures: the stages' wall times in the builds from nothing of 2026-12-05, BENCHMARKS.md; the CLIP's and
    # RetriNet's from the second, after the CLIP's captions were padded to the longest and RetriNet's heads halved)
    minutes: float = 1.0
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> list[str]:
        return ["python", "-m", self.module, *self.args]


# each of -b (shipped) and -a (the report's comparison): the same budget. What the earlier builds found (their
# details: BENCHMARKS.md, "The demo family's training"):
# - RetriNet reads its references only on a zero-terminal-SNR base (v-prediction, trailing timesteps, uniform
#   weighting: min-SNR's v weight is 0 at the last step, the one that must read the references). At the last
#   step the noisy latent then holds nothing of the picture, so the colours have to come from the references
#   (v5: the target's outfit colour in 24.0 % of the report's reconstructions against 6.2 % with another
#   target's references; on the epsilon base 7.3 % against 4.2 %).
# - It is short of training: v6's -b continued 3000 more steps read its references' hair colour in 18.8 % of the
#   reconstructions instead of 8.3 % (outfit 32.3 % instead of 24.0 %), its reference gap still climbing. v7 ran
#   6000 steps in one cosine (64 min at 4 heads); at 2 heads they took 57 min on one core here beside other stages.
RETRINET_STEPS = 6000
RETRINET_LR = 2e-3
# 2 heads in each ControlCrossAttention (16 and 32 channels a head on the 32- and 64-channel skips), not 4: at 4, the
# two cross-attentions at 16x16 (256 queries over 4 x 256 reference tokens, 8 channels a head) took 40 % of a -b
# step, the CPU attention kernel being slow on narrow heads; 2 heads make a step 0.71 times as long (one head:
# 0.69), and trained 1500 steps they read their references as 4 do (the reference gap and the report's figures at
# step 1500: BENCHMARKS.md, "The demo family's training")
RETRINET_HEADS = 2
# --retrieval-positions (not in the seeds' code): without them the 16x16 cross-attentions put no more weight near a
# query's own place in its references than a uniform spread does at the last timesteps (benchmarks.retrinet_attention)
# and the references reach the picture only as a whole; with them, trained 1500 steps (2 heads, the plan otherwise),
# the reconstructions take the target's hair colour in 38.5 % of the report's pictures instead of 13.5 % and its
# outfit colour in 51.0 % instead of 32.3 %, compositions A's hair in 33.3 % instead of 13.5 % (BENCHMARKS.md);
# v8, the first build with them, 6000 steps: 54.2 % and 60.4 %, compositions A's hair 44.8 % (its REPORT.md)
# lambda of seed 001's Eq. 3 (the MSE over the face box, on top of the whole picture's), 3 instead of the seeds' 0.1
# (seed 002, A.4) since v12: a cowboy shot's head is about a sixth of the latent, its eyes one or two of its 256
# places, and at 0.1 the face weighs almost nothing more than the rest. Trained 6000 steps as v11's -b otherwise, -b
# reads its references' eye colour in 29.2 % of the report's reconstructions (v11: 7.3 %), hair colour in 90.6 %
# (78.1 %) and outfit colour in 79.2 % (72.9 %); compositions take A's eyes in 46.9 % (19.8 %) and all four in
# 11.5 % (3.1 %). At step 1500, against v11's own checkpoint of that step, 1 and 3 lifted the hair colour (30.2 %
# to 51.0 and 63.5 %), not yet the eyes; 10, at 6000 steps, read the face as 3 does and lost the outfit colour
# (compositions 53.1 % against 74.0 %) (BENCHMARKS.md, "The face in RetriNet's loss" and "v12, shipped")
RETRINET_FACE_WEIGHT = 3.0
# --retrieval-regions (not in the seeds' code) since v13: each reference's key positions lie where it was cut from in
# its own picture, so a face crop's eyes carry the positions of the target's eyes (with the plain positions a face
# crop fills the frame, and its eyes sit where the target's chest is). Trained as v12's -b otherwise (the same twin,
# bit for bit, seed and data), -b reads its references' eye colour in 36.5 % of the report's reconstructions (v12:
# 29.2 %), compositions A's eyes in 53.1 % in domain (46.9 %) and 37.5 % out of it (29.2 %), the other colours and
# the pattern within noise; at step 3000 already 28.1 / 41.7 / 32.3 % (v12 at that step: 14.6 / 24.0 / 17.7 %).
# All four right: reconstructions 11.5 % (8.3), compositions 10.4 % (11.5) and 6.2 % (2.1) (BENCHMARKS.md, "Crops
# placed where they were cut from")
BASE_STEPS, BASE_BATCH, BASE_LR = 12000, 8, 1.5e-3  # the shipped text-to-image model's
# v11 ships the base's average of the weights (diffusers' EMAModel, train_text_to_image --use-ema): on the cowboy shots'
# four-negative CLIP, chosen on seed 1's 384 test prompts (the report draws seed 0's), hair and outfit colour both
# right 83.6 % against 81.8 % without it and 79.4 % at lr 1.25e-3; on the report's prompts then 82.3 % against 79.2 %.
# Decay 0.999 averages over about the last 1000 steps; the default 0.9999 reaches back over most of a short run
# (session 32: 1500 x 64 with it 45.3 %, without 50.0 %). The average costs 1.7 % of the base's time
BASE_EMA_DECAY = 0.999
RETRINET_BASE = "base-zsnr"  # the run under runs/ whose pipeline RetriNet starts from
# -a runs the first quarter of -b's schedule (the same --restart-steps, so the same learning rate at every
# step), and the report compares -b's checkpoint of that step with it: the same budget, and the build
# within its time (-a's augmented references cannot be cached: it is the slowest stage per step)
RETRINET_A_STEPS = 1500


def plan(work: Path, out: Path, seed: int = 0) -> dict[str, Stage]:
    """The stages, with the settings the shipped demo family was built with."""
    data, data_det, runs = work / "toybooru", work / "toybooru-det", work / "runs"

    def ran(name: str, product: str) -> Callable[[], bool]:
        return lambda: (runs / name / product).is_dir()

    def common(name: str, steps: int, batch: int, lr: float, every: int = 50) -> list[str]:
        return ["--output-dir", str(runs / name), "--max-train-steps", str(steps), "--train-batch-size", str(batch),
                "--learning-rate", str(lr), "--checkpointing-steps", str(every), "--logging-steps", "10",
                "--seed", str(seed), "--resume-from-checkpoint", "latest"]

    base = runs / "base" / "pipeline"
    retrinet = ["--pretrained", str(runs / RETRINET_BASE / "pipeline"), "--data", str(data), "--task", "multitask",
                "--num-references", "4", "--resolution", "64", "--retrieval-attention-heads", str(RETRINET_HEADS),
                "--gradient-accumulation-steps", "1",
                "--restart-steps", str(RETRINET_STEPS), "--lr-warmup-steps", "20", "--prompt-tags", "neutral",
                "--cache-latents", "--timestep-weighting", "uniform", "--retrieval-positions", "--retrieval-regions",
                "--face-loss-weight", str(RETRINET_FACE_WEIGHT), "--validation-steps", "150",
                "--num-validation-images", "2"]
    text_to_image = ["--vae", str(runs / "vae" / "vae"), "--text-encoder", str(runs / "clip" / "clip"), "--data",
                     str(data), "--resolution", "64", "--lr-warmup-steps", "20", "--cache-latents"]
    stages = [
        # cowboy shots (--scene demo-cowboy: the figures from the head to the thighs, eyes and patterns 1.5 times as
        # large), since v11. Session 35 built the family on them: the VAE keeps all four attributes on 27.7 % of its
        # reconstructions (full figures, v10's --scene demo: 5.5 %) and RetriNet reads its references' hair / outfit
        # colour in 77.1 / 74.0 % of the reconstructions (v10: 52.1 / 59.4 %), but the base got the outfit colour
        # right in only 52.6 % of its prompts (v10: 89.8 %): it painted a two-piece outfit's main piece in the other
        # piece's colour, because the CLIP's text tower did not bind each colour word to its garment. Four swap hard
        # negatives a caption in the CLIP (see the clip stage) carry the base to 79.2 % of the report's 384 test
        # prompts (81.8 % of seed 1's), and its average of the weights (BASE_EMA_DECAY) to 82.3 / 83.6 % (v10's base:
        # 82.3 / 81.8 %). BENCHMARKS.md, "Cowboy shots", "Hard negatives for the cowboy CLIP" and "v11, shipped".
        # Since v14 the cowboy shots are drawn bold (--scene demo-bold: the same pictures, patterns of at least two
        # latent cells a period, dot pupils): the VAE keeps all four attributes on 69.3 % of its reconstructions
        # (27.7 % on demo-cowboy), the base follows hair and outfit colour in 88.3 % of the report's prompts
        # (82.3 %); RetriNet within noise of v13 (BENCHMARKS.md, "Bold features")
        Stage("data", "training.data.toybooru",
              ["--out", str(data), "--num-images", "10000", "--seed", str(seed), "--size", "64", "--scene",
               "demo-bold"],
              lambda: (data / "annotations.jsonl").is_file(), minutes=0.25),
        # batch 8 and a colour loss of 30 (session 13): the judge reads hair and outfit colour on 80.7 % of the test
        # pictures' reconstructions, against 38.5 % for v6's VAE (batch 32, colour loss 1, 1500 steps, and a second
        # stage training its decoder alone), in a quarter of the time; a decoder trained on alone afterwards did not
        # make RetriNet's pictures any better (session 14), so there is no decoder stage
        Stage("vae", "training.train_vae", ["--data", str(data), "--resolution", "64", "--lr-warmup-steps", "20",
                                            "--face-loss-weight", "1.0", "--color-loss-weight", "30",
                                            *common("vae", 3000, 8, 1e-3, every=100)],
              ran("vae", "vae"), ("data",), runs / "vae", minutes=16),
        # --hard-negatives 4 (session 36): each caption is also ranked, for its own picture, below 4 copies of itself
        # with the attribute words of two tags swapped ("blue kimono, green sash" for "green kimono, blue sash"), so
        # that the text tower binds each colour to its garment: on the 2274 two-piece test pictures of the cowboy
        # shots it scores the own caption above the garment-swapped one in 80.8 % (no negatives: 62.5 %; one: 73.9 %;
        # v10's CLIP on full figures: 83.2 %), and the base on it follows hair and outfit colour in 79.2 % of the
        # report's prompts before its average of the weights (no negatives: 52.6 %; one: 67.4 %), for a step 2.1
        # times as long (one: 1.27 times).
        # 2000 steps: after 400 the CLIP told a picture's caption from the same caption with another hair colour
        # only 21 % of the time (another outfit colour: 68 %), and the base, which reads its frozen text tower,
        # cannot follow what the tower does not tell apart; about 95 % and 97 % after 2000, and the base trained on it
        # gets hair and outfit colour right in 27 % of the report's test prompts (4 % on the 400-step CLIP)
        Stage("clip", "training.train_clip", ["--data", str(data), "--resolution", "64", "--lr-warmup-steps", "20",
                                              "--hard-negatives", "4", *common("clip", 2000, 128, 5e-4, every=250)],
              ran("clip", "clip"), ("data",), runs / "clip", minutes=40),
        # the shipped text-to-image model (base/) and the report's base figure are the epsilon one: the twin follows
        # its prompt's hair and outfit colours in 14.6 % of the report's 96 test prompts against 27.1 % (21.9 %
        # against 19.8 % at guidance 3); RetriNet starts from the twin (see RETRINET_STEPS), so the twin comes first
        # in the plan: it starts as soon as the CLIP is done, on the build's longest chain (clip, twin, RetriNet).
        # Session 34: the base's recipe (12000 x 8 at 1.5e-3, 28 min) makes a better twin (56.5 % of the report's 384
        # test prompts against this one's 39.3 %), but RetriNet -b on it reads its references' hair colour worse
        # (the reconstructions 33.3 % against 52.1 %, compositions A's hair 37.5 % against 49.0 %) and their outfit
        # colour better (65.6 / 71.9 % against 59.4 / 57.3 %), for 10 more minutes of the longest chain: kept as is
        # (BENCHMARKS.md, "A better twin does not make a better RetriNet")
        Stage("base-zsnr", "training.train_text_to_image",
              [*text_to_image, "--prediction-type", "v_prediction", "--zero-terminal-snr", "--timestep-weighting",
               "uniform", *common("base-zsnr", 1500, 64, 1e-3, every=100)],
              ran("base-zsnr", "pipeline"), ("vae", "clip"), runs / "base-zsnr", minutes=17.5),
        # 12000 steps of batch 8: the same 96,000 pictures as v8's 1500 of batch 64 in 8 times the updates, 26 min
        # (v8's: 17). Hair and outfit colour both right in 192 test prompts (judged as the report does, so 3 to 3.6
        # points of noise), session 32: 1500 x 64 50.0 %, 3000 x 32 62.0 %, 6000 x 16 70.3 %, 12000 x 8 77.1 %,
        # 24000 x 4 74.5 % (37 min); twice the pictures in 3000 x 64 70.3 %, 6000 x 32 70.8 % (36.5 min); an average
        # of the weights (--use-ema) on 1500 x 64 45.3 %; guidance 3 / 7.5 / 10 instead of 5 51.0 / 45.3 / 36.5 %
        # (BENCHMARKS.md). Session 33, 12000 x 8 judged on 384 test prompts of each of two draws (the report's, seed 0,
        # and seed 1's): lr 5e-4 69.5 % (seed 0), 1e-3 78.1 / 80.2 %, 1.5e-3 82.3 / 81.8 %, 2e-3 78.4 / 79.7 %; hair
        # style 77 / 77 % at 1e-3, 87 to 91 % from 1.5e-3 up; 3e-3 diverged at step 1850 (the loss at 1). BASE_LR
        # is the best on seed 1's draw, half the rate that diverged
        Stage("base", "training.train_text_to_image",
              [*text_to_image, "--use-ema", "--ema-decay", str(BASE_EMA_DECAY),
               *common("base", BASE_STEPS, BASE_BATCH, BASE_LR, every=100)],
              ran("base", "pipeline"), ("vae", "clip"), runs / "base", minutes=26),
        Stage("retrinet", "training.train_retrinet",
              [*retrinet, "--setting", "b", *common("retrinet", RETRINET_STEPS, 16, RETRINET_LR, every=150)],
              ran("retrinet", "retrinet"), (RETRINET_BASE,), runs / "retrinet", minutes=57),
        Stage("retrinet-a", "training.train_retrinet",
              [*retrinet, "--setting", "a", *common("retrinet-a", RETRINET_A_STEPS, 16, RETRINET_LR, every=150)],
              ran("retrinet-a", "retrinet"), (RETRINET_BASE,), runs / "retrinet-a", minutes=23),
        Stage("semantica", "training.train_semantica",
              ["--pretrained", str(base), "--image-encoder", str(runs / "clip" / "clip"), "--data", str(data),
               "--resolution", "64", *common("semantica", 300, 32, 3e-4)],
              ran("semantica", "semantica"), ("base",), runs / "semantica", minutes=3),
        Stage("judge", "training.train_judge", ["--data", str(data), "--width", "24", "--lr-warmup-steps", "20",
                                                *common("judge", 2000, 64, 3e-3, every=100)],
              ran("judge", "judge"), ("data",), runs / "judge", minutes=23),
        Stage("data-det", "training.data.toybooru",
              ["--out", str(data_det), "--num-images", "2400", "--seed", str(seed), "--size", "128"],
              lambda: (data_det / "annotations.jsonl").is_file() or (out / "detector" / "model.safetensors").is_file(),
              minutes=0.2),
        # 10 epochs (11 min beside the VAE, 2026-12-05): on the detector test's 77 unseen test pictures, median head-box
        # IoU 0.937 and figure-mask IoU 0.904 (after refine_mask) against 0.958 and 0.902 for 30 epochs (76 min beside
        # other stages on 2026-12-03), the largest item of the build that no other stage waits for
        Stage("detector", "training.train_detector",
              ["--data", str(data_det), "--out", str(runs / "detector"), "--epochs", "10", "--imgsz", "160"],
              lambda: (out / "detector" / "model.safetensors").is_file() or (runs / "detector" / "export").is_dir(),
              ("data-det",), minutes=11),
    ]
    return {s.name: s for s in stages}


def summarize(stage: Stage) -> dict[str, Any]:
    """Steps, final loss and training seconds from a stage's ``metrics.jsonl``."""
    if stage.run_dir is None or not (stage.run_dir / "metrics.jsonl").is_file():
        return {}
    metrics = read_metrics(stage.run_dir / "metrics.jsonl")
    if not metrics:
        return {}
    tail = metrics[-5:]
    return {"steps": metrics[-1]["step"], "final_loss": round(sum(m["loss"] for m in tail) / len(tail), 5),
            "train_seconds": round(sum(m["seconds"] for m in metrics), 1)}


def chain_minutes(stages: dict[str, Stage]) -> dict[str, float]:
    """Each stage's ``minutes`` plus those of the longest chain of stages that need it: how long the build runs
    after the stage starts, however many CPUs. The scheduler starts the longest chains first."""
    chains: dict[str, float] = {}

    def chain(name: str, seen: tuple[str, ...] = ()) -> float:
        if name in seen:
            raise ValueError(f"stages need each other in a cycle: {' -> '.join((*seen, name))}")
        if name not in chains:
            after = [chain(s.name, (*seen, name)) for s in stages.values() if name in s.needs]
            chains[name] = stages[name].minutes + max(after, default=0.0)
        return chains[name]

    for name in stages:
        chain(name)
    return chains


def _takes_a_slot_it_needs(stage: Stage, pending: list[Stage], running: set[str], finished: set[str],
                           chains: dict[str, float], free: int, left: dict[str, float] | None = None) -> bool:
    """Whether starting ``stage`` now would keep a longer chain waiting: the stages ahead of it, each about to be
    ready (waiting only for running stages), would find fewer slots than there are of them, counting the slots
    the stages they wait for give back. ``left``: the minutes each running stage has still to run (its
    ``minutes`` less the time it has run); a stage that should be done before the first of the stages ahead is
    ready keeps nothing waiting, and runs on a slot that would otherwise stay idle."""
    ahead = [s for s in pending if chains[s.name] > chains[stage.name] and s.needs
             and all(n in finished or n in running for n in s.needs)
             and not all(n in finished for n in s.needs)]
    if not ahead:
        return False
    if left is not None:
        ready_in = min(max(left.get(n, 0.0) for n in s.needs if n in running) for s in ahead)
        if stage.minutes <= ready_in:
            return False
    given_back = {n for s in ahead for n in s.needs if n in running}
    return free - 1 + len(given_back) < len(ahead)


def run_stages(stages: dict[str, Stage], work: Path, jobs: int, only: set[str] | None = None) -> dict[str, Any]:
    """Run what is not done yet, ``jobs`` at a time, in dependency order, the longest chains (``chain_minutes``)
    first; return each stage's record. A ready stage waits rather than take the slot a longer chain is about to
    need."""
    records_path = work / "stages.json"
    records: dict[str, Any] = json.loads(records_path.read_text()) if records_path.is_file() else {}
    wanted = set(stages) if only is None else set(only)
    chains = chain_minutes(stages)
    # the longest chains first; sorted() is stable, so the plan's order among equals
    pending = sorted((s for s in stages.values() if s.name in wanted), key=lambda s: -chains[s.name])
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    finished = {s.name for s in stages.values() if s.name not in wanted and s.done()}
    cpus = os.cpu_count() or 1
    (work / "logs").mkdir(parents=True, exist_ok=True)

    touched: set[str] = set()  # the stages this run recorded: another build run side by side keeps its own
    fresh: set[str] = set()  # the stages started here with nothing to resume

    def save() -> None:
        merged = json.loads(records_path.read_text()) if records_path.is_file() else {}
        merged.update({name: records[name] for name in touched})
        write_text(records_path, json.dumps(merged, indent=1))
        records.update(merged)

    def stop_running() -> None:
        """Stop the stages still running (their checkpoints let a rerun resume them), without waiting long."""
        for proc, _, _ in running.values():
            proc.terminate()
        for proc, _, log in running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        running.clear()

    try:
        while pending or running:
            for stage in list(pending):
                if stage.done():
                    logger.info("%s: already complete, skipped", stage.name)
                    kept = records.get(stage.name, {})  # what an earlier run of the same command measured
                    records[stage.name] = {**(kept if kept.get("command") == stage.command else {}),
                                           "command": stage.command, **summarize(stage)}
                    touched.add(stage.name)
                    pending.remove(stage)
                    finished.add(stage.name)
                    continue
                left = {n: max(0.0, stages[n].minutes - (time.perf_counter() - t0) / 60)
                        for n, (_, t0, _) in running.items()}
                if len(running) < jobs and all(n in finished for n in stage.needs) and not _takes_a_slot_it_needs(
                        stage, pending, set(running), finished, chains, jobs - len(running), left):
                    ready = sum(all(n in finished for n in s.needs) for s in pending)
                    # the CPU threads are shared by what runs now and what could start with it
                    threads = max(1, cpus // max(1, min(jobs, len(running) + ready)))
                    # idle OpenMP threads sleep: spinning ones take the core a stage beside them needs
                    env = dict(os.environ, OMP_NUM_THREADS=str(stage.threads or threads),
                               MKL_NUM_THREADS=str(stage.threads or threads),
                               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                               PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
                    if stage.run_dir is not None and not (stage.run_dir / "metrics.jsonl").is_file():
                        fresh.add(stage.name)  # nothing to resume: an earlier record's seconds are another run's
                    log = open(work / "logs" / f"{stage.name}.log", "a")
                    logger.info("%s: %s", stage.name, " ".join(stage.command))
                    proc = subprocess.Popen([sys.executable, "-m", stage.module, *stage.args], cwd=ROOT, env=env,
                                            stdout=log, stderr=subprocess.STDOUT)
                    running[stage.name] = (proc, time.perf_counter(), log)
                    pending.remove(stage)
            for name, (proc, t0, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                if proc.returncode != 0:  # the handler below stops the others too
                    raise RuntimeError(f"stage {name} failed (exit {proc.returncode}); see {work / 'logs' / name}.log")
                stage = stages[name]
                rec = records.get(name, {})
                if rec.get("command") != stage.command:  # another command's record (time, notes) is not this run's
                    rec = {}
                if name in fresh:  # a run from its first step: its seconds are this run's alone, not a resumed one's
                    rec.pop("seconds", None)
                seconds = round(rec.get("seconds", 0) + time.perf_counter() - t0, 1)
                rec.update({"command": stage.command, "seconds": seconds, **summarize(stage)})
                records[name] = rec
                touched.add(name)
                save()
                finished.add(name)
                logger.info("%s: done in %.0f s", name, time.perf_counter() - t0)
            if running:
                time.sleep(2)
            elif pending and not any(all(n in finished for n in s.needs) for s in pending):
                raise RuntimeError(f"stages {[s.name for s in pending]} wait for stages that were not run")
    except BaseException:  # a failed stage, Ctrl-C, SIGTERM (made SystemExit by _exit_on_sigterm): no orphans
        stop_running()
        save()
        raise
    save()
    return records


# ---------------------------------------------------------------------- the shipped folder

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# stages whose product ships as it is, so that restore() may take it back from the shipped folder instead of training
# it again: stage -> (shipped folder, its product in the stage's run folder, files beside the product that ship in
# that folder too); package() ships them by the same table
RESTORABLE = {"clip": ("clip", "clip", ()), "judge": ("judge", "judge", ("accuracy.json",))}


def _work_of(command: list[str]) -> str | None:
    """The work folder a recorded command line wrote to (its ``--output-dir`` is WORK/runs/NAME)."""
    if "--output-dir" not in command:
        return None
    return str(Path(command[command.index("--output-dir") + 1]).parents[1])


def _same_command(record: dict[str, Any], command: list[str], old_work: str, work: Path) -> bool:
    """Whether a shipped stage record ran ``command``, once the work folder it ran in is read as ``work``."""
    return [a.replace(old_work, str(work)) for a in record.get("command", [])] == command


def _needs(stages: dict[str, Stage], name: str) -> list[str]:
    """The stages ``name`` needs, directly or through others, in the plan's order."""
    seen: set[str] = set()
    todo = list(stages[name].needs)
    while todo:
        need = todo.pop()
        if need not in seen:
            seen.add(need)
            todo.extend(stages[need].needs)
    return [n for n in stages if n in seen]


def restore(stages: dict[str, Stage], work: Path, out: Path) -> dict[str, dict[str, Any]]:
    """Copy into ``work`` the shipped models of the stages in ``RESTORABLE`` that have not run there yet, when
    ``out/manifest.json`` recorded them with the plan's own command line (up to the work folder's path) and
    their files are unchanged since (the manifest's checksums). Returns the manifest's records of what was
    restored, each with ``restored_from``; anything else is left for the build to train."""
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        return {}
    try:
        manifest = json.loads(manifest_path.read_text())
        files, records = manifest["files"], manifest["stages"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        logger.warning("%s is unreadable (%s): nothing restored from it", manifest_path, e)
        return {}
    restored = {}
    for name, (shipped, product, extras) in RESTORABLE.items():
        stage = stages.get(name)
        record = records.get(name, {})
        if stage is None or stage.done() or not record.get("command"):
            continue
        old_work = _work_of(record["command"])
        if old_work is None or not _same_command(record, stage.command, old_work, work):
            logger.info("%s: the shipped one was trained by another command line; training it", name)
            continue
        # what it learnt from: the stages it needs, down to the data, run by the same command lines (the data
        # stage's command has no --output-dir, so its work folder is the trained stage's)
        changed = [need for need in _needs(stages, name)
                   if not _same_command(records.get(need, {}), stages[need].command, old_work, work)]
        if changed:
            logger.info("%s: the shipped one learnt from another %s; training it", name, ", ".join(changed))
            continue
        mine = {k: v for k, v in files.items() if Path(k).parts[0] == shipped}
        if not mine or any(not (out / k).is_file() or sha256(out / k) != v["sha256"] for k, v in mine.items()):
            logger.info("%s: %s is not the one its manifest records; training it", name, out / shipped)
            continue
        run = work / "runs" / name
        skip = shutil.ignore_patterns(*extras) if extras else None
        copy_folder(out / shipped, run / product, ignore=skip)
        for extra in extras:
            shutil.copy(out / shipped / extra, run / extra)
        # under the plan's command as it reads for this work folder, so that the build keeps the record
        restored[name] = {**record, "command": stage.command, "trained_command": record["command"],
                          "restored_from": str(out / shipped)}
        logger.info("%s: restored from %s (trained by the same command line)", name, out / shipped)
    return restored


def package(work: Path, out: Path) -> None:
    """Assemble ``out`` from the runs: each public class loads its folder directly."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from pipelines.components import load_vae
    from pipelines.retrinet import RetriNetModel, RetriNetPipeline

    runs = work / "runs"
    out.mkdir(parents=True, exist_ok=True)
    for name, (shipped, product, extras) in RESTORABLE.items():
        copy_folder(runs / name / product, out / shipped)
        for extra in extras:
            shutil.copy(runs / name / extra, out / shipped / extra)
    # the demo's "Stable Diffusion" ships too (StableDiffusionPipeline.from_pretrained loads it), so the report's
    # base figure can be measured again from the shipped folder alone, on any machine
    copy_folder(runs / "base" / "pipeline", out / "base")
    base_vae = load_vae(runs / "base" / "pipeline", subfolder="vae")
    # the base RetriNet trained from (the zero-terminal-SNR twin: the same VAE and text tower, its own UNet and
    # noise schedule, which the pipeline must sample with)
    retrinet_base = StableDiffusionPipeline.from_pretrained(runs / RETRINET_BASE / "pipeline")
    unet = UNet2DConditionModel.from_pretrained(runs / "retrinet" / "unet") \
        if (runs / "retrinet" / "unet").is_dir() else retrinet_base.unet
    pipe = RetriNetPipeline(vae=base_vae, text_encoder=retrinet_base.text_encoder,
                            tokenizer=retrinet_base.tokenizer, unet=unet,
                            retrinet=RetriNetModel.from_pretrained(runs / "retrinet" / "retrinet"),
                            scheduler=DPMSolverMultistepScheduler.from_config(retrinet_base.scheduler.config))
    with replacing_folder(out / "retrinet") as tmp:
        pipe.save_pretrained(tmp)
    if (runs / "semantica" / "semantica").is_dir():
        copy_folder(runs / "semantica" / "semantica", out / "semantica")
    if (runs / "detector" / "export").is_dir():
        copy_folder(runs / "detector" / "export", out / "detector")


def write_manifest(out: Path, records: dict[str, Any], seed: int) -> dict[str, Any]:
    files = {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(out.rglob("*")) if p.is_file() and p.name not in ("manifest.json", "REPORT.md")
             and "report" not in p.relative_to(out).parts}
    manifest = {"data_seed": seed, "stages": records, "files": files,
                "total_bytes": sum(f["bytes"] for f in files.values())}
    write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.demo_zoo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "assets" / "demo-zoo"), help="the shipped folder")
    p.add_argument("--work", default=str(ROOT / ".cache" / "demo-zoo"), help="data, checkpoints and logs")
    p.add_argument("--seed", type=int, default=0, help="Toybooru's seed and every training seed")
    p.add_argument("--jobs", type=int, default=2, help="stages run side by side")
    p.add_argument("--stages", default=None,
                   help="comma-separated stages to run (default: all, then package); 'package' among them also "
                        "assembles --out and its manifest from the runs")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of every stage (default: the CPUs shared among the stages that run together). "
                        "A stage run again alone with the threads it had in a full build (1 on 2 cores, --jobs 2) "
                        "computes the same weights: the float sums' order depends on them")
    p.add_argument("--report", action="store_true", help="write REPORT.md from the shipped models")
    p.add_argument("--report-samples", type=int, default=96, help="pictures per report figure")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.report_samples < 2:
        p.error("--report-samples must be at least 2")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    return args


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    stages = plan(work, out, args.seed)
    for stage in stages.values():
        stage.threads = args.threads or stage.threads
    if args.report:
        from training.demo_report import write_report

        return write_report(out, work, samples=args.report_samples, seed=args.seed)
    only, packaging = None, True
    if args.stages:
        only = {s.strip() for s in args.stages.split(",") if s.strip()}
        packaging = "package" in only
        only.discard("package")
        unknown = only - set(stages)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; known: {', '.join(stages)}, package")
    work.mkdir(parents=True, exist_ok=True)
    restored = restore({k: v for k, v in stages.items() if only is None or k in only}, work, out)
    if restored:  # the build's records keep what the shipped manifest said of them
        records_path = work / "stages.json"
        kept = json.loads(records_path.read_text()) if records_path.is_file() else {}
        write_text(records_path, json.dumps({**kept, **restored}, indent=1))
    records = run_stages(stages, work, args.jobs, only)
    if packaging:
        package(work, out)
        return write_manifest(out, records, args.seed)
    return records


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # so that run_stages stops the stages it started instead of leaving them running


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        main(parse_args())
    except (ValueError, RuntimeError) as e:
        logger.error("%s", e)
        sys.exit(f"error: {e}")
