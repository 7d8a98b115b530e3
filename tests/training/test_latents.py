"""The latent cache, the demo scene of Toybooru, neutral prompts, RetriNet's --cache-latents and the shipped VAE
(the scripts' --cache-latents and --decoder-only on the tiny family: tests/training/test_demo_family.py)."""

import itertools
import json

import pytest
import torch
from diffusers import AutoencoderKL

from pipelines.components import TINY_VAE
from training.data.retribooru import RetriBooruDataset, neutral_tags, read_annotations
from training.data.toybooru import SCENES, generate
from training.latents import LatentCache


class CountingVAE(torch.nn.Module):
    """A tiny AutoencoderKL that counts the pictures it encodes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vae = AutoencoderKL(**TINY_VAE).eval()
        self.encoded = 0

    @property
    def device(self):
        return self.vae.device

    @property
    def dtype(self):
        return self.vae.dtype

    def encode(self, x):
        self.encoded += x.shape[0]
        return self.vae.encode(x)


def test_cache_encodes_each_picture_once_and_matches_the_vae():
    vae = CountingVAE()
    cache = LatentCache(vae)
    pixels = torch.rand(4, 3, 32, 32) * 2 - 1
    keys = ["a", "b", "a", "c"]  # "a" twice in one batch: the same picture
    pixels[2] = pixels[0]
    mean, std = cache.posterior(keys, pixels)
    assert vae.encoded == 3 and len(cache) == 3
    with torch.no_grad():
        ref = vae.vae.encode(pixels).latent_dist
    assert mean.shape == (4, 4, 16, 16)
    torch.testing.assert_close(mean, ref.mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(std, ref.std, atol=1e-5, rtol=1e-4)
    # later batches skip the encoder for known pictures
    again = cache.mode(["c", "b"], pixels[[3, 1]])
    assert vae.encoded == 3 and cache.hits == 3 and cache.misses == 3
    torch.testing.assert_close(again, ref.mean[[3, 1]], atol=1e-5, rtol=1e-4)
    # a sample draws its noise like DiagonalGaussianDistribution.sample, from the same generator
    torch.manual_seed(7)
    drawn = cache.sample(keys, pixels)
    torch.manual_seed(7)
    expected = ref.mean + ref.std * torch.randn(ref.mean.shape)
    torch.testing.assert_close(drawn, expected, atol=1e-5, rtol=1e-4)


def test_a_full_cache_still_answers_and_bad_input_is_refused():
    vae = CountingVAE()
    cache = LatentCache(vae, max_items=2)
    pixels = torch.rand(3, 3, 32, 32)
    mean, _ = cache.posterior(["x", "y", "z"], pixels)
    assert len(cache) == 2 and mean.shape[0] == 3
    with torch.no_grad():
        torch.testing.assert_close(mean[2], vae.vae.encode(pixels[2:]).latent_dist.mean[0], atol=1e-5, rtol=1e-4)
    cache.posterior(["z"], pixels[2:])
    assert vae.encoded == 4  # "z" did not fit, so it is encoded again
    with pytest.raises(ValueError, match="2 keys for 3 pictures"):
        cache.posterior(["x", "y"], pixels)
    with pytest.raises(ValueError, match="max_items"):
        LatentCache(vae, max_items=0)


def test_demo_scene_draws_large_upright_full_figures_on_flat_backgrounds(tmp_path):
    out = generate(tmp_path / "demo", 40, seed=3, size=64, scene="demo")
    records, _ = read_annotations(out)
    truth = [r["truth"] for r in records]
    assert {t["framing"] for t in truth} == {"full"}
    assert {t["background"]["kind"] for t in truth} == {"flat"}
    assert {t["pose"]["lean"] for t in truth} == {0.0}
    lo, hi = SCENES["demo"].figure_height
    assert all(lo * 64 <= t["figure_height"] <= hi * 64 for t in truth)
    assert json.loads((out / "toybooru.json").read_text())["args"]["scene"] == "demo"
    # the same identities as the default scene: the scene changes only how pictures are framed
    default = generate(tmp_path / "default", 40, seed=3, size=64)
    other, _ = read_annotations(default)
    assert [r["cluster"] for r in records] == [r["cluster"] for r in other]
    assert {r["truth"]["framing"] for r in other} != {"full"}
    with pytest.raises(ValueError, match="unknown scene"):
        generate(tmp_path / "bad", 4, size=64, scene="nope")


def test_demo_cowboy_scene_frames_the_same_figures_from_the_head_down_at_a_larger_scale(tmp_path):
    cowboy = generate(tmp_path / "cowboy", 40, seed=3, size=64, scene="demo-cowboy")
    records, _ = read_annotations(cowboy)
    full, _ = read_annotations(generate(tmp_path / "demo", 40, seed=3, size=64, scene="demo"))
    assert [r["cluster"] for r in records] == [r["cluster"] for r in full]
    truth = [r["truth"] for r in records]
    assert {t["framing"] for t in truth} == {"full"} and {t["background"]["kind"] for t in truth} == {"flat"}
    lo, hi = SCENES["demo-cowboy"].figure_height
    assert all(lo * 64 <= t["figure_height"] <= hi * 64 for t in truth) and lo > 1
    # cut below the waist, so tagged as such, never as a full body
    assert all("cowboy_shot" in r["tags"] and "full_body" not in r["tags"] for r in records)
    # the head is whole (off every edge of the picture), and drawn as many times as tall as a full figure's as the
    # two scenes' figure heights say
    for r in records:
        x0, y0, x1, y1 = r["face_bbox"]
        assert 0 < x0 < x1 < 64 and 0 < y0 < y1 < 64
    heights = [r["face_bbox"][3] - r["face_bbox"][1] for r in records]
    full_heights = [r["face_bbox"][3] - r["face_bbox"][1] for r in full]
    full_lo, full_hi = SCENES["demo"].figure_height
    assert sum(heights) / sum(full_heights) == pytest.approx((lo + hi) / (full_lo + full_hi), rel=0.1)


def test_neutral_prompts_name_no_identity(toybooru):
    records, _ = read_annotations(toybooru)
    rec = records[0]
    kept = neutral_tags(rec)
    t = rec["truth"]
    assert kept and set(kept) < set(rec["tags"])
    for word in (f"{t['hair_color']}_hair", f"{t['eye_color']}_eyes", *rec["cloth_tags"]):
        assert word not in kept
    assert "1girl" in kept
    ds = RetriBooruDataset(toybooru, "train", task="compose", resolution=32, prompt_tags="neutral")
    sample = ds[0]
    assert "hair" not in sample["prompt"] and "eyes" not in sample["prompt"]
    full = RetriBooruDataset(toybooru, "train", task="compose", resolution=32)[0]["prompt"]
    assert "hair" in full
    with pytest.raises(ValueError, match="prompt_tags"):
        RetriBooruDataset(toybooru, "train", prompt_tags="some")


@pytest.mark.parametrize("setting", ["a", "b"])
def test_retrinet_objective_with_the_cache_equals_the_vae(tiny_sd, toybooru, setting):
    from pipelines.retrinet import RetriNetModel
    from training.data.retribooru import collate
    from training.train_retrinet import RetriNetObjective, load_base, parse_args

    def objective(cache: bool):
        extra = ["--cache-latents"] if cache else []
        args = parse_args(["--pretrained", str(tiny_sd), "--data", str(toybooru), "--output-dir", "/unused",
                           "--resolution", "32", "--setting", setting, "--task", "multitask", *extra])
        vae, text_encoder, tokenizer, unet, noise_scheduler = load_base(str(tiny_sd))
        torch.manual_seed(0)
        retrinet = RetriNetModel.from_unet(unet)
        for p in retrinet.parameters():  # non-zero zero-convolutions, so that the references count
            p.data.add_(0.01)

        class Acc:
            device = torch.device("cpu")

        return RetriNetObjective(args, Acc(), vae, text_encoder, tokenizer, unet, retrinet, noise_scheduler,
                                 torch.float32)

    ds = RetriBooruDataset(toybooru, "train", task="multitask", setting=setting, num_references=2, resolution=32)
    batches = [collate([ds[0], ds[1]]), collate([ds[2], ds[0]])]
    plain, cached = objective(False), objective(True)
    for batch in batches:
        torch.manual_seed(5)
        want = plain(batch)
        torch.manual_seed(5)
        got = cached(batch)
        assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    # targets always, references only where they are the same picture every time (setting b)
    targets = {i for batch in batches for i in batch["id"]}
    references = {(i, c) for batch in batches for ids, cs in zip(batch["reference_ids"], batch["concepts"])
                  for i, c in zip(ids, cs)}
    assert len(targets) == 3 and cached.cache.hits > 0
    assert cached.cache_references == (setting == "b")
    assert len(cached.cache) == len(targets) + (len(references) if setting == "b" else 0)


def _stripe_starts(min_step: float) -> list[int]:
    """The rows where a striped garment's stripes start, down the middle column of a canvas at the cowboy shots'
    64 px scale."""
    import random

    from training.data.toybooru import ARTISTS, _Canvas, _darker

    canvas = _Canvas(0.45, ARTISTS[0], min_step=min_step)
    canvas.patterned([(0, 0), (100, 0), (100, 150), (0, 150)], (200, 40, 40), "stripes", random.Random(0))
    column = [canvas.rgba.getpixel((canvas.size[0] // 2, y))[:3] for y in range(canvas.size[1])]
    tone = [c == _darker((200, 40, 40), 0.6) for c in column]  # the stripes' tone
    return [y for y in range(1, len(tone)) if tone[y] and not tone[y - 1]]


def test_demo_bold_scene_draws_the_cowboy_shots_with_coarser_patterns_and_pupils(tmp_path):
    cowboy, _ = read_annotations(generate(tmp_path / "cowboy", 40, seed=3, size=64, scene="demo-cowboy"))
    bold, _ = read_annotations(generate(tmp_path / "bold", 40, seed=3, size=64, scene="demo-bold"))
    # the same pictures: clusters, tags, ground truth and head boxes, drawn from the same random numbers
    for a, b in zip(cowboy, bold, strict=True):
        assert (a["cluster"], a["tags"], a["face_bbox"], a["truth"]) == (b["cluster"], b["tags"], b["face_bbox"],
                                                                        b["truth"])
    # a plain outfit differs only in the head box (the pupils); a patterned one also on its garment
    from PIL import Image, ImageChops

    plain = patterned = 0
    for a, b in zip(cowboy, bold):
        diff = ImageChops.difference(Image.open(tmp_path / "cowboy" / a["file"]).convert("RGB"),
                                     Image.open(tmp_path / "bold" / b["file"]).convert("RGB")).getbbox()
        x0, y0, x1, y1 = a["face_bbox"]
        assert diff is not None
        inside = x0 - 1 <= diff[0] and y0 - 1 <= diff[1] and diff[2] <= x1 + 1 and diff[3] <= y1 + 1
        if a["truth"]["pattern"] == "solid":
            plain += 1
            assert inside
        else:
            patterned += 1
            assert diff[3] > y1 + 1  # below the head
    assert plain and patterned
    # the stripes repeat every 8 pixels of a 64 px picture (two cells of its 16 x 16 latent) instead of every 4
    starts = _stripe_starts(8.0)
    assert len(starts) >= 5 and {b - a for a, b in itertools.pairwise(starts)} <= {7, 8, 9}
    starts = _stripe_starts(3.0)
    assert {b - a for a, b in itertools.pairwise(starts)} <= {3, 4, 5}
