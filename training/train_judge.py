"""Train the attribute classifier that judges the demo family (``pipelines.metrics.attributes``).

    python -m training.train_judge --data TOYBOORU_DIR --output-dir OUT

Labels are Toybooru's ground truth (``truth`` of each record): hair colour and style, eye
colour, garment, outfit colour and pattern. Trained on the ``train`` split; its accuracy per
attribute on the ``test`` split (and on the same pictures made soft by ``degrade``) is written to
``OUT/accuracy.json`` and the model to ``OUT/judge``. ``--degrade`` trains on a share of soft
pictures too, so that the judge reads a tiny generator's soft pictures as well as crisp ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from pipelines.metrics.attributes import AttributeClassifier
from training.core import (Trainer, WithLoss, add_training_arguments, check_training_arguments, prepare_optimisation,
                           start_run, trainer_config)
from training.data.images import TaggedImages, collate_images

logger = logging.getLogger("train_judge")
ATTRIBUTES = {"hair_color": "hair_color", "hair_style": "hair_style", "eye_color": "eye_color",
              "garment": "garment", "cloth_color": "cloth_color", "pattern": "pattern"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train_judge", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a Toybooru folder (records with `truth`)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--degrade", type=float, default=0.0,
                   help="share of training pictures blurred, resampled and noised (``degrade``), so that the judge "
                        "also reads soft pictures such as a small autoencoder's or a tiny diffusion model's")
    add_training_arguments(p, learning_rate=2e-3, batch_size=64, max_train_steps=600, checkpointing_steps=100)
    args = p.parse_args(argv)
    check_training_arguments(p, args)
    if not 0 <= args.degrade <= 1:
        p.error("--degrade must be between 0 and 1")
    return args


def degrade(pixels: torch.Tensor, share: float) -> torch.Tensor:
    """``pixels`` (B, 3, R, R) in [-1, 1] with a ``share`` of them made soft: each chosen picture is
    shrunk by a factor in [1, 3] and brought back (bilinear), blurred (Gaussian, sigma in [0.1, 1.2])
    and noised (sigma in [0, 0.06]); the draws come from torch's generator (checkpointed with the run)."""
    if share <= 0:
        return pixels
    b, _, h, w = pixels.shape
    chosen = (torch.rand(b) < share).nonzero().flatten().tolist()
    factors, sigmas, noise = torch.rand(b) * 2 + 1, torch.rand(b) * 1.1 + 0.1, torch.rand(b) * 0.06
    out = pixels.clone()
    for i in chosen:
        x = pixels[i:i + 1]
        small = (max(4, round(h / factors[i].item())), max(4, round(w / factors[i].item())))
        x = F.interpolate(F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False),
                          size=(h, w), mode="bilinear", align_corners=False)
        x = TF.gaussian_blur(x, kernel_size=5, sigma=sigmas[i].item())
        out[i] = (x[0] + noise[i] * torch.randn_like(x[0])).clamp(-1, 1)
    return out


def labelled(dataset: TaggedImages) -> dict[str, list[str]]:
    """The classes of every attribute in ``dataset`` (raises if a record has no ground truth)."""
    classes: dict[str, set[str]] = {k: set() for k in ATTRIBUTES}
    for rec in dataset.records:
        truth = rec.get("truth")
        if not isinstance(truth, dict) or any(k not in truth for k in ATTRIBUTES):
            raise ValueError(f"record {rec['id']} has no ground truth; the judge needs a Toybooru folder")
        for k in ATTRIBUTES:
            classes[k].add(str(truth[k]))
    return {k: sorted(v) for k, v in classes.items()}


def accuracy(model: AttributeClassifier, dataset: TaggedImages) -> dict[str, float]:
    predictions = model.predict(dataset.pixels.float().div(127.5).sub(1.0))
    return {k: sum(p[k] == str(r["truth"][k]) for p, r in zip(predictions, dataset.records)) / len(dataset)
            for k in model.config.attributes}


def main(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.output_dir)
    accelerator = start_run(args)
    train = TaggedImages(args.data, "train", args.resolution, seed=args.seed)
    classes = labelled(train)
    index = {k: {c: i for i, c in enumerate(v)} for k, v in classes.items()}
    targets = {k: torch.tensor([index[k][str(r["truth"][k])] for r in train.records]) for k in classes}
    model = WithLoss(AttributeClassifier(classes, resolution=args.resolution, width=args.width),
                     AttributeClassifier.loss)
    model, optimizer, lr_scheduler = prepare_optimisation(accelerator, args, model)

    def loss_fn(batch):
        labels = {k: v[batch["index"]].to(accelerator.device) for k, v in targets.items()}
        return model(degrade(batch["pixel_values"], args.degrade).to(accelerator.device), labels)

    signature = {"attributes": classes, "width": args.width, "degrade": args.degrade,
                 "num_processes": accelerator.num_processes,
                 "train_batch_size": args.train_batch_size}
    trainer = Trainer(accelerator, trainer_config(args), train, collate_images, [model], optimizer, lr_scheduler,
                      loss_fn, signature)
    trainer.resume(args.resume_from_checkpoint)
    state = trainer.train()
    result: dict[str, Any] = {"global_step": state.global_step, "output_dir": str(out)}
    if accelerator.is_main_process:
        judge = accelerator.unwrap_model(model).model
        test = TaggedImages(args.data, "test", args.resolution, flip=False)
        result["accuracy"] = accuracy(judge, test)
        with torch.random.fork_rng(devices=[]):  # the same soft test pictures whatever the run's RNG state
            torch.manual_seed(0)
            soft = copy.copy(test)  # the same records; only the pixels change
            soft.pixels = ((degrade(test.pixels.float().div(127.5).sub(1.0), 1.0) + 1) * 127.5).round().byte()
        result["accuracy_soft"] = accuracy(judge, soft)
        judge.save_pretrained(out / "judge")
        (out / "accuracy.json").write_text(json.dumps({"split": "test", "pictures": len(test),
                                                       "accuracy": result["accuracy"],
                                                       "accuracy_soft": result["accuracy_soft"]}, indent=1))
        logger.info("accuracy on %d test pictures: %s", len(test), result["accuracy"])
    accelerator.wait_for_everyone()
    return result


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        logger.error("%s", e)
        sys.exit(f"error: {e}")
