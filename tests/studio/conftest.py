"""A tiny model family for the studio's tests: random weights, 32 px pictures, a few seconds to build."""

from __future__ import annotations

import pytest

from pipelines.zoo import ROOT, ModelZoo, ZooSpec


def _perturb(module, scale: float, seed: int) -> None:
    """Move zero-initialised layers off zero so that what they gate has an effect."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture(scope="session")
def tiny_zoo_spec(tmp_path_factory, tiny_clip) -> ZooSpec:
    """``ZooSpec("demo", ...)`` of a tiny RetriNet pipeline, a tiny Semantica pipeline, the ``tiny_clip``
    folder and the shipped demo detector."""
    import torch
    from diffusers import DDIMScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from pipelines.components import build_components
    from pipelines.retrinet import RetriNetModel, RetriNetPipeline
    from pipelines.semantica import SemanticaConditioner, SemanticaPipeline, prepare_unet

    root = tmp_path_factory.mktemp("tiny-zoo")
    c = build_components("tiny", seed=0)
    retrinet = RetriNetModel.from_unet(c["unet"], retrieval_attention_heads=4)
    _perturb(retrinet, 0.05, 1)  # so that references change the pictures
    scheduler = DDIMScheduler.from_config(c["scheduler"].config)
    RetriNetPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
                     retrinet=retrinet, scheduler=scheduler).save_pretrained(root / "retrinet")

    s = build_components("tiny", seed=1)
    torch.manual_seed(0)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                               num_attention_heads=4, image_size=32, patch_size=8)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    unet = prepare_unet(s["unet"], "tokens")
    conditioner = SemanticaConditioner.from_models(encoder, unet, conditioning="tokens")
    _perturb(conditioner, 0.5, 2)
    SemanticaPipeline(unet=unet, vae=s["vae"], scheduler=DDIMScheduler.from_config(s["scheduler"].config),
                      image_encoder=encoder, feature_extractor=processor,
                      conditioner=conditioner).save_pretrained(root / "semantica")
    return ZooSpec("demo", retrinet=str(root / "retrinet"), stable_diffusion=None, semantica=str(root / "semantica"),
                   clip=str(tiny_clip), detector=str(ROOT / "assets" / "demo-zoo" / "detector"))


@pytest.fixture(scope="session")
def tiny_models(tiny_zoo_spec) -> ModelZoo:
    """The tiny family, loaded once per session on the CPU and shared (as the studio shares it)."""
    return ModelZoo(tiny_zoo_spec, device="cpu")


@pytest.fixture(scope="module")
def engine(tiny_models, toybooru, tmp_path_factory):
    """A studio engine on the tiny family, with a workspace of its own for the module."""
    from studio.engine import Engine

    return Engine(data=str(toybooru), models=tiny_models, workspace=tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def files(toybooru, toybooru_records) -> list[str]:
    """Three Toybooru pictures that each give face, clothes and figure."""
    from helpers import upright_pictures

    return upright_pictures(toybooru, toybooru_records, 3)
