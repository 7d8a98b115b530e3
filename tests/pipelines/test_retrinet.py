import threading

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image
from torch import nn

from pipelines.components import build_components
from pipelines.retrinet import ControlCrossAttention, Reference, RetriNetModel, RetriNetPipeline


class SeedControlCrossAttention(nn.Module):
    """Seed 002, A.4, Code 1, verbatim."""

    def __init__(self, in_channels, num_heads):
        super().__init__()
        self.norm0 = nn.LayerNorm(in_channels)
        self.norm1 = nn.LayerNorm(in_channels)
        self.norm2 = nn.LayerNorm(in_channels)
        self.gelu = nn.GELU()
        self.cross_attention = nn.MultiheadAttention(in_channels, num_heads, batch_first=True)
        self.linear = nn.Linear(in_channels, in_channels)

    def forward(self, hs, control):
        control = control.reshape(hs.shape[0], control.shape[0] // hs.shape[0] * control.shape[1], control.shape[2])
        hs = self.norm0(hs)
        control = self.norm1(control)
        hs = self.cross_attention(hs, control, control)[0] + hs
        hs = self.gelu(self.linear(self.norm2(hs))) + hs
        return hs


@pytest.fixture(scope="module")
def components():
    return build_components("tiny", seed=0)


@pytest.fixture
def pipe(components):
    torch.manual_seed(1)
    p = RetriNetPipeline(**components, retrinet=RetriNetModel.from_unet(components["unet"]))
    p.set_progress_bar_config(disable=True)
    return p


def sd_pipe(components, scheduler=None):
    p = StableDiffusionPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                                tokenizer=components["tokenizer"], unet=components["unet"],
                                scheduler=scheduler or components["scheduler"], safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def perturb(retrinet, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in [*retrinet.zero_convs, retrinet.mid_zero_conv]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * std)
    return retrinet


def picture(color, size=(48, 64)):
    img = Image.new("RGB", size, color)
    img.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return img


REFS = [Reference(picture((220, 40, 40)), "face"), (picture((40, 40, 220)), "clothes")]
CALL = dict(num_inference_steps=4, height=32, width=32, output_type="latent")


def run(p, refs=REFS, seed=0, **kw):
    return p("1girl, red hair", refs, generator=torch.Generator().manual_seed(seed), **{**CALL, **kw}).images


# ---------------------------------------------------------------------------- ControlCrossAttention

def test_control_cross_attention_matches_the_seed_code():
    torch.manual_seed(0)
    seed = SeedControlCrossAttention(64, 8)
    for p in seed.parameters():  # random weights everywhere, not the default init
        nn.init.normal_(p, std=0.3)
    ours = ControlCrossAttention(64, 8)
    ours.load_state_dict(seed.state_dict())  # the seed's state dict loads as it is
    hs, control = torch.randn(3, 50, 64), torch.randn(3 * 4, 20, 64)  # B = 3, N = 4
    # in float64: in float32 the two take different attention kernels (ours asks for no weights, so PyTorch takes its
    # fused path), whose rounding differs by up to 2e-6 on some CPUs; in float64 any other computation would show
    seed.double(), ours.double()
    assert torch.allclose(ours(hs.double(), control.double()), seed(hs.double(), control.double()), rtol=0, atol=1e-12)
    assert list(dict(ours.named_children())) == ["norm0", "norm1", "norm2", "gelu", "cross_attention", "linear"]


def test_shared_references_give_the_seed_result():
    torch.manual_seed(0)
    seed = SeedControlCrossAttention(64, 8)
    for p in seed.parameters():
        nn.init.normal_(p, std=0.3)
    ours = ControlCrossAttention(64, 8)
    ours.load_state_dict(seed.state_dict())
    hs = torch.randn(5, 50, 64)
    groups = torch.randn(2 * 3, 20, 64)  # G = 2 groups of N = 3 references
    index = torch.tensor([0, 1, 1, 0, 1])
    per_sample = groups.view(2, 3, 20, 64)[index].reshape(5 * 3, 20, 64)  # what the seed needs: (B * N, L, C)
    assert torch.allclose(ours(hs, groups, index, 3), seed(hs, per_sample), atol=1e-5)
    one = groups[:3]
    assert torch.allclose(ours(hs, one, torch.zeros(5, dtype=torch.long), 3), seed(hs, one.repeat(5, 1, 1)),
                          atol=1e-5)
    with pytest.raises(ValueError, match="groups of 4"):
        ours(hs, groups, index, 4)


def test_control_cross_attention_checks_its_inputs():
    with pytest.raises(ValueError, match="heads"):
        ControlCrossAttention(30, 8)
    with pytest.raises(ValueError, match="split evenly"):
        ControlCrossAttention(16, 4)(torch.randn(3, 5, 16), torch.randn(4, 5, 16))


def test_position_embeddings_steer_queries_to_the_same_place_in_every_reference():
    from pipelines.retrinet.model import _positions

    side, c, n = 6, 32, 3
    cca = ControlCrossAttention(c, 1).double()
    with torch.no_grad():  # queries and keys are the position embeddings themselves, scaled up; values are zero
        w = cca.cross_attention.in_proj_weight
        w.zero_()
        w[:c].copy_(torch.eye(c) * 4)
        w[c:2 * c].copy_(torch.eye(c) * 4)
        cca.cross_attention.in_proj_bias.zero_()
    pos = _positions(side, side, c).double()
    assert pos.shape == (side * side, c)
    # one place of a picture, one embedding, whatever the grid: the 3x3 grid's tokens are the 6x6 grid's even ones
    coarse = _positions(side // 2, side // 2, c).view(side // 2, side // 2, c)
    assert torch.allclose(coarse, _positions(side, side, c).view(side, side, c)[::2, ::2], atol=1e-6)
    hs, control = torch.zeros(1, side * side, c, dtype=torch.double), torch.zeros(n, side * side, c, dtype=torch.double)
    seen = {}
    cca.cross_attention.register_forward_hook(lambda m, args, out: seen.update(q=args[0], k=args[1]))
    cca(hs, control, query_pos=pos, key_pos=pos)
    logits = seen["q"][0] @ seen["k"][0].T  # (L_q, N * L)
    best = logits.view(side * side, n, side * side).argmax(-1)  # each query's best token in each reference
    assert torch.equal(best, torch.arange(side * side).view(-1, 1).expand(-1, n))
    # the grouped path computes the same as the seed's path with positions too, and positions change the result
    torch.manual_seed(0)
    cca = ControlCrossAttention(c, 2)
    for p in cca.parameters():
        nn.init.normal_(p, std=0.3)
    hs, groups = torch.randn(4, side * side, c), torch.randn(2 * n, side * side, c)
    index = torch.tensor([1, 0, 0, 1])
    per_sample = groups.view(2, n, side * side, c)[index].reshape(4 * n, side * side, c)
    with_pos = cca(hs, groups, index, n, query_pos=pos.float(), key_pos=pos.float())
    assert torch.allclose(with_pos, cca(hs, per_sample, query_pos=pos.float(), key_pos=pos.float()), atol=1e-5)
    assert (with_pos - cca(hs, groups, index, n)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="go together"):
        cca(hs, groups, index, n, query_pos=pos.float())
    with pytest.raises(ValueError, match="do not fit"):
        cca(hs, groups, index, n, query_pos=pos.float(), key_pos=pos.float()[:-1])


def test_retrieval_positions_are_a_config_switch_without_parameters(components, tmp_path):
    unet = components["unet"]
    plain = RetriNetModel.from_unet(unet)
    placed = RetriNetModel.from_unet(unet, retrieval_positions=True)
    assert placed.state_dict().keys() == plain.state_dict().keys()  # the seed's state dict still loads
    placed.load_state_dict(perturb(plain).state_dict())
    x, ehs = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        base = unet(x, 500, encoder_hidden_states=ehs).sample
        a = plain.denoise(unet, x, 500, ehs, features_for(plain, 2, 3))
        b = placed.denoise(unet, x, 500, ehs, features_for(placed, 2, 3))
        assert (a - b).abs().max() > 1e-4 and (b - base).abs().max() > 1e-3
        # references at another size than the target (8x8 latents against 16x16) are placed on the same range
        assert features_for(placed, 2, 3).down[0].shape[-1] == 8
    placed.save_pretrained(tmp_path / "rn")
    loaded = RetriNetModel.from_pretrained(tmp_path / "rn")
    assert loaded.config.retrieval_positions is True
    with torch.no_grad():
        assert torch.allclose(loaded.denoise(unet, x, 500, ehs, features_for(loaded, 2, 3)), b, atol=1e-6)
    from diffusers import UNet2DConditionModel
    from pipelines.components import TINY_UNET

    odd = UNet2DConditionModel(**dict(TINY_UNET, block_out_channels=(30, 30), norm_num_groups=2))
    with pytest.raises(ValueError, match="divisible by 4"):
        RetriNetModel.from_unet(odd, retrieval_positions=True, retrieval_attention_heads=2)


def test_retrieval_max_keys_pools_the_large_skips_and_only_them(components, tmp_path):
    """Each reference's features are average-pooled by halves to at most retrieval_max_keys places per skip; the
    weights are the same (a switch of the config), and at None or a limit above every skip nothing changes."""
    import torch.nn.functional as F

    unet = components["unet"]
    plain = perturb(RetriNetModel.from_unet(unet, retrieval_positions=True))
    pooled = RetriNetModel.from_unet(unet, retrieval_positions=True, retrieval_max_keys=16)
    loose = RetriNetModel.from_unet(unet, retrieval_positions=True, retrieval_max_keys=10_000)
    assert pooled.state_dict().keys() == plain.state_dict().keys()
    pooled.load_state_dict(plain.state_dict())
    loose.load_state_dict(plain.state_dict())
    full, few = features_for(plain, 2, 3, size=16), features_for(pooled, 2, 3, size=16)
    sides = [tuple(d.shape[-2:]) for d in full.down]
    assert max(h * w for h, w in sides) > 16  # some skip is above the limit
    for a, b in zip(full.down, few.down):
        expected = a
        while expected.shape[-2] * expected.shape[-1] > 16:
            expected = F.avg_pool2d(expected, 2)
        assert b.shape[-2] * b.shape[-1] <= 16 and torch.allclose(b, expected, atol=1e-6)
    assert torch.equal(few.mid, full.mid)
    x, ehs = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        a = plain.denoise(unet, x, 500, ehs, full)
        b = pooled.denoise(unet, x, 500, ehs, few)
        assert b.shape == a.shape and (a - b).abs().max() > 1e-4
        assert torch.equal(loose.denoise(unet, x, 500, ehs, features_for(loose, 2, 3, size=16)), a)
    pooled.save_pretrained(tmp_path / "rn")
    assert RetriNetModel.from_pretrained(tmp_path / "rn").config.retrieval_max_keys == 16
    with pytest.raises(ValueError, match="retrieval_max_keys must be at least 1"):
        RetriNetModel.from_unet(unet, retrieval_max_keys=0)


def test_region_positions_place_a_reference_grid_inside_the_frame():
    from pipelines.retrinet.model import _positions, _region_positions

    c = 32
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    for side in (4, 6, 8):  # the whole frame is _positions exactly, at every grid size
        assert torch.allclose(_region_positions(full, side, side, c)[0], _positions(side, side, c), atol=1e-6)
    # a reference cut from the frame's top left quarter: its 4x4 grid sits on the frame's 8x8 grid's top left 4x4
    quarter = _region_positions(torch.tensor([[0.0, 0.0, 0.5, 0.5]]), 4, 4, c)[0].view(4, 4, c)
    assert torch.allclose(quarter, _positions(8, 8, c).view(8, 8, c)[:4, :4], atol=1e-6)
    # the bottom right quarter, and each row of a batch its own region
    both = _region_positions(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]), 4, 4, c)
    assert both.shape == (2, 16, c) and torch.allclose(both[0], quarter.view(16, c))
    assert torch.allclose(both[1].view(4, 4, c), _positions(8, 8, c).view(8, 8, c)[4:, 4:], atol=1e-6)


