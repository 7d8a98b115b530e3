"""The demo family's training scripts, its build command and its judge, on tiny sizes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer, CLIPTokenizerFast

from pipelines.components import TINY_UNET, TINY_VAE, write_word_tokenizer
from pipelines.metrics.attributes import AttributeClassifier
from training.core import read_metrics
from training.data.images import TaggedImages, caption_words, collate_images

TINY_CLIP = {"text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 4, "max_position_embeddings": 77},
             "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 4, "patch_size": 8},
             "projection_dim": 16}


def shared(out, steps=2, batch=4):
    return ["--output-dir", str(out), "--max-train-steps", str(steps), "--train-batch-size", str(batch),
            "--checkpointing-steps", "1", "--logging-steps", "1", "--resolution", "32"]


# ---------------------------------------------------------------------- tokenizer and data

def test_word_tokenizer_makes_every_tag_word_one_token(tmp_path, toybooru):
    words = caption_words(toybooru)
    folder = write_word_tokenizer(tmp_path / "tok", words)
    slow, fast = CLIPTokenizer.from_pretrained(folder), CLIPTokenizerFast.from_pretrained(folder)
    pieces = {p for w in words for p in slow.tokenize(w)}
    for w in words:
        for piece in slow.tokenize(w):
            assert piece.endswith("</w>"), (w, slow.tokenize(w))  # whole words only, no fragments
    assert len(slow.tokenize("blue hair, polka dot shirt")) == 6
    assert "blue</w>" in pieces and "hair</w>" in pieces
    # text outside the vocabulary still tokenizes, and the fast tokenizer agrees
    odd = "an unseen wordé, 12 SHIRTS!"
    assert slow(odd).input_ids == fast(odd).input_ids
    assert slow.decode(slow(odd).input_ids, skip_special_tokens=True).replace(" ", "") == odd.lower().replace(" ", "")
    with pytest.raises(ValueError, match="no words"):
        write_word_tokenizer(tmp_path / "empty", [])


def test_tagged_images_are_deterministic_per_epoch(toybooru):
    ds = TaggedImages(toybooru, "train", resolution=32, tag_dropout=0.5, seed=1)
    a, b = ds[3], ds[3]
    assert a["pixel_values"].shape == (3, 32, 32) and a["pixel_values"].min() >= -1 and a["pixel_values"].max() <= 1
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
    captions = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        captions.add(ds[3]["caption"])
    assert len(captions) > 1  # tag dropout changes with the epoch
    full = TaggedImages(toybooru, "train", resolution=32)[3]["caption"]
    assert all(set(c.split(", ")) <= set(full.split(", ")) for c in captions if c)
    batch = collate_images([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["index"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="no readable picture"):
        TaggedImages(toybooru, "nonexistent-split")
    with pytest.raises(ValueError, match="tag_dropout"):
        TaggedImages(toybooru, tag_dropout=1.0)


# ---------------------------------------------------------------------- the scripts, chained as the build chains them

@pytest.fixture(scope="module")
def family(tmp_path_factory, toybooru):
    from training import train_clip, train_text_to_image, train_vae

    root = tmp_path_factory.mktemp("family")
    (root / "vae.json").write_text(json.dumps(TINY_VAE))
    (root / "clip.json").write_text(json.dumps(TINY_CLIP))
    (root / "unet.json").write_text(json.dumps(dict(TINY_UNET, cross_attention_dim=32)))
    # 8 latent channels (the tiny config's 4 overridden): every model chained on it, and the shipped folder and report
    # below, must take the latent's channels from the VAE
    vae = train_vae.main(train_vae.parse_args(["--data", str(toybooru), "--vae-config", str(root / "vae.json"),
                                               "--latent-channels", "8", "--face-loss-weight", "1",
                                               *shared(root / "vae")]))
    clip = train_clip.main(train_clip.parse_args(["--data", str(toybooru), "--clip-config", str(root / "clip.json"),
                                                  *shared(root / "clip")]))
    base = train_text_to_image.main(train_text_to_image.parse_args(
        ["--vae", str(root / "vae" / "vae"), "--text-encoder", str(root / "clip" / "clip"), "--data", str(toybooru),
         "--unet-config", str(root / "unet.json"), *shared(root / "base")]))
    return {"root": root, "vae": vae, "clip": clip, "base": base}


def test_vae_script_sets_the_latent_scale(family):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(family["root"] / "vae" / "vae")
    assert family["vae"]["global_step"] == 2
    assert vae.config.latent_channels == 8 and vae.config.block_out_channels == list(TINY_VAE["block_out_channels"])
    assert vae.config.scaling_factor == pytest.approx(family["vae"]["scaling_factor"]) and vae.config.scaling_factor > 0
    assert [r["step"] for r in read_metrics(family["root"] / "vae" / "metrics.jsonl")] == [1, 2]


def test_clip_pads_captions_to_the_longest_at_the_loss_and_gradients_of_77(family, toybooru):
    from transformers import CLIPModel, CLIPTokenizer

    from training.data.images import TaggedImages, collate_images
    from training.train_clip import ContrastiveLoss, image_processor, tokenize_captions

    folder = family["root"] / "clip" / "clip"
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    batch = collate_images([TaggedImages(toybooru, "train", 32, tag_dropout=0.5, seed=0)[i] for i in range(6)])
    short = tokenize_captions(tokenizer, batch["caption"])
    lengths = short.attention_mask.sum(1)
    assert short.input_ids.shape[1] == int(lengths.max()) < tokenizer.model_max_length
    assert int(lengths.min()) < int(lengths.max())  # the shorter captions are padded
    full = tokenizer(batch["caption"], padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt")
    model = ContrastiveLoss(CLIPModel.from_pretrained(folder), image_processor(32)).train()
    results = []
    for tok in (short, full):
        model.zero_grad()
        loss = model(batch["pixel_values"], tok.input_ids, tok.attention_mask)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_short, grads_short), (loss_full, grads_full) = results
    assert loss_short == pytest.approx(loss_full, rel=1e-5) and len(grads_short) == len(grads_full)
    # equal up to float rounding (the token and position embeddings' gradients, of size 3, differ by 5e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(grads_short, grads_full))
    with pytest.raises(ValueError, match="non-empty list"):
        tokenize_captions(tokenizer, [])
    with pytest.raises(ValueError, match="non-empty list"):
        tokenize_captions(tokenizer, "1girl, solo")


def test_vae_latent_channels_bad_input(tmp_path, capsys):
    from training.train_vae import build_vae, parse_args

    args = ["--data", "D", "--output-dir", str(tmp_path)]
    assert build_vae(parse_args([*args, "--latent-channels", "16"])).config.latent_channels == 16
    for bad, says in ((["--latent-channels", "0"], "at least 1"),
                      (["--latent-channels", "8", "--pretrained-vae", "V"], "pretrained one keeps its latent")):
        with pytest.raises(SystemExit):
            parse_args([*args, *bad])
        assert says in capsys.readouterr().err


def test_face_masks_follow_the_picture_and_weigh_in_the_vae_loss(toybooru):
    from diffusers import AutoencoderKL

    from training.data.images import TaggedImages, collate_images, face_mask
    from training.train_vae import VAELoss, parse_args

    rec = {"face_bbox": [10, 20, 30, 40], "width": 100, "height": 50}
    m = face_mask(rec, 10)  # x scaled by 0.1, y by 0.2, rounded outwards
    assert m.shape == (1, 10, 10) and m.sum() == 2 * 4 and m[0, 4:8, 1:3].all()
    assert face_mask({"width": 10, "height": 10}, 10).sum() == 0
    ds = TaggedImages(toybooru, "train", 32, flip=True, seed=0)
    items = [ds[i] for i in range(8)]
    flipped = {it["index"] for it in items
               if not torch.equal(it["pixel_values"], ds.pixels[it["index"]].float().div(127.5).sub(1))}
    assert flipped and len(flipped) < len(items)  # some were mirrored: their masks too
    for it in items:
        plain = face_mask(ds.records[it["index"]], 32)
        expected = plain.flip(-1) if it["index"] in flipped else plain
        assert torch.equal(it["face_mask"], expected) and it["face_mask"].sum() > 0
    assert any(not torch.equal(face_mask(ds.records[i], 32), face_mask(ds.records[i], 32).flip(-1)) for i in flipped)
    batch = collate_images(items)
    assert batch["face_mask"].shape == (8, 1, 32, 32)
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    losses = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(1)  # the same posterior sample
        losses[weight] = VAELoss(vae, 1e-6, 1.0, weight)(batch["pixel_values"], batch["face_mask"]).item()
    torch.manual_seed(1)
    assert VAELoss(vae, 1e-6, 1.0, 1.0)(batch["pixel_values"], torch.zeros_like(batch["face_mask"])).item() == \
        pytest.approx(losses[0.0])
    assert losses[1.0] > losses[0.0]
    with pytest.raises(SystemExit):
        parse_args(["--data", "d", "--output-dir", "o", "--face-loss-weight", "-1"])


def test_attribute_words_are_the_first_words_of_three_two_word_tags():
    from training.train_clip import attribute_words

    words = ["red hair", "red dress", "red skirt", "blue dress", "blue skirt", "blue eyes", "plaid dress",
             "plaid skirt", "plaid kimono", "long hair", "arms up", "arms at sides", "1girl", "polka dot dress"]
    assert attribute_words(words) == {"red", "blue", "plaid"}
    assert attribute_words(words, min_nouns=4) == frozenset()


def test_swap_attributes_binds_each_word_to_the_other_tag_and_never_returns_the_caption():
    import random

    from training.train_clip import hard_negatives, swap_attributes

    attrs = frozenset({"red", "blue", "green", "plaid"})
    caption = "1girl, red hair, green kimono, blue sash, kimono, standing"
    every = {"1girl, green hair, red kimono, blue sash, kimono, standing",
             "1girl, blue hair, green kimono, red sash, kimono, standing",
             "1girl, red hair, blue kimono, green sash, kimono, standing"}
    assert {swap_attributes(caption, attrs, random.Random(s))[0] for s in range(40)} == every
    # more than one: distinct swaps, as many as there are
    two = swap_attributes(caption, attrs, random.Random(0), count=2)
    assert len(two) == len(set(two)) == 2 and set(two) < every
    assert set(swap_attributes(caption, attrs, random.Random(0), count=5)) == every
    # the same word on both tags, or the same noun, swap into the same caption: no negative
    assert swap_attributes("1girl, red hair, red dress", attrs, random.Random(0)) == []
    assert swap_attributes("red dress, plaid dress", attrs, random.Random(0)) == []
    assert swap_attributes("1girl, standing", attrs, random.Random(0)) == []
    # a swap that names only tags the caption has is no negative
    assert swap_attributes("red dress, blue skirt, blue dress, red skirt", attrs, random.Random(0), count=3) == []
    captions = ["red hair, blue dress", "1girl", "red hair, blue dress, green eyes"]
    negatives, valid = hard_negatives(captions, attrs, seed=3)
    assert negatives[:2] == ["blue hair, red dress", "1girl"] and valid == [[True, False, True]]
    assert negatives[2] in {"blue hair, red dress, green eyes", "green hair, blue dress, red eyes",
                            "red hair, green dress, blue eyes"}
    # two each: block k holds every caption's k-th negative, the caption itself where it has no k-th
    negatives, valid = hard_negatives(captions, attrs, seed=3, count=2)
    assert len(negatives) == 6 and valid == [[True, False, True], [False, False, True]]
    assert negatives[3:5] == ["red hair, blue dress", "1girl"] and negatives[5] != negatives[2]
    assert hard_negatives(captions, attrs, seed=3, count=2) == (negatives, valid)  # drawn alike on resume


def test_pattern_negatives_replace_the_pattern_word_and_come_first():
    import random

    from training.train_clip import hard_negatives, parse_args, replace_patterns

    patterns = ("striped", "plaid", "polka dot")
    caption = "1girl, red kimono, striped kimono, blue sash"
    every = {"1girl, red kimono, plaid kimono, blue sash", "1girl, red kimono, polka dot kimono, blue sash"}
    assert {replace_patterns(caption, patterns, random.Random(s))[0] for s in range(40)} == every
    assert set(replace_patterns(caption, patterns, random.Random(0), count=5)) == every
    assert set(replace_patterns("1girl, polka dot dress", patterns, random.Random(0), count=5)) == {
        "1girl, striped dress", "1girl, plaid dress"}  # a pattern of two words
    # no pattern named, or every replacement already a tag of the caption: none
    assert replace_patterns("1girl, red kimono", patterns, random.Random(0)) == []
    assert replace_patterns("striped dress, plaid dress, polka dot dress", patterns, random.Random(0)) == []
    assert replace_patterns(caption, (), random.Random(0)) == []
    # in hard_negatives: the replacements first, then the swaps; without patterns the draws of before
    attrs = frozenset({"red", "blue", "striped", "plaid"})
    negatives, valid = hard_negatives([caption, "red hair, blue dress"], attrs, seed=3, count=3, patterns=patterns)
    assert valid == [[True, True], [True, False], [True, False]]
    assert {negatives[0], negatives[2]} == every  # blocks 1 and 2 hold the first caption's two replacements
    assert negatives[4] not in every and negatives[4] != caption  # then a swap
    assert negatives[1] == "blue hair, red dress"  # no pattern: the swap, as without --pattern-words
    assert hard_negatives([caption], attrs, seed=3, count=2) == hard_negatives([caption], attrs, seed=3, count=2,
                                                                                patterns=())
    args = parse_args(["--data", "d", "--output-dir", "o", "--hard-negatives", "4", "--pattern-words",
                       "striped, plaid,polka_dot"])
    assert args.patterns == patterns
    for bad in (["--pattern-words", "striped,plaid"], ["--hard-negatives", "2", "--pattern-words", "striped"]):
        with pytest.raises(SystemExit):
            parse_args(["--data", "d", "--output-dir", "o", *bad])


def test_hard_negatives_loss_is_clips_without_them_and_larger_with_them(family, toybooru):
    from transformers import CLIPModel, CLIPTokenizer

    from training.train_clip import ContrastiveLoss, image_processor, tokenize_captions

    folder = family["root"] / "clip" / "clip"
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    batch = collate_images([TaggedImages(toybooru, "train", 32, tag_dropout=0.0, seed=0)[i] for i in range(4)])
    captions = batch["caption"]
    model = ContrastiveLoss(CLIPModel.from_pretrained(folder), image_processor(32)).eval()
    plain = tokenize_captions(tokenizer, captions)
    both = tokenize_captions(tokenizer, captions + [c + ", 1girl" for c in captions])
    with torch.no_grad():
        clip_loss = model(batch["pixel_values"], plain.input_ids, plain.attention_mask).item()
        masked = model(batch["pixel_values"], both.input_ids, both.attention_mask, torch.zeros(4, dtype=torch.bool))
        used = model(batch["pixel_values"], both.input_ids, both.attention_mask, torch.ones(4, dtype=torch.bool))
        three = tokenize_captions(tokenizer, captions + [c + ", 1girl" for c in captions]
                                  + [c + ", solo" for c in captions])
        one_of_two = model(batch["pixel_values"], three.input_ids, three.attention_mask,
                           torch.tensor([[True] * 4, [False] * 4]))
        two = model(batch["pixel_values"], three.input_ids, three.attention_mask, torch.ones(2, 4, dtype=torch.bool))
    assert masked.item() == pytest.approx(clip_loss, rel=1e-5)
    assert used.item() > clip_loss + 1e-3  # every picture has one more wrong caption to rank below its own
    assert one_of_two.item() == pytest.approx(used.item(), rel=1e-5) and two.item() > used.item() + 1e-3
    with pytest.raises(ValueError, match=r"\(1 \+ K\) x 4 captions"):
        model(batch["pixel_values"], plain.input_ids, plain.attention_mask, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="flags of shape"):
        model(batch["pixel_values"], three.input_ids, three.attention_mask, torch.ones(2, 3, dtype=torch.bool))


def test_clip_script_trains_with_hard_negatives_and_keeps_them_on_resume(toybooru, tmp_path):
    from training import train_clip

    (tmp_path / "clip.json").write_text(json.dumps(TINY_CLIP))
    args = ["--data", str(toybooru), "--clip-config", str(tmp_path / "clip.json"), *shared(tmp_path / "run")]
    assert train_clip.parse_args([*args, "--hard-negatives"]).hard_negatives == 1
    assert train_clip.parse_args(args).hard_negatives == 0
    with pytest.raises(SystemExit):
        train_clip.parse_args([*args, "--hard-negatives", "-1"])
    result = train_clip.main(train_clip.parse_args([*args, "--hard-negatives", "2"]))
    assert result["global_step"] == 2 and (tmp_path / "run" / "clip" / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    # the objective is part of what a run resumes: a checkpoint of the plain loss does not go on with hard negatives
    plain = ["--data", str(toybooru), "--clip-config", str(tmp_path / "clip.json"), *shared(tmp_path / "plain", 1)]
    assert train_clip.main(train_clip.parse_args(plain))["global_step"] == 1
    with pytest.raises(ValueError, match="hard_negatives: checkpoint None, now 1"):
        train_clip.main(train_clip.parse_args([*plain, "--max-train-steps", "2", "--resume-from-checkpoint", "latest",
                                               "--hard-negatives"]))


def test_clip_script_saves_model_processor_and_word_tokenizer(family, toybooru):
    from transformers import CLIPModel, CLIPProcessor

    folder = family["root"] / "clip" / "clip"
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    assert model.config.vision_config.image_size == 32
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert processor.tokenizer.tokenize("blue hair") == ["blue</w>", "hair</w>"]
    assert model.config.text_config.eos_token_id == processor.tokenizer.eos_token_id


def test_text_to_image_script_writes_a_stable_diffusion_folder(family):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(family["root"] / "base" / "pipeline")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.unet.config.sample_size == 16  # 32 px through a 2x VAE
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == pipe.vae.config.latent_channels == 8
    pipe.set_progress_bar_config(disable=True)
    out = pipe("1girl, blue hair", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and (0 <= out).all() and (out <= 1).all()


def test_text_to_image_loss_weightings(family):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from training.train_text_to_image import diffusion_loss, parse_args

    pipe = StableDiffusionPipeline.from_pretrained(family["root"] / "base" / "pipeline")
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn(4, pipe.unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(1))

    def loss(*args):
        torch.manual_seed(0)  # the same noise and timesteps
        with torch.no_grad():
            return diffusion_loss(pipe.unet, sched, latents, ehs, *args).item()

    assert loss(0.0, "min-snr") == loss(5.0, "uniform")  # --snr-gamma 0 keeps meaning the plain MSE
    assert len({loss(0.0, "uniform"), loss(5.0, "min-snr"), loss(5.0, "p2")}) == 3
    args = parse_args(["--pretrained", "x", "--data", "d", "--output-dir", "o", "--timestep-weighting", "p2"])
    assert args.timestep_weighting == "p2"


def test_text_to_image_zero_terminal_snr_trains_and_samples_from_pure_noise(family, toybooru, tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from training import train_text_to_image

    root = family["root"]
    common = ["--vae", str(root / "vae" / "vae"), "--text-encoder", str(root / "clip" / "clip"), "--data",
              str(toybooru), "--unet-config", str(root / "unet.json")]
    with pytest.raises(SystemExit):  # at SNR 0 a noise prediction says nothing about the picture
        train_text_to_image.parse_args([*common, "--zero-terminal-snr", *shared(tmp_path / "x")])
    result = train_text_to_image.main(train_text_to_image.parse_args(
        [*common, "--prediction-type", "v_prediction", "--zero-terminal-snr", "--timestep-weighting", "uniform",
         *shared(tmp_path / "zsnr")]))
    assert result["global_step"] == 2 and all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "zsnr" /
                                                                                           "metrics.jsonl"))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "zsnr" / "pipeline")
    config = pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == \
        ("v_prediction", True, "trailing")
    assert DDPMScheduler.from_config(config).alphas_cumprod[-1] == pytest.approx(0.0, abs=1e-12)
    pipe.scheduler.set_timesteps(4)
    assert int(pipe.scheduler.timesteps[0]) == 999  # sampling starts where the picture is gone
    pipe.set_progress_bar_config(disable=True)
    out = pipe("1girl, blue hair", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_text_to_image_needs_its_components(toybooru, tmp_path):
    from training import train_text_to_image

    with pytest.raises(SystemExit):
        train_text_to_image.parse_args(["--data", str(toybooru), "--output-dir", str(tmp_path), "--vae", "x"])
    args = train_text_to_image.parse_args(["--data", str(toybooru), "--output-dir", str(tmp_path), "--vae",
                                           str(tmp_path / "missing"), "--text-encoder", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="cannot load the components"):
        train_text_to_image.main(args)


def test_text_to_image_script_caches_latents(family, toybooru, tmp_path):
    from training import train_text_to_image

    root, losses = family["root"], {}
    for name, extra in (("plain", []), ("cached", ["--cache-latents"])):
        train_text_to_image.main(train_text_to_image.parse_args(
            ["--vae", str(root / "vae" / "vae"), "--text-encoder", str(root / "clip" / "clip"), "--data", str(toybooru),
             "--unet-config", str(root / "unet.json"), *extra, *shared(tmp_path / name, steps=3)]))
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]
    assert len(losses["plain"]) == 3
    assert losses["cached"] == pytest.approx(losses["plain"], rel=1e-4)


def test_use_ema_ends_on_diffusers_average_of_the_checkpoints_and_resumes_it(family, toybooru, tmp_path):
    import shutil

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from training import train_text_to_image

    root = family["root"]
    common = ["--vae", str(root / "vae" / "vae"), "--text-encoder", str(root / "clip" / "clip"), "--data",
              str(toybooru), "--unet-config", str(root / "unet.json"), "--checkpoints-total-limit", "10",
              "--learning-rate", "1e-2"]
    ema = [*common, "--use-ema", "--ema-decay", "0.5"]

    def run(name, argv):
        return train_text_to_image.main(train_text_to_image.parse_args(
            [*argv, *shared(tmp_path / name, steps=4), "--resume-from-checkpoint", "latest"]))

    def unet(name):
        return UNet2DConditionModel.from_pretrained(tmp_path / name / "pipeline" / "unet").state_dict()

    run("raw", common)
    run("ema", ema)
    # the average changes nothing of the training: the same losses, the same raw weights in every checkpoint
    assert [r["loss"] for r in read_metrics(tmp_path / "ema" / "metrics.jsonl")] == \
        [r["loss"] for r in read_metrics(tmp_path / "raw" / "metrics.jsonl")]
    raw = [load_file(tmp_path / "ema" / f"checkpoint-{k}" / "model.safetensors") for k in range(1, 5)]
    for name, t in load_file(tmp_path / "raw" / "checkpoint-4" / "model.safetensors").items():
        assert torch.equal(raw[-1][name], t), name
    # what ships is diffusers' EMA of the raw weights: decay 0 at the first step, then min(0.5, (1 + s) / (10 + s))
    expected = dict(raw[0])
    for k, weights in enumerate(raw[1:], start=1):
        d = min(0.5, (1 + k) / (10 + k))
        expected = {n: d * expected[n] + (1 - d) * w for n, w in weights.items()}
    shipped, plain = unet("ema"), unet("raw")
    assert set(shipped) == set(expected)
    for name, t in shipped.items():
        torch.testing.assert_close(t, expected[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(shipped[n], plain[n]) for n in shipped)  # not the raw weights
    # a run killed after its second checkpoint resumes the average with its weights: the same result
    shutil.copytree(tmp_path / "ema", tmp_path / "resumed", ignore=shutil.ignore_patterns("checkpoint-3",
                                                                                          "checkpoint-4", "pipeline"))
    assert run("resumed", ema)["global_step"] == 4
    for name, t in unet("resumed").items():
        assert torch.equal(t, shipped[name]), name
    # a checkpoint trained without the average cannot resume with it, and the decay must be a decay
    shutil.copytree(tmp_path / "raw", tmp_path / "mixed", ignore=shutil.ignore_patterns("checkpoint-3",
                                                                                        "checkpoint-4", "pipeline"))
    with pytest.raises(ValueError, match="ema_decay"):
        run("mixed", ema)
    # nor one trained with it without it (the average would be dropped silently)
    shutil.copytree(tmp_path / "ema", tmp_path / "dropped", ignore=shutil.ignore_patterns("checkpoint-3",
                                                                                          "checkpoint-4", "pipeline"))
    with pytest.raises(ValueError, match="ema_decay: checkpoint 0.5, now None"):
        run("dropped", common)
    with pytest.raises(SystemExit):
        train_text_to_image.parse_args([*common, "--use-ema", "--ema-decay", "1", *shared(tmp_path / "bad")])


def test_vae_decoder_only_keeps_the_encoder_and_its_scale(family, toybooru, tmp_path):
    from diffusers import AutoencoderKL

    from training import train_vae

    first = family["root"] / "vae" / "vae"
    result = train_vae.main(train_vae.parse_args(["--data", str(toybooru), "--pretrained-vae", str(first),
                                                  "--decoder-only", "--learning-rate", "1e-2",
                                                  *shared(tmp_path / "dec")]))
    before, after = AutoencoderKL.from_pretrained(first), AutoencoderKL.from_pretrained(tmp_path / "dec" / "vae")
    assert result["scaling_factor"] == before.config.scaling_factor == after.config.scaling_factor
    for (name, a), (_, b) in zip(before.named_parameters(), after.named_parameters()):
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(a, b), name
    changed = [n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters())
               if n.startswith("decoder.") and not torch.equal(a, b)]
    assert changed
    with pytest.raises(SystemExit):
        train_vae.parse_args(["--data", str(toybooru), "--decoder-only", *shared(tmp_path / "bad")])


def test_vae_new_decoder_is_an_asymmetric_vae_on_the_frozen_encoder(family, toybooru, tmp_path):
    from diffusers import AsymmetricAutoencoderKL, AutoencoderKL, StableDiffusionPipeline

    from pipelines.components import load_vae
    from training import train_vae

    first = family["root"] / "vae" / "vae"
    args = ["--data", str(toybooru), "--pretrained-vae", str(first), "--decoder-only", "--decoder-channels", "24,48",
            "--decoder-layers-per-block", "2", "--learning-rate", "1e-2"]
    train_vae.main(train_vae.parse_args([*args, *shared(tmp_path / "dec")]))
    # resumable: the same new decoder is rebuilt and its checkpoint loads into it
    result = train_vae.main(train_vae.parse_args([*args, *shared(tmp_path / "dec", steps=3),
                                                  "--resume-from-checkpoint", "latest"]))
    assert result["global_step"] == 3
    before, after = AutoencoderKL.from_pretrained(first), load_vae(tmp_path / "dec" / "vae")
    assert isinstance(after, AsymmetricAutoencoderKL)
    assert after.config.up_block_out_channels == [24, 48] and after.config.layers_per_up_block == 2
    assert after.config.scaling_factor == before.config.scaling_factor == result["scaling_factor"]
    for part in ("encoder", "quant_conv"):
        for (name, a), (_, b) in zip(getattr(before, part).named_parameters(), getattr(after, part).named_parameters()):
            assert torch.equal(a, b), (part, name)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = after.encode(pixels).latent_dist.mode()
        assert torch.equal(latents, before.encode(pixels).latent_dist.mode())  # the diffusion models' latents
        assert after.decode(latents).sample.shape == (2, 3, 32, 32)
    train_vae.VAELoss(after, 0.0, decoder_only=True)  # what trains: the decoder but its unused inpainting branch
    frozen = ("encoder.", "quant_conv.", "decoder.condition_encoder.")
    assert all(p.requires_grad != n.startswith(frozen) for n, p in after.named_parameters())
    # a pipeline samples with it in the base's VAE's place
    pipe = StableDiffusionPipeline.from_pretrained(family["root"] / "base" / "pipeline", safety_checker=None,
                                                   vae=after)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("blue hair", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    # the training scripts read a pipeline folder holding it as they read one with a plain AutoencoderKL
    pipe.save_pretrained(tmp_path / "asym-sd")
    from training import train_retrinet, train_semantica, train_text_to_image

    sd = str(tmp_path / "asym-sd")
    loaded = [train_retrinet.load_base(sd)[0], train_semantica.load_base(sd, "tokens")[0],
              train_text_to_image.load_components(train_text_to_image.parse_args(
                  ["--pretrained", sd, "--data", str(toybooru), "--output-dir", str(tmp_path / "t2i")]))[0]]
    for vae in loaded:
        assert isinstance(vae, AsymmetricAutoencoderKL)
        assert torch.equal(vae.decoder.conv_out.weight, after.decoder.conv_out.weight)


def test_vae_new_decoder_bad_input():
    from diffusers import AutoencoderKL

    from pipelines.components import load_vae
    from training.train_vae import parse_args, with_new_decoder

    base = ["--data", "d", "--output-dir", "o", "--pretrained-vae", "v"]
    for bad in (["--decoder-channels", "24,48"],  # without --decoder-only
                ["--decoder-only", "--decoder-channels", "24,x"], ["--decoder-only", "--decoder-channels", "24,0"],
                ["--decoder-only", "--decoder-layers-per-block", "2"]):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])
    assert parse_args([*base, "--decoder-only", "--decoder-channels", "24,48"]).decoder_channels == (24, 48)
    vae = AutoencoderKL(**TINY_VAE)
    with pytest.raises(ValueError, match="one per encoder block"):
        with_new_decoder(vae, (24, 48, 96))
    with pytest.raises(ValueError, match="multiple of the VAE's norm_num_groups 8"):
        with_new_decoder(vae, (24, 44))
    with pytest.raises(ValueError, match="not an AutoencoderKL"):
        load_vae(Path(__file__).parents[2] / "assets" / "demo-zoo" / "retrinet", subfolder="unet")


def test_vae_decode_mode_decodes_the_posterior_mean():
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    from training.train_vae import VAELoss, parse_args

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=4, latent_channels=4).eval()
    vae.encoder.conv_out.bias.data[4:] = 2.0  # a wide posterior (log-variance 2), so that a draw differs from the mean
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mode = VAELoss(vae, 0.0, decode_mode=True)
        sampled = VAELoss(vae, 0.0)
        recon = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        exact = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels)
        assert mode(pixels) == mode(pixels) and torch.allclose(mode(pixels), exact)
        assert not torch.allclose(sampled(pixels), exact)
    assert parse_args(["--data", "d", "--output-dir", "o", "--decode-mode"]).decode_mode
    assert not parse_args(["--data", "d", "--output-dir", "o"]).decode_mode


def test_judge_learns_and_reports_accuracy(toybooru, tmp_path):
    from training import train_judge

    result = train_judge.main(train_judge.parse_args(["--data", str(toybooru), "--width", "8", "--degrade", "0.5",
                                                      *shared(tmp_path, steps=3, batch=8)]))
    acc = json.loads((tmp_path / "accuracy.json").read_text())
    assert acc["split"] == "test" and set(acc["accuracy"]) == set(acc["accuracy_soft"]) == set(train_judge.ATTRIBUTES)
    assert all(0 <= v <= 1 for v in acc["accuracy"].values()) and acc["accuracy"] == result["accuracy"]
    assert acc["accuracy_soft"] == result["accuracy_soft"]
    # soft pictures: the chosen share changed (blurred, within range), the others untouched
    torch.manual_seed(0)
    x = torch.rand(64, 3, 32, 32) * 2 - 1
    y = train_judge.degrade(x, 0.5)
    changed = [not torch.equal(a, b) for a, b in zip(x, y)]
    assert 10 < sum(changed) < 54 and y.min() >= -1 and y.max() <= 1
    assert torch.equal(train_judge.degrade(x, 0.0), x) and all(not torch.equal(a, b) for a, b in
                                                              zip(x, train_judge.degrade(x, 1.0)))
    with pytest.raises(SystemExit):
        train_judge.parse_args(["--data", str(toybooru), "--output-dir", str(tmp_path), "--degrade", "1.5"])
    judge = AttributeClassifier.from_pretrained(tmp_path / "judge")
    from PIL import Image

    pred = judge.predict([Image.new("RGB", (50, 70), "red")])
    assert set(pred[0]) == set(train_judge.ATTRIBUTES)
    assert all(pred[0][k] in judge.config.attributes[k] for k in pred[0])


def test_attribute_classifier_rejects_one_class():
    with pytest.raises(ValueError, match="two classes"):
        AttributeClassifier({"hair_color": ["red"]})


# ---------------------------------------------------------------------- the build command

def test_every_stage_command_parses(tmp_path):
    import importlib

    from training.demo_zoo import plan

    for stage in plan(tmp_path / "work", tmp_path / "out").values():
        module = importlib.import_module(stage.module)
        if stage.module == "training.train_semantica" and not hasattr(module, "parse_args"):
            pytest.fail("training.train_semantica has no parse_args")
        module.parse_args(stage.args)  # exits on an unknown or bad argument


def test_setting_a_runs_the_start_of_the_schedule_of_b_and_b_keeps_that_checkpoint(tmp_path):
    from training import train_retrinet
    from training.demo_zoo import plan

    stages = plan(tmp_path / "work", tmp_path / "out")
    b, a = (train_retrinet.parse_args(stages[name].args) for name in ("retrinet", "retrinet-a"))
    assert (b.setting, a.setting) == ("b", "a")
    assert a.max_train_steps < b.max_train_steps and a.restart_steps == b.restart_steps == b.max_train_steps
    assert (a.learning_rate, a.lr_warmup_steps, a.train_batch_size, a.seed) == \
        (b.learning_rate, b.lr_warmup_steps, b.train_batch_size, b.seed)
    # the report compares -b's checkpoint of -a's last step: -b writes it and keeps it
    assert a.max_train_steps % b.checkpointing_steps == 0 and b.checkpoints_total_limit is None


def test_restore_takes_shipped_models_trained_by_the_plans_command_and_unchanged(tmp_path):
    """A build on a new machine keeps the shipped CLIP and judge (they learn from Toybooru alone) instead of
    training them again, but only those its manifest recorded with the plan's command line and checksums."""
    from training.demo_zoo import plan, restore, write_manifest

    old_work, work, out = tmp_path / "old", tmp_path / "work", tmp_path / "out"
    (out / "clip").mkdir(parents=True)
    (out / "clip" / "model.safetensors").write_bytes(b"clip weights")
    (out / "judge").mkdir()
    (out / "judge" / "config.json").write_text("{}")
    (out / "judge" / "accuracy.json").write_text('{"accuracy": {}}')
    assert restore(plan(work, out), work, out) == {}  # no manifest: nothing is known of them
    old = plan(old_work, out)
    records = {name: {"command": old[name].command, "steps": 7, "final_loss": 0.5} for name in ("clip", "judge")}
    write_manifest(out, records, seed=0)
    assert restore(plan(work, out), work, out) == {}  # nothing says what data they learnt from
    # trained on other data (another scene of Toybooru) by the same command lines: trained again
    data = old["data"].command
    write_manifest(out, {**records, "data": {"command": [*data[:-1], "demo"]}}, seed=0)
    assert restore(plan(work, out), work, out) == {} and not (work / "runs").exists()
    records["data"] = {"command": data}
    write_manifest(out, records, seed=0)

    stages = plan(work, out)
    assert not stages["clip"].done() and not stages["judge"].done()
    restored = restore(stages, work, out)
    assert set(restored) == {"clip", "judge"} and stages["clip"].done() and stages["judge"].done()
    assert (work / "runs" / "clip" / "clip" / "model.safetensors").read_bytes() == b"clip weights"
    assert sorted(p.name for p in (work / "runs" / "judge").iterdir()) == ["accuracy.json", "judge"]
    assert not (work / "runs" / "judge" / "judge" / "accuracy.json").exists()  # beside the product, as trained
    assert restored["clip"]["command"] == stages["clip"].command  # the build keeps the record under its command
    assert restored["clip"]["trained_command"] == old["clip"].command and restored["clip"]["steps"] == 7
    assert restored["judge"]["restored_from"] == str(out / "judge")
    assert restore(stages, work, out) == {}  # already there

    # a changed file, or a model trained by another command line, is trained again
    work2 = tmp_path / "work2"
    (out / "clip" / "model.safetensors").write_bytes(b"other weights")
    other = plan(old_work, out)["judge"].command
    other[other.index("--max-train-steps") + 1] = "99"
    write_manifest(out, {**records, "judge": {**records["judge"], "command": other}}, seed=0)
    (out / "clip" / "model.safetensors").write_bytes(b"tampered")
    assert restore(plan(work2, out), work2, out) == {} and not (work2 / "runs").exists()
    (out / "manifest.json").write_text("{not json")
    assert restore(plan(work2, out), work2, out) == {}


