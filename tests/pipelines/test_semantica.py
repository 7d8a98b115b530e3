"""Semantica: the conditioner, the encoders, the pipeline and its guidance, few-shot scores (seed 004)."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from PIL import Image
from transformers import (
    BertConfig,
    BertModel,
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
)

from pipelines.components import SD15_SCHEDULER, SD15_UNET, SD15_VAE, build_components
from pipelines.semantica import (
    CopyBaseline,
    SemanticaConditioner,
    SemanticaPipeline,
    encode_images,
    few_shot_report,
    few_shot_scores,
    image_features,
    load_image_encoder,
    prepare_unet,
)


def tiny_encoder(width=24, seed=0):
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=8)
    return CLIPVisionModel(config).eval(), CLIPImageProcessor(size={"shortest_edge": 32},
                                                              crop_size={"height": 32, "width": 32})


def make_pipe(conditioning="tokens", width=24, seed=0, scheduler=None):
    c = build_components("tiny", seed=0)
    encoder, processor = tiny_encoder(width)
    unet = prepare_unet(c["unet"], conditioning)
    torch.manual_seed(seed)
    conditioner = SemanticaConditioner.from_models(encoder, unet, conditioning=conditioning)
    with torch.no_grad():  # the unconditional conditioning and the global projection start at zero: move them
        for p in conditioner.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    pipe = SemanticaPipeline(unet=unet, vae=c["vae"], scheduler=scheduler or DDIMScheduler.from_config(c["scheduler"].config), image_encoder=encoder,
                             feature_extractor=processor, conditioner=conditioner)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


@pytest.fixture(scope="module")
def global_pipe():
    return make_pipe("global")


def picture(color=(220, 40, 40), size=(40, 56)):
    img = Image.new("RGB", size, color)
    img.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return img


CALL = {"num_inference_steps": 3, "height": 32, "width": 32, "output_type": "latent"}


def run(p, image=None, seed=0, **kw):
    return p(image if image is not None else picture(), generator=torch.Generator().manual_seed(seed),
             **{**CALL, **kw}).images


class UNetCalls:
    """Batch sizes of the UNet's forward calls within the block."""

    def __init__(self, unet):
        self.unet, self.sizes = unet, []

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(lambda m, args: self.sizes.append(args[0].shape[0]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------- the conditioner

def test_tokens_are_projected_when_the_widths_differ_and_dropped_rows_read_the_null_token():
    torch.manual_seed(0)
    cond = SemanticaConditioner(encoder_dim=24, cross_attention_dim=32)
    assert isinstance(cond.proj, torch.nn.Linear) and cond.uncond_tokens.requires_grad
    tokens, pooled = torch.randn(3, 17, 24), torch.randn(3, 24)
    with torch.no_grad():
        cond.uncond_tokens.normal_()
        ehs, labels = cond(tokens, pooled, torch.tensor([False, True, False]))
    assert ehs.shape == (3, 17, 32) and labels is None
    assert torch.allclose(ehs[0], cond.proj(tokens[0]), atol=1e-6)
    assert torch.equal(ehs[1], cond.uncond_tokens[0].expand(17, 32))
    no_cls = SemanticaConditioner(encoder_dim=24, cross_attention_dim=32, include_cls=False)
    assert no_cls(tokens, pooled)[0].shape == (3, 16, 32)
    same = SemanticaConditioner(encoder_dim=32, cross_attention_dim=32, unconditional="zero")
    assert isinstance(same.proj, torch.nn.Identity) and not list(same.parameters())
    ehs, _ = same(torch.randn(2, 5, 32), torch.randn(2, 32), torch.tensor([True, False]))
    assert torch.equal(ehs[0], torch.zeros(5, 32))
    with pytest.raises(ValueError, match="width 24 given, this conditioner takes 32"):
        same(tokens, pooled)
    with pytest.raises(ValueError, match="unknown conditioning 'film'"):
        SemanticaConditioner(conditioning="film")
    with pytest.raises(ValueError, match="unknown unconditional"):
        SemanticaConditioner(unconditional="noise")


def test_global_token_goes_through_the_time_embedding():
    c = build_components("tiny", seed=0)
    base = c["unet"]
    unet = prepare_unet(build_components("tiny", seed=0)["unet"], "global")
    assert unet.config.class_embed_type == "identity" and isinstance(unet.class_embedding, torch.nn.Identity)
    assert prepare_unet(unet, "global") is unet  # already prepared
    encoder, _ = tiny_encoder()
    cond = SemanticaConditioner.from_models(encoder, unet, conditioning="global")
    assert cond.config.time_embed_dim == 128 and cond.global_proj.out_features == 128
    x, tokens, pooled = torch.randn(2, 4, 16, 16), torch.randn(2, 17, 24), torch.randn(2, 24)
    with torch.no_grad():
        ehs, labels = cond(tokens, pooled)
        assert ehs.shape == (2, 1, 32) and labels.shape == (2, 128)
        # the projection starts at zero: the UNet is the pretrained one
        assert torch.allclose(unet(x, 500, ehs, class_labels=labels).sample, base(x, 500, ehs).sample, atol=1e-6)
        cond.global_proj.weight.normal_()
        ehs, labels = cond(tokens, pooled, torch.tensor([False, True]))
        # seed 004, Sec. 3.4: normalise the CLS token, project it, add it to the time embedding
        assert torch.allclose(labels[0], cond.global_proj(torch.nn.functional.layer_norm(pooled[0], (24,))), atol=1e-5)
        assert torch.equal(labels[1], cond.uncond_global[0])
        emb = {}
        handle = unet.time_embedding.register_forward_hook(lambda m, a, out: emb.update(t=out))
        unet(x, 500, ehs, class_labels=labels)
        handle.remove()
        added = {}
        handle = unet.down_blocks[0].register_forward_pre_hook(lambda m, a, kw: added.update(temb=kw["temb"]),
                                                               with_kwargs=True)
        unet(x, 500, ehs, class_labels=labels)
        handle.remove()
        assert torch.allclose(added["temb"], emb["t"] + labels, atol=1e-5)
    with pytest.raises(ValueError, match="class_embed_type='identity' cannot take 'tokens'"):
        prepare_unet(unet, "tokens")


# ---------------------------------------------------------------------------- encoders

def test_load_image_encoder_picks_the_class_from_the_config(tiny_clip, tmp_path):
    encoder, processor = load_image_encoder(str(tiny_clip))  # a full CLIPModel folder: its vision tower
    assert type(encoder) is CLIPVisionModel and isinstance(processor, CLIPImageProcessor)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    encoder.save_pretrained(tmp_path / "vision")
    processor.save_pretrained(tmp_path / "vision")
    again, _ = load_image_encoder(str(tmp_path / "vision"))  # clip_vision_model
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(encode_images(again, x)[1], encode_images(encoder, x)[1])
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path / "dino")
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(tmp_path / "dino")
    dino, dino_processor = load_image_encoder(str(tmp_path / "dino"))
    assert type(dino) is Dinov2Model and isinstance(dino_processor, BitImageProcessor)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="'bert' model; expected one of dinov2, clip, clip_vision_model"):
        load_image_encoder(str(tmp_path / "bert"))
    with pytest.raises(ValueError, match="cannot load the image encoder"):
        load_image_encoder(str(tmp_path / "nothing"))