def test_control_cross_attention_takes_one_key_position_per_reference():
    from pipelines.retrinet.model import _positions

    torch.manual_seed(0)
    side, c, n = 4, 16, 2
    cca = ControlCrossAttention(c, 2)
    for p in cca.parameters():
        nn.init.normal_(p, std=0.3)
    pos = _positions(side, side, c)
    hs, groups = torch.randn(3, side * side, c), torch.randn(2 * n, side * side, c)
    index = torch.tensor([1, 0, 1])
    shared = cca(hs, groups, index, n, query_pos=pos, key_pos=pos)
    assert torch.allclose(cca(hs, groups, index, n, query_pos=pos, key_pos=pos.expand(2 * n, -1, -1)), shared,
                          atol=1e-6)  # the same position for every reference row: as before
    own = pos.expand(2 * n, -1, -1).clone()
    own[1] = pos.flip(0)  # the second reference of each group placed elsewhere
    own[3] = pos.flip(0)
    moved = cca(hs, groups, index, n, query_pos=pos, key_pos=own)
    assert (moved - shared).abs().max() > 1e-3
    per_sample = groups.view(2, n, side * side, c)[index].reshape(3 * n, side * side, c)
    own_per_sample = own.view(2, n, side * side, c)[index].reshape(3 * n, side * side, c)
    assert torch.allclose(cca(hs, per_sample, query_pos=pos, key_pos=own_per_sample), moved, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        cca(hs, groups, index, n, query_pos=pos, key_pos=own[:-1])


def test_retrieval_regions_move_the_keys_only_when_the_model_was_built_with_them(components, tmp_path):
    unet = components["unet"]
    placed = perturb(RetriNetModel.from_unet(unet, retrieval_positions=True))
    regioned = RetriNetModel.from_unet(unet, retrieval_positions=True, retrieval_regions=True)
    assert regioned.state_dict().keys() == placed.state_dict().keys()  # a switch of the config, no weights
    regioned.load_state_dict(placed.state_dict())
    gen = torch.Generator().manual_seed(0)
    lat, emb = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 77, 32, generator=gen)
    x, ehs = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4)
    faces = torch.tensor([[0.3, 0.05, 0.7, 0.45], [0.0, 0.0, 1.0, 1.0]] * 2)

    def predict(model, regions):
        with torch.no_grad():
            return model.denoise(unet, x, 500, ehs, model(lat, 500, emb, 2, reference_regions=regions))

    without = predict(placed, None)
    assert torch.equal(predict(placed, faces), without)  # a model without retrieval_regions ignores them
    assert torch.allclose(predict(regioned, None), without, atol=1e-6)  # no regions: every reference fills the frame
    assert torch.allclose(predict(regioned, full), without, atol=1e-6)
    moved = predict(regioned, faces)
    assert (moved - without).abs().max() > 1e-4
    regioned.save_pretrained(tmp_path / "rn")
    loaded = RetriNetModel.from_pretrained(tmp_path / "rn")
    assert loaded.config.retrieval_regions is True
    assert torch.allclose(predict(loaded, faces), moved, atol=1e-6)
    with pytest.raises(ValueError, match=r"must be \(4, 4\)"):
        regioned(lat, 500, emb, 2, reference_regions=faces[:3])
    with pytest.raises(ValueError, match="x1 > x0"):
        regioned(lat, 500, emb, 2, reference_regions=faces.flip(1))
    with pytest.raises(ValueError, match="needs retrieval_positions"):
        RetriNetModel.from_unet(unet, retrieval_regions=True)


