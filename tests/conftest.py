"""Shared fixtures. Tests never reach the network and never write outside tmp folders."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # for tests/helpers.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("YOLO_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _studio_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RETRINET_STUDIO_CACHE", str(tmp_path_factory.getbasetemp() / "studio-cache"))


@pytest.fixture(scope="session")
def toybooru(tmp_path_factory) -> Path:
    """A small Toybooru shared by the tests that only read it (copy it before changing it)."""
    from training.data.toybooru import generate

    return generate(tmp_path_factory.mktemp("tb") / "toybooru", num_images=120, seed=3, size=96)


@pytest.fixture(scope="session")
def toybooru_records(toybooru) -> list[dict]:
    import json

    return [json.loads(line) for line in (toybooru / "annotations.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion folder (random weights), as `--pretrained` expects."""
    from diffusers import StableDiffusionPipeline

    from pipelines.components import build_components

    folder = tmp_path_factory.mktemp("tiny-sd") / "sd"
    StableDiffusionPipeline(**build_components("tiny", seed=0), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder

