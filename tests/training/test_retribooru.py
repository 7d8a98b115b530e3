import json
import logging
import shutil
from collections import Counter

import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from pipelines.concepts import CLOTHES_MAX_HEAD_BOTTOM, concept_box, concept_region
from training.data.retribooru import RetriBooruDataset, collate, prepare_reference, prompt_from_tags, to_tensor


def by_id(records):
    return {r["id"]: r for r in records}


@pytest.fixture
def copy(toybooru, tmp_path):
    """A private copy of the shared Toybooru, for tests that damage it."""
    return shutil.copytree(toybooru, tmp_path / "tb")


def write_set(root, records, size=(60, 90)):
    """A hand-made data set: one red-head, blue-body figure per record."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = []
    for r in records:
        img = Image.new("RGB", size, (0, 200, 0))
        mask = Image.new("L", size, 0)
        x0, y0, x1, y1 = r["face_bbox"]
        ImageDraw.Draw(img).rectangle([10, y1, size[0] - 11, size[1] - 6], fill=(0, 0, 255))
        ImageDraw.Draw(mask).rectangle([10, y1, size[0] - 11, size[1] - 6], fill=255)
        ImageDraw.Draw(img).rectangle([x0, y0, x1 - 1, y1 - 1], fill=(255, 0, 0))
        ImageDraw.Draw(mask).rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
        img.save(root / f"images/{r['id']}.png")
        mask.save(root / f"masks/{r['id']}.png")
        lines.append(json.dumps({"file": f"images/{r['id']}.png", "mask_file": f"masks/{r['id']}.png",
                                 "width": size[0], "height": size[1], "tags": ["1girl", "red_hair"], "split": "train",
                                 **r}))
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("task", ["recon", "compose", "multitask"])
@pytest.mark.parametrize("setting", ["a", "b"])
def test_sample_shapes_and_ranges(toybooru, task, setting):
    ds = RetriBooruDataset(toybooru, "train", task=task, setting=setting, num_references=3, resolution=64)
    s = ds[0]
    assert s["pixel_values"].shape == (3, 64, 64) and s["pixel_values"].dtype == torch.float32
    assert s["pixel_values"].min() >= -1 and s["pixel_values"].max() <= 1
    assert s["reference_pixel_values"].shape == (3, 3, 64, 64)
    assert s["valid_mask"].shape == s["face_mask"].shape == (1, 64, 64)
    assert len(s["concepts"]) == len(s["reference_ids"]) == 3
    assert s["reference_regions"].shape == (3, 4) and s["reference_regions"].dtype == torch.float32
    assert s["task"] in (("recon", "compose") if task == "multitask" else (task,))
    assert s["prompt"].startswith("1girl, solo, ")
    batch = collate([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert batch["reference_pixel_values"].shape == (4, 3, 3, 64, 64)
    assert batch["reference_regions"].shape == (4, 3, 4)
    assert len(batch["concepts"]) == 4 and all(len(c) == 3 for c in batch["concepts"])


def test_setting_b_never_uses_the_target(toybooru, toybooru_records):
    recs = by_id(toybooru_records)
    ds = RetriBooruDataset(toybooru, "train", task="recon", setting="b", num_references=4, resolution=32)
    for i in range(len(ds)):
        s = ds[i]
        assert s["id"] not in s["reference_ids"]
        assert set(s["reference_ids"]) <= set(recs[s["id"]]["similar"])
        # without replacement while the cluster is large enough
        k = min(4, len(recs[s["id"]]["similar"]))
        assert len(set(s["reference_ids"])) == k
        assert s["concepts"] == ["figure"] * 4
        # a figure is its whole picture, padded to a square as the frame is: the whole frame
        assert torch.allclose(s["reference_regions"], torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(4, 4))


def test_setting_a_augments_the_target_itself(toybooru):
    ds = RetriBooruDataset(toybooru, "train", task="recon", setting="a", num_references=4, resolution=64)
    s = ds[2]
    assert s["reference_ids"] == [s["id"]] * 4
    refs = s["reference_pixel_values"]
    # four different augmentations of one picture
    assert all(not torch.equal(refs[0], refs[j]) for j in range(1, 4))


def test_compose_cuts_face_or_clothes_by_the_rules(toybooru, toybooru_records):
    recs = by_id(toybooru_records)
    ds = RetriBooruDataset(toybooru, "train", task="compose", setting="b", num_references=4, resolution=48)
    seen = Counter()
    for i in range(len(ds)):
        s = ds[i]
        for concept, rid, pixels, region in zip(s["concepts"], s["reference_ids"], s["reference_pixel_values"],
                                                s["reference_regions"]):
            seen[concept] += 1
            src = recs[rid]
            low_head = src["face_bbox"][3] > CLOTHES_MAX_HEAD_BOTTOM * src["height"]
            if concept == "figure":
                assert low_head  # only clothes that cannot be cut become figure here
            if concept == "clothes":
                assert not low_head
            image = Image.open(toybooru / src["file"]).convert("RGB")
            mask = Image.open(toybooru / src["mask_file"]).convert("L")
            expected, got = prepare_reference(image, mask, src["face_bbox"], concept, 48)
            assert got == concept
            assert torch.equal(pixels, to_tensor(expected))
            w, h = src["width"], src["height"]
            box = concept_box(concept, src["face_bbox"], w, h, mask)
            assert region.tolist() == pytest.approx(concept_region(box, w, h))
    assert seen["face"] > 0 and seen["clothes"] > 0
    assert 0.35 < seen["face"] / sum(seen.values()) < 0.65


def test_multitask_mixes_both_tasks(toybooru):
    ds = RetriBooruDataset(toybooru, "train", task="multitask", setting="b", resolution=32)
    tasks = Counter(ds[i]["task"] for i in range(len(ds)))
    assert set(tasks) == {"recon", "compose"}
    assert 0.3 < tasks["recon"] / len(ds) < 0.7


def test_valid_area_and_face_masks(tmp_path):
    root = write_set(tmp_path / "ds", [
        {"id": "a", "face_bbox": [20, 5, 40, 30], "similar": ["b"]},
        {"id": "b", "face_bbox": [15, 10, 45, 35], "similar": ["a"]},
    ])
    ds = RetriBooruDataset(root, "train", task="recon", setting="b", num_references=2, resolution=30)
    s = ds[0]
    valid = s["valid_mask"][0]
    # a 60 x 90 picture in a 30 x 30 square: 20 columns wide, centred
    assert valid.sum() == 20 * 30 and valid[:, 5:25].all() and not valid[:, :5].any() and not valid[:, 25:].any()
    face = s["face_mask"][0]
    ys, xs = torch.nonzero(face, as_tuple=True)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (11, 19, 1, 10)
    assert (face <= valid).all()
    # the target keeps its background; its padding is white
    assert torch.allclose(s["pixel_values"][:, 15, 0], torch.ones(3))
    assert s["reference_ids"] == ["b", "b"]  # a cluster of two: the one other picture, twice
    assert s["prompt"] == "1girl, red hair"


def test_same_seed_same_samples_and_epochs_differ(toybooru):
    a = RetriBooruDataset(toybooru, "train", task="multitask", setting="b", resolution=32, seed=7)
    b = RetriBooruDataset(toybooru, "train", task="multitask", setting="b", resolution=32, seed=7)
    for i in (0, 5, 9):
        sa, sb = a[i], b[i]
        assert sa["reference_ids"] == sb["reference_ids"] and sa["concepts"] == sb["concepts"]
        assert torch.equal(sa["reference_pixel_values"], sb["reference_pixel_values"])
    before = [a[i]["reference_ids"] + a[i]["concepts"] for i in range(20)]
    a.set_epoch(1)
    after = [a[i]["reference_ids"] + a[i]["concepts"] for i in range(20)]
    assert before != after


def test_missing_files_broken_lines_and_lonely_records_are_skipped_and_counted(copy, caplog):
    lines = (copy / "annotations.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    train = [r for r in recs if r["split"] == "train"]
    (copy / train[0]["file"]).unlink()
    lines.insert(3, "{not json")
    lonely = dict(train[1], id="lonely", similar=["nobody"])
    bad = dict(train[2], id="bad_box", face_bbox=[5, 5, 5, 5])
    lines += [json.dumps(lonely), json.dumps(bad), json.dumps({"id": "x"})]
    (copy / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        ds = RetriBooruDataset(copy, "train", task="recon", setting="b", resolution=32)
    assert dict(ds.skipped) == {"missing_file": 1, "broken_json": 1, "bad_record": 2, "no_similar": 1}
    assert len(ds) == len(train) - 1  # the missing file's record; lonely is not counted in len(train)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 5 of" in warnings[0].getMessage()
    # under setting a, a record with no similar picture is fine
    assert "lonely" in {r["id"] for r in RetriBooruDataset(copy, "train", setting="a").records}


def test_corrupt_files_are_skipped_during_the_epoch_and_counted_once(copy, caplog):
    ds = RetriBooruDataset(copy, "train", task="compose", setting="b", resolution=32)
    first, second = ds.records[0], ds.records[7]
    (copy / first["file"]).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (copy / second["mask_file"]).write_bytes((copy / second["mask_file"]).read_bytes()[:60])  # truncated
    with caplog.at_level(logging.WARNING):
        ids = []
        for epoch in range(2):
            ds.set_epoch(epoch)
            ids += [i for batch in DataLoader(ds, batch_size=4, collate_fn=collate) for i in batch["id"]]
    assert len(ids) == 2 * len(ds)
    assert first["id"] not in ids and second["id"] not in ids
    assert ds.skipped["corrupt_file"] == 2
    assert len([r for r in caplog.records if "corrupt" in r.getMessage()]) == 1
    for i in range(len(ds)):  # nor do they serve as references any more
        assert not {first["id"], second["id"]} & set(ds[i]["reference_ids"])


def test_all_corrupt_raises_a_clear_error(tmp_path):
    root = write_set(tmp_path / "ds", [
        {"id": "a", "face_bbox": [20, 5, 40, 30], "similar": ["b"]},
        {"id": "b", "face_bbox": [15, 10, 45, 35], "similar": ["a"]},
    ])
    for name in ("a", "b"):
        (root / f"images/{name}.png").write_bytes(b"junk")
    ds = RetriBooruDataset(root, "train", setting="b")
    with pytest.raises(RuntimeError, match="every record is corrupt"):
        ds[0]


@pytest.mark.parametrize("kwargs, match", [
    ({"task": "paint"}, "unknown task"), ({"setting": "c"}, "unknown setting"),
    ({"num_references": 0}, "references"), ({"resolution": 4}, "resolution"), ({"split": "val"}, "no record in split"),
])
def test_bad_arguments(toybooru, kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetriBooruDataset(toybooru, **{"split": "train", **kwargs})


def test_not_a_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations.jsonl"):
        RetriBooruDataset(tmp_path)


def test_prompt_from_tags():
    assert prompt_from_tags(["1girl", "red_hair", "striped_dress"]) == "1girl, red hair, striped dress"