def test_pipeline_passes_each_references_region(components):
    torch.manual_seed(1)
    model = perturb(RetriNetModel.from_unet(components["unet"], retrieval_positions=True, retrieval_regions=True))
    p = RetriNetPipeline(**components, retrinet=model)
    p.set_progress_bar_config(disable=True)
    face, clothes = picture((220, 40, 40)), picture((40, 40, 220))
    plain = run(p, [Reference(face, "face"), Reference(clothes, "clothes")])
    # no region is the whole frame; the regions reach the model, and the feature cache tells them apart
    assert torch.equal(run(p, [Reference(face, "face", (0.0, 0.0, 1.0, 1.0)), Reference(clothes, "clothes")]), plain)
    placed = run(p, [Reference(face, "face", (0.3, 0.0, 0.7, 0.4)), Reference(clothes, "clothes", (0, 0.4, 1, 1))])
    assert (placed - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="x1 > x0"):
        run(p, [Reference(face, "face", (0.7, 0.0, 0.3, 0.4)), Reference(clothes, "clothes")])


def test_pipeline_computes_the_regions_key_positions_once_per_call(components, monkeypatch):
    """They depend on the regions alone: one computation per grid size, not one per denoising step."""
    import pipelines.retrinet.model as model_module

    model = perturb(RetriNetModel.from_unet(components["unet"], retrieval_positions=True, retrieval_regions=True))
    p = RetriNetPipeline(**components, retrinet=model)
    p.set_progress_bar_config(disable=True)
    refs = [Reference(picture((220, 40, 40)), "face", (0.3, 0.0, 0.7, 0.4)),
            Reference(picture((40, 40, 220)), "clothes", (0, 0.4, 1, 1))]
    before = run(p, refs, num_inference_steps=3)
    grids = []
    compute = model_module._region_positions
    monkeypatch.setattr(model_module, "_region_positions",
                        lambda regions, h, w, c: grids.append((h, w, c)) or compute(regions, h, w, c))
    p.retrieval_cache.clear()
    assert torch.equal(run(p, refs, num_inference_steps=3), before)  # the same pictures
    assert grids and len(grids) == len(set(grids))  # each grid once, for all 3 steps