def test_tokens_and_global_token_of_both_encoders():
    clip, processor = tiny_encoder(32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, pooled = encode_images(clip, x)
        out = clip(pixel_values=x)
    assert tokens.shape == (2, 17, 32) and pooled.shape == (2, 32)
    assert torch.allclose(tokens[:, 0], pooled, atol=1e-6)  # CLIP's post_layernorm on every token
    assert not torch.allclose(tokens, out.last_hidden_state)
    torch.manual_seed(0)
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                    image_size=28, patch_size=14)).eval()
    with torch.no_grad():
        tokens, pooled = encode_images(dino, torch.randn(2, 3, 28, 28))
    assert tokens.shape == (2, 5, 32) and torch.equal(tokens[:, 0], pooled)  # CLS + 2 x 2 patches
    images = [picture((i * 40, 100, 200 - i * 30)) for i in range(5)]
    feats = image_features(clip, processor, images, batch_size=2)
    assert feats.shape == (5, 32) and feats.dtype == torch.float32
    assert torch.allclose(feats, image_features(clip, processor, images, batch_size=5), atol=1e-5)


# ---------------------------------------------------------------------------- the pipeline

def test_pictures_of_the_requested_size_and_number(pipe):
    out = pipe([picture(), picture((20, 20, 200))], num_images_per_prompt=2, num_inference_steps=2, height=48,
               width=32, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 4 and all(im.size == (32, 48) for im in out.images)
    arr = pipe(picture(), num_inference_steps=2, output_type="np", return_dict=False)[0]
    assert arr.shape == (1, 32, 32, 3) and 0 <= arr.min() and arr.max() <= 1  # default: the UNet's sample size


def test_guidance_zero_is_the_conditional_prediction_alone(pipe):
    with UNetCalls(pipe.unet) as calls:
        a = run(pipe, guidance_scale=0.0, num_images_per_prompt=2)
    assert calls.sizes == [2, 2, 2]  # no unconditional branch
    saved = pipe.conditioner.uncond_tokens.detach().clone()
    try:
        with torch.no_grad():
            pipe.conditioner.uncond_tokens.mul_(-3).add_(1)
        assert torch.equal(run(pipe, guidance_scale=0.0, num_images_per_prompt=2), a)
        with UNetCalls(pipe.unet) as calls:
            b = run(pipe, guidance_scale=0.5, num_images_per_prompt=2)
        assert calls.sizes == [4, 4, 4]
        with torch.no_grad():
            pipe.conditioner.uncond_tokens.copy_(saved)
        assert not torch.allclose(run(pipe, guidance_scale=0.5, num_images_per_prompt=2), b, atol=1e-4)
    finally:
        with torch.no_grad():
            pipe.conditioner.uncond_tokens.copy_(saved)


@pytest.mark.parametrize("w", [0.3, 2.0])
def test_guidance_is_eps_c_plus_w_times_eps_c_minus_eps_u(pipe, w):
    image = picture((30, 160, 90))
    got = run(pipe, image, seed=3, guidance_scale=w, num_inference_steps=1)
    # by hand: the same step with the two predictions computed separately
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3)) * scheduler.init_noise_sigma
    with torch.no_grad():
        pixels = pipe.feature_extractor(images=[image], return_tensors="pt").pixel_values
        tokens, pooled = encode_images(pipe.image_encoder, pixels)
        ehs_c, _ = pipe.conditioner(tokens, pooled)
        ehs_u, _ = pipe.conditioner(tokens, pooled, torch.tensor([True]))
        x = scheduler.scale_model_input(latents, t)
        eps_c = pipe.unet(x, t, encoder_hidden_states=ehs_c).sample
        eps_u = pipe.unet(x, t, encoder_hidden_states=ehs_u).sample
    eps = eps_c + w * (eps_c - eps_u)
    want = scheduler.step(eps, t, latents).prev_sample
    assert torch.allclose(got, want, atol=1e-5)
    assert (eps_c - eps_u).abs().max() > 1e-3  # the two branches differ, so the check has teeth