def test_final_step_is_the_last_complete_checkpoint(tmp_path):
    from training.checkpoints import STATE_FILE
    from training.demo_report import final_step

    assert final_step(tmp_path / "missing") is None
    for step, complete in ((150, True), (1500, True), (3000, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / STATE_FILE).write_text("{}")
    assert final_step(tmp_path) == 1500


def test_report_without_a_build_names_what_it_misses(tmp_path):
    """The shipped folder alone is not enough: the report also reads the build's Toybooru (drawn again from
    the data seed in seconds), and says so before it loads anything; the base ships (demo family v7 on)."""
    from training import demo_zoo
    from training.demo_report import base_folder, write_report

    shipped = Path(__file__).resolve().parents[2] / "assets" / "demo-zoo"
    with pytest.raises(ValueError, match="missing: .*toybooru/annotations.jsonl. Build first") as e:
        write_report(shipped, tmp_path / "work")
    listed = str(e.value).split("missing: ")[1].split(". Build first")[0]
    assert str(shipped) not in listed and len(listed.split(", ")) == 1  # the shipped folder itself is complete
    assert base_folder(shipped, tmp_path / "work") == shipped / "base"
    with pytest.raises(ValueError, match="judge/accuracy.json, .*retrinet/model_index.json.*the base model "
                                         r"\(.*empty/base/model_index.json or .*runs/base/pipeline/model_index.json\)"):
        write_report(tmp_path / "empty", tmp_path / "work")
    with pytest.raises(ValueError, match="at least 2 pictures"):
        write_report(shipped, tmp_path / "work", samples=1)
    with pytest.raises(SystemExit):
        demo_zoo.parse_args(["--report", "--report-samples", "1"])


def test_stages_option_runs_the_named_stages_and_packages_when_asked(tmp_path, monkeypatch):
    from training import demo_zoo

    calls = []
    monkeypatch.setattr(demo_zoo, "run_stages", lambda stages, work, jobs, only: calls.append(("run", only)) or {})
    monkeypatch.setattr(demo_zoo, "package", lambda work, out: calls.append(("package", out)))
    monkeypatch.setattr(demo_zoo, "write_manifest", lambda out, records, seed: calls.append(("manifest", seed)) or {})
    base = ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    demo_zoo.main(demo_zoo.parse_args([*base, "--stages", "package"]))  # only assemble what the runs made
    assert calls == [("run", set()), ("package", (tmp_path / "out").resolve()), ("manifest", 0)]
    calls.clear()
    demo_zoo.main(demo_zoo.parse_args([*base, "--stages", "clip, judge"]))
    assert calls == [("run", {"clip", "judge"})]
    calls.clear()
    demo_zoo.main(demo_zoo.parse_args(base))
    assert [c[0] for c in calls] == ["run", "package", "manifest"] and calls[0][1] is None
    with pytest.raises(ValueError, match=r"unknown stages \['nosuch'\]"):
        demo_zoo.main(demo_zoo.parse_args([*base, "--stages", "clip,nosuch"]))


def stand_in_stages(tmp_path, monkeypatch, module: str, source: str) -> tuple[Path, Path]:
    """A build's work folder, a folder for the stages' outputs, and ``module``, a stand-in for a training script
    (``source``) that the stages' subprocesses import. Returns (work, made)."""
    work, made, lib = tmp_path / "work", tmp_path / "made", tmp_path / "lib"
    for d in (work, made, lib):
        d.mkdir()
    (lib / f"{module}.py").write_text(source)
    monkeypatch.setenv("PYTHONPATH", str(lib))
    return work, made


def test_stages_run_in_order_skip_when_done_and_stop_on_failure(tmp_path, monkeypatch):
    from training.demo_zoo import Stage, run_stages

    # a stand-in for a training script: appends its name to a log, then writes its output
    work, made = stand_in_stages(
        tmp_path, monkeypatch, "fake_stage",
        "import pathlib, sys\n"
        "name, log, out = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])\n"
        "if name == 'bad': sys.exit(3)\n"
        "if name == 'sleeper': __import__('time').sleep(120)\n"
        "with open(log, 'a') as f: f.write(name + '\\n')\n"
        "out.write_text('x')\n")
    log = tmp_path / "order.txt"

    def stage(name, needs=()):
        return Stage(name, "fake_stage", [name, str(log), str(made / name)], (made / name).exists, needs)

    stages = {"c": stage("c", ("b",)), "b": stage("b", ("a",)), "a": stage("a")}
    records = run_stages(stages, work, jobs=2)
    assert log.read_text().split() == ["a", "b", "c"]  # dependency order, whatever the listing order
    assert set(records) == {"a", "b", "c"} and all(r["seconds"] >= 0 for r in records.values())
    assert records["a"]["command"] == ["python", "-m", "fake_stage", "a", str(log), str(made / "a")]
    assert json.loads((work / "stages.json").read_text()).keys() == records.keys()
    run_stages(stages, work, jobs=2)  # everything is done: nothing runs again
    assert log.read_text().split() == ["a", "b", "c"]
    # a stage run again with another command line keeps nothing of the old command's record
    saved = json.loads((work / "stages.json").read_text())
    saved["a"] = {"command": ["python", "-m", "old"], "seconds": 1e6, "note": "the old command's"}
    (work / "stages.json").write_text(json.dumps(saved))
    (made / "a").unlink()
    rerun = run_stages({"a": stage("a")}, work, jobs=1)
    assert "note" not in rerun["a"] and rerun["a"]["seconds"] < 1e3 and rerun["a"]["command"][-3] == "a"
    with pytest.raises(RuntimeError, match="stage bad failed"):
        run_stages({"bad": stage("bad")}, work, jobs=1)
    import time

    t0 = time.perf_counter()  # a failure stops the stages running beside it, and does not wait for them
    with pytest.raises(RuntimeError, match="stage bad failed"):
        run_stages({"sleeper": stage("sleeper"), "bad": stage("bad")}, work, jobs=2)
    assert time.perf_counter() - t0 < 60 and not (made / "sleeper").exists()
    with pytest.raises(RuntimeError, match="wait for stages"):
        run_stages({"x": stage("x", ("missing",))}, work, jobs=1)


def test_base_draw_keeps_the_reports_first_draw_and_adds_distinct_pictures():
    import random

    from training.demo_report import BASE_DRAWS, base_draw

    test = [{"id": f"t{i}"} for i in range(100)]
    drawn = base_draw(test, random.Random("demo-report/0"), 10, 0)
    assert len(drawn) == BASE_DRAWS * 10 and len({r["id"] for r in drawn}) == len(drawn)
    rng = random.Random("demo-report/0")
    assert drawn[:10] == rng.sample(test, 10)  # the report's stream draws what it drew before the base took more
    after = random.Random("demo-report/0")
    base_draw(test, after, 10, 0)
    assert after.random() == rng.random()  # and it is left where the figures after the base expect it
    assert base_draw(test, random.Random("demo-report/0"), 10, 0) == drawn  # the same pictures every time
    assert base_draw(test, random.Random("demo-report/0"), 10, 1)[10:] != drawn[10:]  # the seed draws the rest
    assert len(base_draw(test[:12], random.Random("x"), 10, 0)) == 12  # a small test split: all of it


def test_a_stage_run_again_from_its_first_step_does_not_add_the_old_runs_seconds(tmp_path, monkeypatch):
    """A stage killed and resumed adds its new seconds to its record; one whose run folder was removed (a new run
    of the same command) records its own seconds only."""
    from training.demo_zoo import Stage, run_stages

    work, made = stand_in_stages(
        tmp_path, monkeypatch, "logged_stage",
        "import pathlib, sys\n"
        "run, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
        "run.mkdir(exist_ok=True)\n"
        "with open(run / 'metrics.jsonl', 'a') as f: f.write('{\"step\": 1, \"loss\": 0.5, \"seconds\": 2.0}\\n')\n"
        "out.write_text('x')\n")
    run = tmp_path / "run"
    stage = Stage("s", "logged_stage", [str(run), str(made / "s")], (made / "s").exists, run_dir=run)
    (work / "stages.json").write_text(json.dumps({"s": {"command": stage.command, "seconds": 1e6}}))
    assert run_stages({"s": stage}, work, jobs=1)["s"]["seconds"] < 1e3  # nothing to resume: a new run
    (made / "s").unlink()  # killed before its end: the run folder is kept, and the next run resumes it
    resumed = run_stages({"s": stage}, work, jobs=1)["s"]
    assert 1e-3 < resumed["seconds"] < 1e3 and resumed["train_seconds"] == 4.0
    saved = json.loads((work / "stages.json").read_text())["s"]["seconds"]
    (made / "s").unlink()
    assert run_stages({"s": stage}, work, jobs=1)["s"]["seconds"] > saved  # resumed: the seconds add up


def test_threads_option_sets_every_stage_threads(tmp_path, monkeypatch):
    """``--threads``: a stage run alone gets the threads it had in a full build, not the whole machine."""
    from training import demo_zoo

    work, made = stand_in_stages(
        tmp_path, monkeypatch, "env_stage",
        "import os, pathlib, sys\n"
        "pathlib.Path(sys.argv[1]).write_text(os.environ['OMP_NUM_THREADS'] + ' ' + os.environ['MKL_NUM_THREADS'])\n")
    monkeypatch.setattr(demo_zoo, "plan", lambda w, o, seed=0: {
        "x": demo_zoo.Stage("x", "env_stage", [str(made / "x")], (made / "x").exists)})
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    demo_zoo.main(demo_zoo.parse_args(["--out", str(tmp_path / "o"), "--work", str(work), "--stages", "x"]))
    assert (made / "x").read_text() == "8 8"  # alone, a stage takes every CPU
    (made / "x").unlink()
    demo_zoo.main(demo_zoo.parse_args(["--out", str(tmp_path / "o"), "--work", str(work), "--stages", "x",
                                       "--threads", "1"]))
    assert (made / "x").read_text() == "1 1"
    with pytest.raises(SystemExit):
        demo_zoo.parse_args(["--threads", "0"])


def test_longest_chains_start_first_and_a_short_one_keeps_no_slot_they_are_about_to_need(tmp_path, monkeypatch):
    from training.demo_zoo import Stage, chain_minutes, plan, run_stages

    # a stand-in for a training script: logs its start, sleeps, logs its end, writes its output
    work, made = stand_in_stages(
        tmp_path, monkeypatch, "timed_stage",
        "import pathlib, sys, time\n"
        "name, seconds, log, out = sys.argv[1], float(sys.argv[2]), pathlib.Path(sys.argv[3]), pathlib.Path(sys.argv[4])\n"
        "with open(log, 'a') as f: f.write('start ' + name + '\\n')\n"
        "time.sleep(seconds)\n"
        "with open(log, 'a') as f: f.write('end ' + name + '\\n')\n"
        "out.write_text('x')\n")
    log = tmp_path / "order.txt"

    def stage(name, seconds, minutes, needs=()):
        return Stage(name, "timed_stage", [name, str(seconds), str(log), str(made / name)], (made / name).exists,
                     needs, minutes=minutes)

    # the demo family's shape: the detector's data are ready at once and its training is long, but the CLIP (then
    # the base and RetriNet) is the longest chain, and it waits for the main data
    stages = {s.name: s for s in [
        stage("data-det", 0, 0.2), stage("detector", 0, 43, ("data-det",)), stage("data", 3, 0.25),
        stage("vae", 0, 12, ("data",)), stage("clip", 1, 30, ("data",)), stage("base", 0, 40, ("vae", "clip"))]}
    chains = chain_minutes(stages)
    assert chains["clip"] == 70 and chains["vae"] == 52 and chains["data"] == 70.25 and chains["data-det"] == 43.2
    run_stages(stages, work, jobs=2)
    events = log.read_text().split("\n")
    # in the plan's order with no look-ahead, the detector would have started beside the data and kept the CLIP
    # waiting; here it waits for the data, so the CLIP and the VAE start first. Its data (0.2 min) should be done
    # before the data (0.25 min) are: they take the idle slot beside them (both start in one pass of the scheduler,
    # so which process logs its start first is a race, and they may end before the data's process has started) and
    # are done before the data
    assert events.index("start detector") > events.index("start clip") > events.index("end data")
    assert events.index("start detector") > events.index("start vae")
    assert events.index("start data-det") < events.index("end data-det") < events.index("end data")
    assert sorted(e for e in events if e.startswith("end")) == sorted(f"end {n}" for n in stages)
    assert events.index("start base") > max(events.index("end vae"), events.index("end clip"))
    with pytest.raises(ValueError, match="cycle"):
        chain_minutes({"a": stage("a", 0, 1, ("b",)), "b": stage("b", 0, 1, ("a",))})
    # the real plan: the chain through the CLIP, its zero-terminal-SNR base and RetriNet is the longest
    real = chain_minutes(plan(tmp_path / "w", tmp_path / "o"))
    assert max(real, key=real.get) == "data"
    assert real["clip"] > real["vae"] > real["judge"] > real["data-det"]  # 10 detector epochs: 11 min


def test_a_short_stage_takes_an_idle_slot_when_it_ends_before_the_longer_chains_are_ready():
    """v14's build: with the VAE done and the CLIP running, the judge (23 min) waited for the CLIP's 33 minutes
    left, holding a core idle, so that the base and its twin could start together. A stage that should be done
    before the stages ahead of it are ready keeps nothing waiting."""
    from training.demo_zoo import Stage, _takes_a_slot_it_needs, chain_minutes

    def stage(name, minutes, needs=()):
        return Stage(name, "m", [], lambda: False, needs, minutes=minutes)

    stages = {s.name: s for s in [stage("data", 0.25), stage("vae", 16, ("data",)), stage("clip", 40, ("data",)),
                                  stage("judge", 23, ("data",)), stage("twin", 17, ("vae", "clip")),
                                  stage("base", 26, ("vae", "clip")), stage("retrinet", 57, ("twin",))]}
    chains = chain_minutes(stages)
    pending = [stages[n] for n in ("twin", "retrinet", "base", "judge")]
    running, finished = {"clip"}, {"data", "vae"}
    # no estimate of what is left: the judge waits (the two stages ahead would find one slot)
    assert _takes_a_slot_it_needs(stages["judge"], pending, running, finished, chains, free=1)
    # the CLIP has 33 minutes left, the judge needs 23: it is done before the twin and the base are ready
    assert not _takes_a_slot_it_needs(stages["judge"], pending, running, finished, chains, free=1, left={"clip": 33})
    # with 10 minutes left it would still run when they are: it waits
    assert _takes_a_slot_it_needs(stages["judge"], pending, running, finished, chains, free=1, left={"clip": 10})
    # two free slots: nothing to wait for either way
    assert not _takes_a_slot_it_needs(stages["judge"], pending, running, finished, chains, free=2, left={"clip": 10})


def test_a_terminated_build_stops_the_stages_it_started(tmp_path):
    """SIGTERM to the build (a stopped job, a session's end) stops its running stages too: an orphaned stage would
    go on writing checkpoints beside the stage a rerun starts in its place."""
    import os
    import signal
    import subprocess
    import sys
    import time

    lib, pid_file = tmp_path / "lib", tmp_path / "stage.pid"
    lib.mkdir()
    (lib / "sleepy_stage.py").write_text(
        "import os, pathlib, sys, time\n"
        "pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))\n"
        "time.sleep(300)\n")
    runner = (
        "import signal, sys\n"
        "from pathlib import Path\n"
        "from training.demo_zoo import Stage, _exit_on_sigterm, run_stages\n"
        "signal.signal(signal.SIGTERM, _exit_on_sigterm)\n"
        f"run_stages({{'s': Stage('s', 'sleepy_stage', [{str(pid_file)!r}], lambda: False)}}, Path({str(tmp_path)!r}), 1)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(lib), str(Path(__file__).resolve().parents[2])]))
    build = subprocess.Popen([sys.executable, "-c", runner], env=env)
    deadline = time.time() + 60
    while not pid_file.is_file() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    stage_pid = int(pid_file.read_text())
    build.send_signal(signal.SIGTERM)
    assert build.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(stage_pid, 0)  # still there (or a zombie nobody reaped yet: its parent is gone, init reaps it)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        with open(f"/proc/{stage_pid}/stat") as f:
            assert f.read().split()[2] == "Z", "the stage outlived the build"


def test_resume_ignores_unstable_private_config_keys():
    from training.core import _comparable

    a = {"unet": {"layers": 2, "_use_default_values": ["x", "y"], "blocks": [{"_n": 1, "c": 3}]}, "lock": "none"}
    b = {"unet": {"layers": 2, "_use_default_values": ["y", "x"], "blocks": [{"_n": 2, "c": 3}]}, "lock": "none"}
    assert _comparable(a) == _comparable(b) == {"unet": {"layers": 2, "blocks": [{"c": 3}]}, "lock": "none"}
    assert _comparable(a) != _comparable({**b, "lock": "decoder"})


@pytest.mark.slow
def test_package_and_report_on_a_tiny_family(family, toybooru, tmp_path, monkeypatch):
    """The build's last steps on 2-step models: the shipped folder loads, and the report is written."""
    import os
    import shutil

    from training import demo_report, train_judge, train_retrinet, train_semantica
    from training.demo_zoo import RETRINET_BASE, package, write_manifest

    work = family["root"]
    runs = work / "runs"
    runs.mkdir(exist_ok=True)
    for name in ("vae", "clip", "base"):
        if not (runs / name).exists():
            os.symlink(work / name, runs / name)
    if not (work / "toybooru").exists():
        os.symlink(toybooru, work / "toybooru")
    # RetriNet's base: the base's zero-terminal-SNR v twin (here the tiny base with that noise schedule)
    twin = runs / RETRINET_BASE / "pipeline"
    if not twin.exists():
        shutil.copytree(runs / "base" / "pipeline", twin)
        config = json.loads((twin / "scheduler" / "scheduler_config.json").read_text())
        config.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
        (twin / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    base = twin
    for setting, name in (("b", "retrinet"), ("a", "retrinet-a")):
        train_retrinet.main(train_retrinet.parse_args(
            ["--pretrained", str(base), "--data", str(toybooru), "--output-dir", str(runs / name), "--resolution", "32",
             "--num-references", "2", "--train-batch-size", "2", "--gradient-accumulation-steps", "1",
             "--max-train-steps", "1", "--checkpointing-steps", "1", "--setting", setting,
             "--retrieval-attention-heads", "4",
             *(["--validation-steps", "1", "--validation-inference-steps", "2"] if setting == "b" else [])]))
    train_semantica.main(train_semantica.parse_args(
        ["--pretrained", str(runs / "base" / "pipeline"), "--image-encoder", str(runs / "clip" / "clip"), "--data",
         str(toybooru), "--output-dir", str(runs / "semantica"), "--resolution", "32", "--train-batch-size", "2",
         "--max-train-steps", "1", "--min-similarity", "-1", "--max-similarity", "1"]))
    train_judge.main(train_judge.parse_args(["--data", str(toybooru), "--width", "8", *shared(runs / "judge", 1, 8)]))
    out = tmp_path / "zoo"
    out.mkdir()
    shutil.copytree(Path(__file__).resolve().parents[2] / "assets" / "demo-zoo" / "detector", out / "detector")
    package(work, out)
    assert {p.name for p in out.iterdir()} >= {"base", "clip", "retrinet", "semantica", "judge", "detector"}
    from diffusers import StableDiffusionPipeline  # the base ships whole: the report reads it from there

    assert demo_report.base_folder(out, work) == out / "base"
    shipped_base = StableDiffusionPipeline.from_pretrained(out / "base", safety_checker=None)
    assert torch.equal(shipped_base.unet.conv_in.weight, StableDiffusionPipeline.from_pretrained(
        runs / "base" / "pipeline", safety_checker=None).unet.conv_in.weight)
    shipped = json.loads((out / "retrinet" / "scheduler" / "scheduler_config.json").read_text())
    assert shipped["prediction_type"] == "v_prediction" and shipped["rescale_betas_zero_snr"]  # RetriNet's base's
    manifest = write_manifest(out, {"vae": {"command": ["python", "-m", "training.train_vae"]}}, seed=0)
    assert manifest["files"]["retrinet/model_index.json"]["bytes"] > 0 and manifest["total_bytes"] > 0

    monkeypatch.setattr(demo_report, "SIZE", 32)  # the tiny family draws 32 px pictures
    figures = demo_report.write_report(out, work, samples=4, seed=0)
    for key in ("base", "reconstruction", "composition_in_domain", "composition_out_domain"):
        assert 0 <= min(v for k, v in figures[key].items() if k != "pictures") <= 1, key
        assert figures[key]["pictures"] > 0
    from training.data.retribooru import read_annotations

    n_test = sum(r["split"] == "test" for r in read_annotations(work / "toybooru")[0])
    assert figures["base"]["pictures"] == min(demo_report.BASE_DRAWS * 4, n_test)  # the base: 4 times the pictures
    assert set(figures["settings"]) == {"a", "b"} and "SWD(CLIP-I, CLIP-T)" in figures["settings"]["b"]
    assert "semantica" in figures
    assert set(figures["reference_gap"]) == {"a", "b"} and -1 < figures["prompt_gap"] < 1
    assert figures["reference_gap"]["b"]["samples"] >= 2 and len(figures["reference_gap"]["b"]["own"]) == 4
    curves = figures["gap_during_training"]  # -b logged its gap while training, -a did not
    assert set(curves) == {"b"} and set(curves["b"]["gap"]) == {1} and curves["b"]["samples"] >= 2
    probe = figures["clip_probe"]
    assert probe["pictures"] > 0 and all(0 <= probe[k]["right"] <= 1
                                         for k in ("hair_color", "eye_color", "cloth_color", "pattern"))
    assert probe["pattern"]["pictures"] == probe["pictures"] and probe["pattern"]["patterns"] == 4
    ceiling = figures["vae_ceiling"]
    assert ceiling["pictures"] > 0 and ceiling["mse"] >= 0
    assert set(ceiling["real"]) == set(ceiling["reconstructed"]) and 0 <= ceiling["real"]["hair_color"] <= 1
    assert ceiling["real"]["three_colours"] >= ceiling["real"]["character_and_outfit"]  # fewer attributes to get right
    for key in ("reconstruction", "composition_in_domain", "composition_out_domain"):
        assert 0 <= figures[key]["three_colours"] <= 1, key
    control = figures["reconstruction_control"]
    assert set(control) == {"hair_color", "eye_color", "cloth_color", "pattern"} and \
        all(0 <= v <= 1 for v in control.values())
    report = (out / "REPORT.md").read_text()
    assert "## RetriNet: composition" in report and "report/composition-in.png" in report
    assert "## Do the references matter? (the reference gap)" in report and "| -a | **" in report
    assert "### The gap while training" in report and "| step | -b |" in report and "\n| 1 | " in report
    assert "## What the demo CLIP reads (its colour probe)" in report and "| hair | " in report
    assert f"| outfit pattern (plaid, striped, polka dot or none) | {demo_report._pct(probe['pattern']['right'])} | " \
        "25.0 % |" in report
    assert "| another target's (control) | " in report
    assert "## What the VAE lets through" in report and "| real pictures | VAE reconstructions |" in report
    assert f"of {figures['base']['pictures']} (standard error " in report
    assert f"eye colour {demo_report._pct(figures['base']['eye_color'])}, outfit colour" in report
    assert (out / "report" / "composition-in.png").is_file() and (out / "report" / "base.png").is_file()

    # a candidate judged alone draws the report's sets and noise: the shipped pipeline scores the report's figures
    keys = ("reconstruction", "reconstruction_control", "composition_in_domain", "composition_out_domain")
    alone = demo_report.judge_candidate(out, work, samples=4, seed=0)
    assert {k: alone[k] for k in keys} == {k: figures[k] for k in keys}
    assert alone["sampling"]["retrieval_scale"] == 1.0 and alone["sampling"]["guidance_scale"] == demo_report.GUIDANCE
    off = demo_report.main(["--out", str(out), "--work", str(work), "--samples", "4", "--retrieval-scale", "0",
                            "--json", str(tmp_path / "off.json")])
    assert json.loads((tmp_path / "off.json").read_text()) == off and off["sampling"]["retrieval_scale"] == 0
    with pytest.raises(SystemExit):
        demo_report.main(["--out", str(out), "--work", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match="must not be negative"):
        demo_report.judge_candidate(out, work, samples=4, retrieval_scale=-1)
    # a base candidate judged alone: the report's prompts and noise, so the shipped base scores the report's figure
    assert demo_report.judge_base(out, work, out / "base", samples=4, seed=0)["base"] == figures["base"]
    other = demo_report.main(["--out", str(out), "--work", str(work), "--base", str(runs / "base" / "pipeline"),
                              "--samples", "4", "--guidance-scale", "1"])
    assert other["sampling"]["guidance_scale"] == 1 and other["base"]["pictures"] == figures["base"]["pictures"]
    with pytest.raises(ValueError, match="model_index.json"):
        demo_report.judge_base(out, work, tmp_path / "nowhere", samples=4)
    with pytest.raises(SystemExit):  # a base and a RetriNet candidate at once
        demo_report.main(["--work", str(work), "--base", str(out / "base"), "--pipeline", str(out / "retrinet")])

    # the denoiser probes on the tiny family: rates, errors that grow with the noise, and a clear error without data
    from training import denoiser_probe
    probe = denoiser_probe.main(["--out", str(out), "--work", str(work), "--samples", "4",
                                 "--json", str(tmp_path / "probe.json")])
    assert json.loads((tmp_path / "probe.json").read_text()) == probe and probe["pictures"] == 4
    assert set(probe["decoder"]) == {str(s) for s in denoiser_probe.SIGMAS}
    assert set(probe["img2img"]) == {str(s) for s in denoiser_probe.STRENGTHS}
    readings = [probe["real"], *probe["decoder"].values(), *probe["img2img"].values(), *probe["x0"].values(),
                *(r for name in ("self", "others", "none") for r in probe["self_reference"][name].values())]
    assert all(0 <= r[k] <= 1 for r in readings for k in denoiser_probe.ATTRIBUTES)
    for steps in (probe["x0"], probe["self_reference"]["self"]):
        noisy = [steps[str(t)]["noisy_rms"] for t in denoiser_probe.TIMESTEPS]
        assert noisy == sorted(noisy) and noisy[0] > 0
    with pytest.raises(SystemExit):
        denoiser_probe.main(["--out", str(out), "--work", str(tmp_path / "nowhere")])

    # an unfinished -a run: the report compares both settings at their last common checkpoint
    from pipelines.retrinet import RetriNetModel, RetriNetPipeline
    final_a = RetriNetModel.from_pretrained(runs / "retrinet-a" / "retrinet").state_dict()
    shutil.rmtree(runs / "retrinet-a" / "retrinet")
    like = RetriNetPipeline.from_pretrained(out / "retrinet")
    matched = demo_report.matched_checkpoints(work, like)
    assert set(matched) == {"b at step 1", "a at step 1"}
    exported = matched["a at step 1"].retrinet.state_dict()  # the checkpoint of step 1 is the final model
    assert set(exported) == set(final_a) and all(torch.equal(exported[k], v) for k, v in final_a.items())
    assert matched["b at step 1"].vae is like.vae and (work / "report-models" / "retrinet-a-step-1").is_dir()
    # the exports are cached; a run trained again (other weights at the same step) is exported again, not read
    # from the cache of the run before it
    from safetensors.torch import load_file, save_file

    from training.checkpoints import list_checkpoints

    checkpoint = dict(list_checkpoints(runs / "retrinet-a"))[1]
    for path in checkpoint.glob("model*.safetensors"):
        weights = load_file(path)
        save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, path)
    again = demo_report.matched_checkpoints(work, like)["a at step 1"].retrinet.state_dict()
    assert all(torch.equal(again[k], v + 1) for k, v in final_a.items())
    cached = demo_report.matched_checkpoints(work, like)["a at step 1"].retrinet.state_dict()
    assert all(torch.equal(cached[k], again[k]) for k in again)


class _WordClip:
    """A stand-in ``ClipScorer`` that reads colours and patterns perfectly: a picture embeds as its true
    (colour or pattern, noun) pairs, a caption as the pairs it names, both of unit norm (as CLIP's)."""

    def __init__(self, root, records, blind=False):
        from training.data.retribooru import open_record

        self.truth = {open_record(root, r)[0].tobytes(): r for r in records}
        self.blind, self.vocab = blind, {}

    def _vector(self, pairs):
        v = torch.zeros(4096)
        for pair in pairs:
            v[self.vocab.setdefault(pair, len(self.vocab))] += 1.0
        return v / v.norm().clamp(min=1e-12)

    def image_embeds(self, images):
        rows = []
        for image in images:
            r = self.truth[image.tobytes()]
            pairs = {tuple(t.replace("_", " ").split(" ", 1)) for t in r["tags"] if "_" in t}
            rows.append(self._vector(pairs))
        return torch.stack(rows)

    def text_embeds(self, captions):
        if self.blind:
            return torch.ones(len(captions), 4096)
        return torch.stack([self._vector({tuple(w.split(" ", 1)) for w in c.split(", ") if " " in w})
                            for c in captions])


def test_clip_probe_counts_the_captions_ranked_first(toybooru, toybooru_records):
    import random

    from training.demo_report import clip_probe

    test = [r for r in toybooru_records if r["split"] == "test"]
    perfect = clip_probe(_WordClip(toybooru, test), toybooru, toybooru_records, test, random.Random(0), pictures=10)
    assert perfect["pictures"] == min(10, len(test))
    for key in ("hair_color", "eye_color", "cloth_color"):
        assert perfect[key]["right"] == 1.0 and perfect[key]["pictures"] > 0, key
        assert perfect[key]["colours"] == len({r["truth"][key] for r in toybooru_records}) > 1
    assert perfect["binding"]["right"] == 1.0
    chosen = random.Random(0).sample(test, min(10, len(test)))
    assert perfect["pattern"] == {"right": 1.0, "pictures": len(chosen), "patterns": 4}
    # every picture (the test split of this small Toybooru has one pattern): pattern words, and none
    pool = toybooru_records
    assert {r["truth"]["pattern"] for r in pool} >= {"solid", "stripes", "checks"}
    every = clip_probe(_WordClip(toybooru, pool), toybooru, pool, pool, random.Random(0), pictures=len(pool))
    assert every["pattern"] == {"right": 1.0, "pictures": len(pool), "patterns": 4}
    two_piece = [r for r in chosen
                 if r["truth"]["garment"] != "dress" and r["truth"]["cloth_color"] != r["truth"]["secondary_color"]]
    assert perfect["binding"]["pictures"] == len(two_piece) > 0
    # a CLIP blind to text ranks every caption alike and so always picks the first colour
    blind = clip_probe(_WordClip(toybooru, test, blind=True), toybooru, toybooru_records, test, random.Random(0),
                       pictures=10)
    first = min(r["truth"]["hair_color"] for r in toybooru_records)
    assert blind["hair_color"]["right"] == sum(r["truth"]["hair_color"] == first for r in chosen) / len(chosen) < 1
    assert blind["binding"] == {"right": 0.0, "pictures": len(two_piece)}  # a tie binds nothing
    blind = clip_probe(_WordClip(toybooru, pool, blind=True), toybooru, pool, pool, random.Random(0),
                       pictures=len(pool))
    checks = sum(r["truth"]["pattern"] == "checks" for r in pool) / len(pool)  # the first pattern, sorted
    assert blind["pattern"]["right"] == checks and 0 < checks < 1
    with pytest.raises(ValueError, match="no test picture"):
        clip_probe(_WordClip(toybooru, test), toybooru, toybooru_records, [], random.Random(0))


def test_pattern_captions_change_only_the_pattern_word(toybooru_records):
    from training.data.retribooru import prompt_from_tags
    from training.demo_report import _pattern_captions

    seen = set()
    for rec in toybooru_records:
        captions = _pattern_captions(rec)
        assert set(captions) == {"solid", "stripes", "dots", "checks"}
        assert captions[rec["truth"]["pattern"]] == prompt_from_tags(rec["tags"])  # its own: the training caption
        assert len(set(captions.values())) == 4
        words = set(captions["solid"].split(", "))
        for pattern, word in (("stripes", "striped"), ("dots", "polka dot"), ("checks", "plaid")):
            added = set(captions[pattern].split(", ")) - words
            assert len(added) == 1 and added.pop().startswith(word + " "), (pattern, captions)
        seen.add(rec["truth"]["pattern"])
    assert seen == {"solid", "stripes", "dots", "checks"}
    bare = {**toybooru_records[0], "tags": ["1girl", "solo"]}
    assert _pattern_captions(bare) is None  # no colour tag of the main piece to put a pattern after


def test_garment_colours_swap_the_two_pieces_and_nothing_else():
    from training.demo_report import _garment_colours_swapped

    rec = {"tags": ["1girl", "green_hair", "green_kimono", "plaid_kimono", "blue_sash", "kimono", "sash"],
           "cloth_tags": ["green_kimono", "plaid_kimono", "blue_sash", "kimono", "sash"],
           "truth": {"cloth_color": "green", "secondary_color": "blue"}}
    assert _garment_colours_swapped(rec) == ["1girl", "green_hair", "blue_kimono", "plaid_kimono", "green_sash",
                                             "kimono", "sash"]
    one_colour = dict(rec, truth={"cloth_color": "green", "secondary_color": "green"})
    dress = {"tags": ["red_dress", "dress"], "cloth_tags": ["red_dress", "dress"],
             "truth": {"cloth_color": "red", "secondary_color": "blue"}}
    assert _garment_colours_swapped(one_colour) is None and _garment_colours_swapped(dress) is None
    one_piece = dict(rec, truth={"cloth_color": "green", "secondary_color": None})
    assert _garment_colours_swapped(one_piece) is None


def test_the_reference_gap_batch_needs_two_test_samples(toybooru, monkeypatch):
    from training import demo_report, train_retrinet

    batch = demo_report.gap_samples(toybooru, 0, 4)
    assert batch["pixel_values"].shape[0] == 4
    assert len({tuple(ids) for ids in batch["reference_ids"]}) == 4  # spread over the split: four different samples
    ds = train_retrinet.RetriBooruDataset(toybooru, "test", task="recon", setting="b", num_references=2,
                                          resolution=32, seed=0)
    one = train_retrinet.gap_batch(ds, 1)  # a single sample is the split's first
    assert one["pixel_values"].shape[0] == 1 and one["id"] == [ds[0]["id"]]
    ends = train_retrinet.gap_batch(ds, 2)  # two are its first and its last
    assert ends["id"] == [ds[0]["id"], ds[len(ds) - 1]["id"]]
    with pytest.raises(ValueError, match="at least 1"):
        train_retrinet.gap_batch(ds, 0)
    monkeypatch.setattr(train_retrinet, "gap_batch", lambda ds, samples: None)  # a split of fewer than 2
    with pytest.raises(ValueError, match="fewer than 2"):
        demo_report.gap_samples(toybooru, 0, 4)


def test_the_denoiser_probe_turns_each_parametrisation_into_x0():
    """An oracle that returns the true noise (or v, or x0) has no error at any timestep; a model that returns the
    noisy latent as its x0 has the noisy latent's own error."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from training.denoiser_probe import one_step_x0

    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.5),
                          decode=lambda z: SimpleNamespace(sample=torch.zeros(len(z), 3, 8, 8)))
    judge = SimpleNamespace(predict=lambda pixels: [{"hair_color": "red", "eye_color": "red", "cloth_color": "red",
                                                     "pattern": "solid"}] * len(pixels))
    truths = [{"hair_color": "red", "eye_color": "blue", "cloth_color": "red", "pattern": "solid"}] * 3
    for kind in ("epsilon", "v_prediction", "sample"):
        scheduler = DDPMScheduler(prediction_type=kind)
        ab = scheduler.alphas_cumprod

        def oracle(z, t, kind=kind, ab=ab):
            a = ab[t]
            eps = (z - a.sqrt() * latents) / (1 - a).sqrt()
            return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * latents, "sample": latents}[kind]

        got = one_step_x0(oracle, vae, scheduler, judge, latents, truths, timesteps=(10, 500))
        assert all(got[t]["rms"] < 1e-4 for t in ("10", "500")), kind
        assert got["10"]["noisy_rms"] < got["500"]["noisy_rms"]
        assert got["10"]["hair_color"] == 1.0 and got["10"]["eye_color"] == 0.0
    lazy = one_step_x0(lambda z, t: z / scheduler.alphas_cumprod[t].sqrt(), vae, scheduler, judge, latents, truths,
                       timesteps=(300,))
    assert lazy["300"]["rms"] == pytest.approx(lazy["300"]["noisy_rms"], rel=1e-5)
    with pytest.raises(ValueError, match="unknown prediction type"):
        one_step_x0(lambda z, t: z, vae, SimpleNamespace(config=SimpleNamespace(prediction_type="flow"),
                                                         alphas_cumprod=scheduler.alphas_cumprod),
                    judge, latents, truths, timesteps=(10,))