# ---------------------------------------------------------------------------- the model

def features_for(retrinet, g, n, seed=0, size=8):
    gen = torch.Generator().manual_seed(seed)
    lat = torch.randn(g * n, 4, size, size, generator=gen)
    emb = torch.randn(g * n, 77, 32, generator=gen)
    return retrinet(lat, 500, emb, n)


def test_zero_convolutions_make_retrinet_the_base_model(components):
    unet = components["unet"]
    retrinet = RetriNetModel.from_unet(unet)
    x, ehs = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        base = unet(x, 500, encoder_hidden_states=ehs).sample
        for seed in range(3):
            out = retrinet.denoise(unet, x, 500, ehs, features_for(retrinet, 2, 3, seed))
            assert torch.allclose(out, base, atol=1e-5)
        perturb(retrinet)
        f = features_for(retrinet, 2, 3)
        changed = retrinet.denoise(unet, x, 500, ehs, f)
        assert (changed - base).abs().max() > 1e-3
        assert torch.allclose(retrinet.denoise(unet, x, 500, ehs, f, retrieval_scale=0.0), base, atol=1e-6)
        # outside the injection the UNet is untouched, hooks or not
        assert torch.equal(unet(x, 500, encoder_hidden_states=ehs).sample, base)


def test_each_sample_reads_only_its_own_references(components):
    unet = components["unet"]
    retrinet = perturb(RetriNetModel.from_unet(unet))
    x, ehs = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    gen = torch.Generator().manual_seed(0)
    lat, emb = torch.randn(2 * 3, 4, 8, 8, generator=gen), torch.randn(6, 77, 32, generator=gen)
    with torch.no_grad():
        a = retrinet.denoise(unet, x, 500, ehs, retrinet(lat, 500, emb, 3))
        lat2 = lat.clone()
        lat2[3:] = torch.randn(3, 4, 8, 8, generator=gen)  # new references for sample 1 only
        b = retrinet.denoise(unet, x, 500, ehs, retrinet(lat2, 500, emb, 3))
    assert torch.allclose(a[0], b[0], atol=1e-6)
    assert (a[1] - b[1]).abs().max() > 1e-3


def test_retrieval_encoder_copies_the_unet_encoder(components):
    unet = components["unet"]
    retrinet = RetriNetModel.from_unet(unet)
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        ours, theirs = getattr(retrinet, name).state_dict(), getattr(unet, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    fresh = RetriNetModel.from_unet(unet, load_weights_from_unet=False)
    assert not torch.equal(fresh.conv_in.weight, unet.conv_in.weight)
    # one cross-attention and one zero convolution per skip the decoder reads: conv_in, block 0's
    # resnet and downsampler, block 1's resnet
    assert retrinet.num_skips == len(retrinet.cross_attentions) == 4
    assert retrinet.num_skips == sum(len(b.resnets) for b in unet.up_blocks)
    assert all(not c.weight.any() and not c.bias.any() for c in [*retrinet.zero_convs, retrinet.mid_zero_conv])
    assert not hasattr(retrinet, "controlnet_cond_embedding")


def test_from_unet_rejects_unsupported_unets():
    from diffusers import UNet2DConditionModel
    from pipelines.components import TINY_UNET

    with pytest.raises(ValueError, match="supports Stable Diffusion 1.x"):
        RetriNetModel.from_unet(UNet2DConditionModel(**TINY_UNET, class_embed_type="timestep"))


def test_training_modes(components):
    unet = components["unet"]
    retrinet = RetriNetModel.from_unet(unet)
    try:
        params = retrinet.set_training_mode(unet, "default")
        assert all(p.requires_grad for p in retrinet.parameters())
        assert all(p.requires_grad for p in unet.up_blocks.parameters()) and unet.conv_out.weight.requires_grad
        assert not any(p.requires_grad for m in (unet.conv_in, unet.down_blocks, unet.mid_block, unet.time_embedding)
                       for p in m.parameters())
        assert len(params) == len(list(retrinet.parameters())) + sum(
            1 for m in (unet.up_blocks, unet.conv_norm_out, unet.conv_out) for _ in m.parameters())
        retrinet.set_training_mode(unet, "lock_decoder")
        assert not any(p.requires_grad for p in unet.parameters())
        assert all(p.requires_grad for p in retrinet.parameters())
        params = retrinet.set_training_mode(unet, "lock_both")
        bridge = {id(p) for m in (retrinet.cross_attentions, retrinet.zero_convs, retrinet.mid_cross_attention,
                                  retrinet.mid_zero_conv) for p in m.parameters()}
        assert {id(p) for p in params} == bridge
        with pytest.raises(ValueError, match="unknown training mode"):
            retrinet.set_training_mode(unet, "lock_everything")
    finally:
        unet.requires_grad_(False)


def test_gradients_reach_the_zero_convolutions(components):
    unet = components["unet"]
    retrinet = RetriNetModel.from_unet(unet)
    try:
        retrinet.set_training_mode(unet, "default")
        x, ehs = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
        out = retrinet.denoise(unet, x, torch.tensor([10, 900]), ehs, features_for(retrinet, 2, 2))
        out.square().mean().backward()
        assert retrinet.zero_convs[0].weight.grad.abs().sum() > 0 and retrinet.mid_zero_conv.weight.grad.abs().sum() > 0
        assert unet.up_blocks[0].resnets[0].conv1.weight.grad is not None
        assert unet.down_blocks[0].resnets[0].conv1.weight.grad is None
    finally:
        unet.requires_grad_(False)
        unet.zero_grad(set_to_none=True)


def test_injection_is_per_thread(components):
    unet = components["unet"]
    retrinet = perturb(RetriNetModel.from_unet(unet))
    x, ehs = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        base = unet(x, 500, encoder_hidden_states=ehs).sample
        seen = {}
        inside, leave = threading.Event(), threading.Event()

        def other():
            inside.wait()
            seen["other"] = unet(x, 500, encoder_hidden_states=ehs).sample
            leave.set()

        t = threading.Thread(target=other)
        t.start()
        with retrinet.inject(unet, features_for(retrinet, 1, 2)):
            inside.set()
            leave.wait(timeout=60)
        t.join()
    assert torch.equal(seen["other"], base)


def test_model_round_trips_with_safetensors(tmp_path, components):
    retrinet = perturb(RetriNetModel.from_unet(components["unet"], max_references=6))
    retrinet.save_pretrained(tmp_path / "rn")
    assert sorted(p.name for p in (tmp_path / "rn").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = RetriNetModel.from_pretrained(tmp_path / "rn")
    assert loaded.config.max_references == 6
    for (k, a), (_, b) in zip(retrinet.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------------- the pipeline

@pytest.mark.parametrize("n", [1, 3, 8])
def test_pipeline_pictures_of_the_requested_size_deterministically(pipe, n):
    perturb(pipe.retrinet)
    concepts = ["face", "clothes", "figure"]
    refs = [Reference(picture((30 * i, 200 - 20 * i, 90)), concepts[i % 3]) for i in range(n)]
    a = pipe("1girl", refs, num_inference_steps=2, height=48, width=32, generator=torch.Generator().manual_seed(3))
    b = pipe("1girl", refs, num_inference_steps=2, height=48, width=32, generator=torch.Generator().manual_seed(3))
    assert [im.size for im in a.images] == [(32, 48)]
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    c = pipe("1girl", refs, num_inference_steps=2, height=48, width=32, generator=torch.Generator().manual_seed(4))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))


@pytest.mark.parametrize("scheduler_cls", [None, DDIMScheduler, EulerDiscreteScheduler])
def test_zero_initialised_pipeline_equals_stable_diffusion(components, pipe, scheduler_cls):
    # clip_sample=False: StableDiffusionPipeline silently rewrites a config without it; ours does not
    scheduler = scheduler_cls.from_config(components["scheduler"].config, clip_sample=False) if scheduler_cls \
        else components["scheduler"]
    pipe.scheduler = scheduler
    for kw in ({}, {"negative_prompt": "lowres, bad hands", "guidance_scale": 5.0},
               {"guidance_scale": 5.0, "guidance_rescale": 0.7}):
        ours = run(pipe, num_inference_steps=6, **kw)
        theirs = sd_pipe(components, scheduler)("1girl, red hair", generator=torch.Generator().manual_seed(0),
                                                **{**CALL, "num_inference_steps": 6, "guidance_scale": 7.0, **kw}).images
        assert torch.allclose(ours, theirs, atol=1e-4)


def test_references_change_the_pictures_only_through_retrinet(pipe):
    base = run(pipe)
    perturb(pipe.retrinet)
    other = [Reference(picture((10, 200, 10)), "figure")] * 2
    a, b = run(pipe), run(pipe, refs=other)
    assert (a - base).abs().max() > 1e-3 and (a - b).abs().max() > 1e-3
    assert torch.allclose(run(pipe, retrieval_scale=0.0), base, atol=1e-5)


def test_prompt_batch_with_references_per_prompt(pipe):
    perturb(pipe.retrinet)
    red, blue, green = ([Reference(picture(c), "face")] * 2 for c in ((220, 20, 20), (20, 20, 220), (20, 220, 20)))
    gen = torch.Generator().manual_seed(0)
    a = pipe(["1girl", "1girl"], [red, blue], generator=gen, **CALL).images
    gen = torch.Generator().manual_seed(0)
    b = pipe(["1girl", "1girl"], [red, green], generator=gen, **CALL).images
    assert a.shape[0] == 2
    assert torch.allclose(a[0], b[0], atol=1e-6)  # sample 0 kept its references
    assert (a[1] - b[1]).abs().max() > 1e-3


def ddim(pipe):
    """A scheduler whose steps have distinct timesteps (PNDM repeats one), for counting."""
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return pipe


def test_retrieval_encoder_runs_once_per_step_with_guidance_and_batch_4(pipe):
    ddim(pipe)
    calls = []
    handle = pipe.retrinet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        pipe.retrieval_cache.clear()
        pipe("1girl", REFS, num_images_per_prompt=4, guidance_scale=7.0, **CALL)
        assert calls == [2] * 4  # 4 steps, one call each, on the 2 references only
        calls.clear()
        pipe.retrieval_cache.clear()
        pipe(["a", "b", "c", "d"], [REFS] * 4, guidance_scale=7.0, **CALL)
        assert calls == [8] * 4  # 4 groups of 2 references, one batched call per step
    finally:
        handle.remove()


def test_sweeps_reuse_features_from_a_bounded_cache(pipe):
    ddim(pipe)
    calls = []
    handle = pipe.retrinet.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        pipe.retrieval_cache.clear()
        for g in (1.0, 4.0, 7.0):
            for s in (0.5, 1.0):
                run(pipe, guidance_scale=g, retrieval_scale=s)
        assert len(calls) == 4  # one sweep cell computes, the other five read the cache
        assert pipe.retrieval_cache.hits == 20
        run(pipe, refs=[Reference(picture((1, 2, 3)), "face")])
        assert len(calls) == 8
        one = next(iter(pipe.retrieval_cache._items.values())).nbytes()
        pipe.retrieval_cache.clear()
        pipe.retrieval_cache.max_bytes = 2 * one
        run(pipe)
        assert len(pipe.retrieval_cache) == 2 and pipe.retrieval_cache.nbytes() <= 2 * one
    finally:
        handle.remove()
        pipe.retrieval_cache.max_bytes = 1 << 30


def test_the_feature_cache_counts_a_calls_shared_key_positions_once():
    """The features of one call's timesteps share one dict of key positions, filled by the call's first UNet step
    after its features went into the cache: the cache holds it once, at its present size, and frees it with the
    last entry holding it."""
    from pipelines.retrinet.model import RetrievalFeatures
    from pipelines.retrinet.pipeline import _FeatureCache

    shared: dict = {}

    def features(positions=shared):
        return RetrievalFeatures((torch.zeros(2, 4, 4, 4),), torch.zeros(2, 8, 2, 2), 2, torch.zeros(2, 4), positions)

    own = features().nbytes(key_positions=False)
    assert own == (2 * 4 * 16 + 2 * 8 * 4) * 4
    cache = _FeatureCache(max_bytes=1 << 20)
    cache.put(("call", 1), features())  # the first step: no positions computed yet
    shared["pos"] = torch.zeros(2, 16, 4)  # the first step's UNet computes them, into the shared dict
    positions = shared["pos"].numel() * 4
    cache.put(("call", 2), features())
    cache.put(("call", 3), features())
    assert cache.nbytes() == 3 * own + positions  # not 3 * (own + positions), nor 3 * own
    cache.max_bytes = 2 * own + positions  # room for two entries and their dict: the oldest goes
    cache.put(("call", 4), features())
    assert len(cache) == 2 and set(cache._items) == {("call", 3), ("call", 4)}
    assert cache.nbytes() == 2 * own + positions
    cache.max_bytes = 2 * own + positions + own  # another call's features, with a dict of their own (empty)
    cache.put(("other", 1), features({}))
    assert len(cache) == 3 and cache.nbytes() == 3 * own + positions
    cache.max_bytes = own  # only the newest fits: the first call's dict goes with its last entry
    cache.put(("other", 2), features(cache._items[("other", 1)].key_positions))
    assert list(cache._items) == [("other", 2)] and cache.nbytes() == own
    cache.clear()
    assert cache.nbytes() == 0 and len(cache) == 0


def test_pipeline_round_trips_through_save_pretrained(tmp_path, pipe):
    perturb(pipe.retrinet)
    before = run(pipe)
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "retrinet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = RetriNetPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.retrinet, RetriNetModel)
    assert torch.allclose(run(loaded), before, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"references": []}, "no reference"),
    ({"references": [(picture((1, 1, 1)), "face")] * 9}, "9 references given, between 1 and 8"),
    ({"references": [(picture((1, 1, 1)), "hat")]}, "unknown concept 'hat'"),
    ({"references": ["face"]}, "Reference"),
    ({"references": [(np.zeros((4, 4, 3)), "face")]}, "PIL image"),
    ({"height": 33}, "multiples of 2"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"retrieval_scale": -0.5}, "retrieval_scale"),
    ({"guidance_rescale": 1.5}, "guidance_rescale"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": ["a", "b", "c"], "references": [REFS, REFS]}, "2 lists of references for 3 prompts"),
    ({"prompt": ["a", "b"], "references": [REFS, REFS[:1]]}, "same number of references"),
    ({"prompt": ["a", "b"], "negative_prompt": ["x"]}, "1 negative prompts for 2 prompts"),
    ({"reference_size": 33}, "reference_size"),
])
def test_bad_input_raises_value_error(pipe, kwargs, match):
    args = {"prompt": "1girl", "references": REFS, **CALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**args)