def test_the_encoder_runs_once_per_call(pipe):
    calls = []
    handle = pipe.image_encoder.register_forward_hook(lambda m, a, out: calls.append(1))
    try:
        run(pipe, guidance_scale=1.0, num_inference_steps=4, num_images_per_prompt=3)
    finally:
        handle.remove()
    assert len(calls) == 1


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler])
def test_any_diffusers_scheduler(pipe, scheduler_cls):
    old = pipe.scheduler
    pipe.scheduler = scheduler_cls.from_config(old.config)
    try:
        out = run(pipe, guidance_scale=0.5)
    finally:
        pipe.scheduler = old
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


def test_same_generator_same_pictures_and_given_latents(pipe):
    a, b = run(pipe, seed=5), run(pipe, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, run(pipe, seed=6))
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(pipe(picture(), latents=latents, **CALL).images, a, atol=1e-6)


def test_callback_on_step_end_can_change_the_latents(pipe):
    seen = []

    def callback(p, i, t, tensors):
        seen.append(i)
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = run(pipe, guidance_scale=0.0, callback_on_step_end=callback)
    assert seen == [0, 1, 2] and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("conditioning", ["tokens", "global"])
def test_pipeline_round_trips_through_save_pretrained(tmp_path, pipe, global_pipe, conditioning):
    p = pipe if conditioning == "tokens" else global_pipe
    before = run(p, guidance_scale=0.7)
    p.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "conditioner" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = SemanticaPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.conditioner, SemanticaConditioner) and type(loaded.image_encoder) is CLIPVisionModel
    assert loaded.conditioner.config.conditioning == conditioning
    assert loaded.unet.config.class_embed_type == (None if conditioning == "tokens" else "identity")
    assert torch.allclose(run(loaded, guidance_scale=0.7), before, atol=1e-6)


