import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.semantica import SemanticaPipeline, load_image_encoder
from training.core import list_checkpoints, read_metrics
from training.data import pairs as pairs_module
from training.data.pairs import (
    CACHE_FILE,
    PairDataset,
    embed_pictures,
    filter_pairs,
    folder_pictures,
    list_pictures,
    make_pair_dataset,
    retribooru_pictures,
)
from training.train_semantica import main, parse_args

ROOT = Path(__file__).resolve().parents[2]


def argv(tiny_sd, tiny_clip, data, out, *extra):
    return ["--pretrained", str(tiny_sd), "--image-encoder", str(tiny_clip), "--data", str(data), "--output-dir",
            str(out), "--resolution", "32", "--train-batch-size", "2", "--checkpointing-steps", "100",
            *map(str, extra)]


def losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl")}


@pytest.fixture(scope="module")
def encoder(tiny_clip):
    return load_image_encoder(str(tiny_clip))


@pytest.fixture(scope="module")
def group_folder(toybooru, tmp_path_factory):
    """Toybooru's train pictures as ``character/picture.png`` files."""
    root = tmp_path_factory.mktemp("groups") / "groups"
    for r in (json.loads(x) for x in (toybooru / "annotations.jsonl").read_text().splitlines()):
        if r["split"] == "train":
            (root / r["character"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(toybooru / r["file"], root / r["character"] / f"{r['id']}.png")
    return root


# ---------------------------------------------------------------------------- the pairs

def test_the_filter_keeps_exactly_the_pairs_inside_the_thresholds():
    # vectors at known angles from e0, some a hair inside or outside the bounds
    eps = 1e-6
    cosines = [1.0, 0.9 + eps, 0.9 - eps, 0.6, 0.3 + eps, 0.3 - eps, -0.5]
    feats = torch.zeros(8, 2)
    feats[0] = torch.tensor([1.0, 0.0])
    for i, c in enumerate(cosines, 1):
        feats[i] = torch.tensor([c, (1 - c * c) ** 0.5]) * (i + 1)  # the length does not matter
    pairs = [(0, i) for i in range(1, 8)]
    kept, report = filter_pairs(pairs, feats, 0.3, 0.9)
    assert kept == [(0, 3), (0, 4), (0, 5)]
    assert filter_pairs([(0, 0)], feats, 0.3, 1.0)[0] == [(0, 0)]  # the bounds are inside
    assert report == {"candidate_pairs": 7, "unreadable": 0, "below_min_similarity": 2, "above_max_similarity": 2,
                      "kept_pairs": 3}
    readable = torch.ones(8, dtype=torch.bool)
    readable[4] = False
    kept, report = filter_pairs(pairs, feats, 0.3, 0.9, readable)
    assert kept == [(0, 3), (0, 5)] and report["unreadable"] == 1
    assert filter_pairs(pairs, feats, -1.0, 1.0)[0] == pairs
    with pytest.raises(ValueError, match="-1 <= min <= max <= 1"):
        filter_pairs(pairs, feats, 0.9, 0.3)


def test_retribooru_groups_are_characters_and_similar_lists(toybooru, toybooru_records, tmp_path):
    pictures, pairs = retribooru_pictures(toybooru, "train")
    train = [r for r in toybooru_records if r["split"] == "train"]
    sizes = Counter(r["character"] for r in train)
    assert len(pictures) == len(train)
    assert len(pairs) == sum(n * (n - 1) // 2 for n in sizes.values())
    assert all(pictures[a].group == pictures[b].group and a < b for a, b in pairs)
    # without a character, the similar lists alone make the groups (either direction)
    folder = tmp_path / "tb"
    shutil.copytree(toybooru, folder)
    recs = [{k: v for k, v in r.items() if k != "character"} for r in toybooru_records]
    (folder / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    pictures, pairs = retribooru_pictures(folder, None)
    index = {p.id: i for i, p in enumerate(pictures)}
    want = {tuple(sorted((index[r["id"]], index[s]))) for r in recs for s in r["similar"] if s in index}
    assert set(pairs) == want
    with pytest.raises(ValueError, match="no record in split 'val'"):
        retribooru_pictures(toybooru, "val")


def test_group_folders_and_bad_folders(group_folder, tmp_path):
    pictures, pairs = folder_pictures(group_folder)
    sizes = Counter(p.group for p in pictures)
    assert len(pairs) == sum(n * (n - 1) // 2 for n in sizes.values())
    assert pictures[0].id == f"{pictures[0].group}/{pictures[0].path.name}"
    # a split sub-folder is used when there is one
    (tmp_path / "split" / "train").mkdir(parents=True)
    shutil.copytree(group_folder / min(sizes), tmp_path / "split" / "train" / "g")
    assert len(list_pictures(tmp_path / "split", "train")[0]) == sizes[min(sizes)]
    with pytest.raises(ValueError, match="is not a folder"):
        list_pictures(tmp_path / "missing", None)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="has no group folders; expected .*<group>/<picture>"):
        list_pictures(tmp_path / "flat", None)
    for g in ("a", "b"):
        (tmp_path / "lonely" / g).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "lonely" / g / "x.png")
        (tmp_path / "lonely" / g / "notes.txt").write_text("not a picture")
    with pytest.raises(ValueError, match="no group folder of .* holds two pictures"):
        list_pictures(tmp_path / "lonely", None)


def test_embeddings_are_batched_cached_and_keyed(group_folder, encoder, tmp_path, monkeypatch):
    enc, processor = encoder
    pictures, _ = folder_pictures(group_folder)
    pictures = pictures[:10]
    calls = []
    real = pairs_module.image_features
    monkeypatch.setattr(pairs_module, "image_features", lambda e, p, ims, batch_size: calls.append(len(ims)) or
                        real(e, p, ims, batch_size))
    feats, readable = embed_pictures(pictures, enc, processor, tmp_path, batch_size=4)
    assert calls == [4, 4, 2] and (tmp_path / CACHE_FILE).is_file() and readable.all()
    assert torch.allclose(feats.norm(dim=-1), torch.ones(10), atol=1e-5)
    again, _ = embed_pictures(pictures, enc, processor, tmp_path, batch_size=4)
    assert calls == [4, 4, 2] and torch.equal(again, feats)  # read from the cache
    with torch.no_grad():
        p = next(enc.parameters())
        p.add_(0.1)
        try:
            embed_pictures(pictures, enc, processor, tmp_path, batch_size=4)  # other weights: computed again
        finally:
            p.sub_(0.1)
    assert len(calls) == 6
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    extra = [*pictures[:3], pairs_module.Picture("x/broken.png", broken, "x")]
    _, readable = embed_pictures(extra, enc, processor, None, batch_size=4)
    assert readable.tolist() == [True, True, True, False]


def test_pair_dataset_is_deterministic_and_draws_kept_partners(toybooru, encoder, tmp_path):
    enc, processor = encoder
    ds, report = make_pair_dataset(toybooru, "train", enc, processor, 32, 0.3, 0.9, cache_dir=tmp_path)
    assert report["kept_pairs"] + report["below_min_similarity"] + report["above_max_similarity"] == \
        report["candidate_pairs"] == 1104
    assert report["targets"] == len(ds) and 0 < len(ds) <= report["pictures"] == 88
    s = ds[0]
    assert s["pixel_values"].shape == (3, 32, 32) and s["condition_pixel_values"].shape == (3, 32, 32)
    assert -1 <= s["pixel_values"].min() and s["pixel_values"].max() <= 1
    by_id = {p.id: i for i, p in enumerate(ds.pictures)}
    for i in range(len(ds)):
        item = ds[i]
        t, c = by_id[item["id"]], by_id[item["condition_id"]]
        assert t != c and c in ds.partners[t] and ds.pictures[t].group == ds.pictures[c].group
    assert [ds[i]["condition_id"] for i in range(5)] == [ds[i]["condition_id"] for i in range(5)]
    draws = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        draws.add(tuple(ds[i]["condition_id"] for i in range(len(ds))))
    assert len(draws) > 1  # another epoch, other partners
    with pytest.raises(ValueError, match="no pair left with a similarity in"):
        make_pair_dataset(toybooru, "train", enc, processor, 32, 0.9999, 1.0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no pair to train on"):
        PairDataset(ds.pictures, [], processor, 32)


# ---------------------------------------------------------------------------- training

def test_trains_checkpoints_and_saves_a_loadable_pipeline(tiny_sd, tiny_clip, toybooru, tmp_path):
    result = main(parse_args(argv(tiny_sd, tiny_clip, toybooru, tmp_path, "--max-train-steps", 3,
                                  "--checkpointing-steps", 2, "--validation-steps", 3, "--num-validation-images", 2,
                                  "--validation-inference-steps", 2)))
    assert result["global_step"] == 3 and result["output_dir"] == str(tmp_path)
    report = result["pairs"]
    assert report["candidate_pairs"] == 1104 and report["kept_pairs"] > 0 and report["min_similarity"] == 0.3
    m = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in m] == [1, 2, 3] and all(r["loss"] > 0 for r in m)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert (tmp_path / CACHE_FILE).is_file()
    assert Image.open(tmp_path / "validation" / "step-000003.png").size == (3 * 32, 32)
    assert f"{report['kept_pairs']} kept of 1104" in (tmp_path / "README.md").read_text()
    pipe = SemanticaPipeline.from_pretrained(tmp_path / "semantica")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.conditioner.config.conditioning == "tokens" and pipe.unet.config.cross_attention_dim == 32
    images = pipe(Image.open(toybooru / "images" / "tb0003_000000.png"), num_images_per_prompt=2,
                  num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and all(im.size == (32, 32) for im in images)


def test_resume_reproduces_the_uninterrupted_run(tiny_sd, tiny_clip, toybooru, tmp_path):
    common = ["--checkpointing-steps", 2, "--conditioning-dropout", 0.5]
    full, part = tmp_path / "full", tmp_path / "part"
    main(parse_args(argv(tiny_sd, tiny_clip, toybooru, full, "--max-train-steps", 4, *common)))
    main(parse_args(argv(tiny_sd, tiny_clip, toybooru, part, "--max-train-steps", 2, *common)))
    main(parse_args(argv(tiny_sd, tiny_clip, toybooru, part, "--max-train-steps", 4, *common,
                         "--resume-from-checkpoint", "latest")))
    a, b = losses(full), losses(part)
    assert sorted(b) == [1, 2, 3, 4] and all(abs(a[s] - b[s]) < 1e-6 for s in a)
    pa = SemanticaPipeline.from_pretrained(full / "semantica")
    pb = SemanticaPipeline.from_pretrained(part / "semantica")
    for name in ("unet", "conditioner"):
        sa, sb = getattr(pa, name).state_dict(), getattr(pb, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa), name
    u0 = SemanticaPipeline.from_pretrained(full / "semantica").unet.state_dict()
    from diffusers import UNet2DConditionModel

    start = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    assert any(not torch.equal(start[k], u0[k]) for k in start)  # it did train
    # a resume with other thresholds finds other pairs: refused
    with pytest.raises(ValueError, match="does not fit this run"):
        main(parse_args(argv(tiny_sd, tiny_clip, toybooru, part, "--max-train-steps", 5, *common,
                             "--max-similarity", 0.95, "--resume-from-checkpoint", "latest")))


def test_global_token_option_trains_and_runs(tiny_sd, tiny_clip, group_folder, tmp_path):
    result = main(parse_args(argv(tiny_sd, tiny_clip, group_folder, tmp_path, "--max-train-steps", 2,
                                  "--conditioning", "global", "--unconditional", "zero", "--split", "none")))
    assert result["global_step"] == 2 and result["pairs"]["groups"] == 5
    pipe = SemanticaPipeline.from_pretrained(tmp_path / "semantica")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.class_embed_type == "identity" and pipe.conditioner.config.conditioning == "global"
    assert pipe.conditioner.global_proj.weight.abs().sum() > 0  # it left zero
    first = min(group_folder.iterdir())
    images = pipe(Image.open(next(first.iterdir())), num_inference_steps=2, guidance_scale=1.0,
                  output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_clear_errors_before_training(tiny_sd, tiny_clip, toybooru, tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        main(parse_args(argv(tiny_sd, tiny_clip, tmp_path / "nothing", tmp_path / "o1", "--max-train-steps", 1)))
    with pytest.raises(ValueError, match="cannot load the image encoder"):
        main(parse_args(argv(tiny_sd, tmp_path / "no-encoder", toybooru, tmp_path / "o2", "--max-train-steps", 1)))
    with pytest.raises(ValueError, match="cannot load the base model"):
        main(parse_args(argv(tmp_path / "no-model", tiny_clip, toybooru, tmp_path / "o3", "--max-train-steps", 1)))
    with pytest.raises(ValueError, match="no pair left"):
        main(parse_args(argv(tiny_sd, tiny_clip, toybooru, tmp_path / "o4", "--max-train-steps", 1,
                             "--min-similarity", 0.99999, "--max-similarity", 1.0)))
    for bad in (["--conditioning", "film"], ["--min-similarity", 0.9, "--max-similarity", 0.3],
                ["--max-similarity", 1.5], ["--conditioning-dropout", 1.5], ["--unconditional", "noise"],
                ["--resolution", 0]):
        with pytest.raises(SystemExit):
            parse_args(argv(tiny_sd, tiny_clip, toybooru, tmp_path / "o5", *bad))
    args = parse_args(argv(tiny_sd, tiny_clip, toybooru, tmp_path / "o6"))
    assert (args.min_similarity, args.max_similarity, args.conditioning_dropout, args.conditioning) == \
        (0.3, 0.9, 0.1, "tokens")


@pytest.mark.slow
def test_two_processes_write_one_set_of_outputs(tiny_sd, tiny_clip, toybooru, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "training.train_semantica", *argv(tiny_sd, tiny_clip, toybooru, out, "--max-train-steps", 3,
                                                   "--checkpointing-steps", 2)]
    run = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 process(es)" in run.stderr
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoint-2").glob("random_states_*.pkl")) == \
        ["random_states_0.pkl", "random_states_1.pkl"]
    SemanticaPipeline.from_pretrained(out / "semantica")
    assert not list(out.glob(".checkpoint-*"))


def test_use_ema_saves_the_average(tiny_sd, tiny_clip, toybooru, tmp_path):
    from safetensors.torch import load_file

    main(parse_args(argv(tiny_sd, tiny_clip, toybooru, tmp_path, "--max-train-steps", 2, "--checkpointing-steps", 1,
                         "--use-ema", "--ema-decay", "0.5", "--learning-rate", "1e-2")))
    d = min(0.5, 2 / 11)  # diffusers' warm-up at the second step (the first copies the weights)
    first, second = (load_file(tmp_path / f"checkpoint-{k}" / "model.safetensors") for k in (1, 2))
    shipped = SemanticaPipeline.from_pretrained(tmp_path / "semantica").unet.state_dict()
    trained = [n for n in second if not torch.equal(first[n], second[n])]
    assert trained and set(trained) <= set(shipped)
    for name in trained:
        torch.testing.assert_close(shipped[name], d * first[name] + (1 - d) * second[name], rtol=1e-5, atol=1e-6)