def test_model_cpu_offload_keeps_retrinet_on_the_execution_device(pipe):
    """Offload moves one model at a time to the GPU when its forward runs; RetriNet's layers run inside the
    UNet's forward and cached features skip RetriNet's own, so it must be on the device all along."""
    perturb(pipe.retrinet)
    expected = run(pipe)
    pipe.enable_model_cpu_offload(device="cpu")  # the same hooks as on a GPU; no GPU here
    try:
        assert not hasattr(pipe.retrinet, "_hf_hook")
        assert all(hasattr(getattr(pipe, name), "_hf_hook") for name in ("text_encoder", "unet", "vae"))
        assert torch.equal(run(pipe), expected) and torch.equal(run(pipe), expected)  # features from the cache
    finally:
        pipe.remove_all_hooks()


def test_embed_words_encodes_each_distinct_word_once(components, monkeypatch):
    from pipelines.retrinet import embed_texts, embed_words
    from pipelines.retrinet import pipeline as module

    tok, enc = components["tokenizer"], components["text_encoder"]
    words = ["face", "clothes", "face", "figure", "clothes"]
    calls = []

    def counted(tokenizer, text_encoder, texts, device):
        calls.append(list(texts))
        return embed_texts(tokenizer, text_encoder, texts, device)

    monkeypatch.setattr(module, "embed_texts", counted)
    with torch.no_grad():
        got = embed_words(tok, enc, words, "cpu")
        alone = embed_texts(tok, enc, words, "cpu")  # every word on its own row, repeats encoded again
    assert calls == [["clothes", "face", "figure"]]
    assert got.shape == alone.shape and torch.allclose(got, alone, atol=1e-6)
    with pytest.raises(ValueError, match="no words"):
        embed_words(tok, enc, [], "cpu")