def test_global_option_runs_and_reads_the_picture(global_pipe):
    with UNetCalls(global_pipe.unet) as calls:
        a = run(global_pipe, picture((200, 30, 30)), guidance_scale=1.0)
    assert calls.sizes == [2, 2, 2]
    b = run(global_pipe, picture((30, 30, 200)), guidance_scale=1.0)
    assert a.shape == (1, 4, 16, 16) and (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("kwargs, match", [
    ({"image": None}, "PIL image or a non-empty list"),
    ({"image": []}, "PIL image or a non-empty list"),
    ({"image": np.zeros((8, 8, 3))}, "PIL image or a non-empty list"),
    ({"image": [picture(), "cat.png"]}, "must be a PIL image, got str"),
    ({"guidance_scale": -0.5}, "guidance_scale must be a number >= 0"),
    ({"guidance_scale": math.nan}, "guidance_scale must be a number >= 0"),
    ({"guidance_scale": math.inf}, "finite"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ({"height": 33}, "multiples of 2"),
    ({"output_type": "jpeg"}, "unknown output_type"),
    ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, "callback_on_step_end_tensor_inputs"),
])
def test_clear_errors(pipe, kwargs, match):
    call = {"image": picture(), **CALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**call)


# ---------------------------------------------------------------------------- few-shot scores

def test_few_shot_scores_catch_a_copying_model(pipe):
    rng = np.random.default_rng(0)
    groups = {g: [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
              for g in ("a", "b")}

    def mean_colour(ims):
        return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float64).mean((0, 1)) for im in ims]))

    copied = few_shot_scores(CopyBaseline(32), groups, shots=1, extractor=mean_colour)
    assert copied["num_real"] == copied["num_generated"] == 16 and copied["shots"] == 1
    assert all(len(v) == 8 for v in copied["generated"].values())
    # 16 copies of 2 pictures: only the 2 originals are within reach of the copies' collapsed k-NN balls
    assert copied["recall"] == pytest.approx(2 / 16)
    assert copied["precision"] == 1.0
    # given conditioning pictures (K = 2): 4 generated per conditioning picture
    cond = {g: ims[:2] for g, ims in groups.items()}
    two = few_shot_scores(CopyBaseline(32), groups, conditioning=cond, extractor=mean_colour)
    assert two["shots"] == 2 and two["recall"] == pytest.approx(4 / 16)
    assert math.isfinite(two["fid"]) and two["fid"] >= 0
    # the real pipeline with its own encoder's features
    scores = few_shot_scores(pipe, {g: ims[:4] for g, ims in groups.items()}, num_inference_steps=2, height=32,
                             width=32)
    assert scores["num_generated"] == 8 and all(im.size == (32, 32) for im in scores["generated"]["a"])
    assert math.isfinite(scores["fid"]) and 0 <= scores["precision"] <= 1 and 0 <= scores["recall"] <= 1
    with pytest.raises(ValueError, match="fewer than 9 shots"):
        few_shot_scores(CopyBaseline(32), groups, shots=9, extractor=mean_colour)
    with pytest.raises(ValueError, match="no conditioning pictures for group 'b'"):
        few_shot_scores(CopyBaseline(32), groups, conditioning={"a": groups["a"][:1]}, extractor=mean_colour)


