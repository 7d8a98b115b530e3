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



@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A small CLIP with random weights, saved locally with its processor (no download)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pipelines.components import char_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip") / "clip"
    tok = char_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": 600, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tok)
    processor.save_pretrained(folder)
    return folder
