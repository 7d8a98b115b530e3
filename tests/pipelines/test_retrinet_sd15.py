"""RetriNet at Stable Diffusion 1.5 size: the real configurations with random weights (no download)."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from pipelines.components import SD15_UNET, build_components
from pipelines.retrinet import Reference, RetriNetModel, RetriNetPipeline
from pipelines.retrinet.model import count_parameters

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd15():
    torch.manual_seed(0)
    components = build_components("sd15", seed=0)
    retrinet = RetriNetModel.from_unet(components["unet"])
    pipe = RetriNetPipeline(**components, retrinet=retrinet)
    pipe.set_progress_bar_config(disable=True)
    return components, pipe


REFS = [Reference(Image.new("RGB", (200, 300), c), k) for c, k in
        (((220, 30, 30), "face"), ((30, 30, 220), "clothes"), ((30, 200, 30), "figure"), ((250, 250, 0), "face"))]


def test_sd15_retrinet_builds_and_runs_a_step_with_4_references(sd15, capsys):
    components, pipe = sd15
    unet, retrinet = components["unet"], pipe.retrinet
    assert tuple(unet.config.block_out_channels) == SD15_UNET["block_out_channels"]
    assert retrinet.num_skips == 12 and len(retrinet.cross_attentions) == 12
    n_unet, n_rn = count_parameters(unet), count_parameters(retrinet)
    n_bridge = sum(count_parameters(m) for m in (retrinet.cross_attentions, retrinet.zero_convs,
                                                  retrinet.mid_cross_attention, retrinet.mid_zero_conv))
    with capsys.disabled():
        print(f"\nSD 1.5 UNet: {n_unet / 1e6:.1f} M parameters; RetriNet: {n_rn / 1e6:.1f} M "
              f"(retrieval encoder {(n_rn - n_bridge) / 1e6:.1f} M, cross-attentions and zero convs {n_bridge / 1e6:.1f} M)")
    assert 855e6 < n_unet < 865e6  # SD 1.5's UNet has 859.5 M
    with torch.no_grad():
        for conv in [*retrinet.zero_convs, retrinet.mid_zero_conv]:
            torch.nn.init.normal_(conv.weight, std=0.01)
    try:
        latents = pipe("1girl", REFS, num_inference_steps=1, height=256, width=256, reference_size=256,
                       output_type="latent", generator=torch.Generator().manual_seed(0)).images
    finally:
        with torch.no_grad():
            for conv in [*retrinet.zero_convs, retrinet.mid_zero_conv]:
                conv.weight.zero_()
        pipe.retrieval_cache.clear()
    assert latents.shape == (1, 4, 32, 32) and torch.isfinite(latents).all()


def test_sd15_zero_initialised_pipeline_equals_stable_diffusion_over_one_step(sd15):
    components, pipe = sd15
    sd = StableDiffusionPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                                 tokenizer=components["tokenizer"], unet=components["unet"],
                                 scheduler=components["scheduler"], safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=1, height=256, width=256, guidance_scale=7.0, output_type="latent",
              negative_prompt="lowres")
    ours = pipe("1girl, red hair", REFS, generator=torch.Generator().manual_seed(0), reference_size=128, **kw).images
    theirs = sd("1girl, red hair", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.allclose(ours, theirs, atol=1e-4)