def test_few_shot_report_on_the_test_characters(pipe, toybooru, toybooru_records, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    report = few_shot_report(tmp_path / "pipe", toybooru, split="test", groups=2, pictures_per_group=5,
                             num_inference_steps=2)
    json.dumps(report)  # JSON-ready
    test_characters = {r["character"] for r in toybooru_records if r["split"] == "test"}
    assert report["groups"] == 2 <= len(test_characters) and report["num_real"] == 10 and report["shots"] == 1
    for name in ("semantica", "copy"):
        assert set(report[name]) == {"fid", "precision", "recall"} and math.isfinite(report[name]["fid"])
    # 10 copies of 2 pictures: the copying model reaches only its 2 conditioning pictures
    assert report["copy"]["recall"] == pytest.approx(2 / 10)
    with pytest.raises(ValueError, match="no grouped pictures in split 'val'"):
        few_shot_report(pipe, toybooru, split="val")


# ---------------------------------------------------------------------------- SD 1.5 size

@pytest.mark.slow
def test_sd15_size_with_dinov2_base_builds_and_runs_a_step(tmp_path):
    """SD 1.5's UNet and VAE and DINOv2-base (width 768 = SD 1.5's cross-attention: no projection), the
    encoder saved and loaded as a Hub folder of facebook/dinov2-base would be (random weights)."""
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config()).save_pretrained(tmp_path / "dinov2-base")
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(
        tmp_path / "dinov2-base")
    encoder, processor = load_image_encoder(str(tmp_path / "dinov2-base"))
    assert type(encoder) is Dinov2Model and isinstance(processor, BitImageProcessor)
    assert (encoder.config.hidden_size, encoder.config.patch_size, encoder.config.num_hidden_layers) == (768, 14, 12)
    unet = prepare_unet(UNet2DConditionModel(**SD15_UNET), "tokens")
    vae = AutoencoderKL(**SD15_VAE)
    conditioner = SemanticaConditioner.from_models(encoder, unet)
    assert isinstance(conditioner.proj, torch.nn.Identity) and conditioner.config.cross_attention_dim == 768
    scheduler = DDIMScheduler(**{k: v for k, v in SD15_SCHEDULER.items() if k != "skip_prk_steps"})
    pipe = SemanticaPipeline(unet=unet, vae=vae, scheduler=scheduler, image_encoder=encoder,
                             feature_extractor=processor, conditioner=conditioner)
    pipe.set_progress_bar_config(disable=True)
    tokens = {}
    handle = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.register_forward_pre_hook(
        lambda m, a, kw: tokens.update(ehs=kw["encoder_hidden_states"]), with_kwargs=True)
    try:
        with UNetCalls(unet) as calls:
            out = pipe(picture(size=(90, 120)), num_inference_steps=1, guidance_scale=0.5, height=64, width=64,
                       output_type="np", generator=torch.Generator().manual_seed(0)).images
    finally:
        handle.remove()
    assert calls.sizes == [2] and out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    assert tokens["ehs"].shape == (2, 1 + 16 * 16, 768)  # CLS + the 16 x 16 patches of a 224 px crop
