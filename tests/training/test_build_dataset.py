import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from helpers import kill_when
from training.build_dataset import (DEMO_DETECTOR, cluster, cluster_pairwise, filter_records, main, normalise_record,
                                    parse_args, read_metadata)
from training.data.retribooru import RetriBooruDataset

ROOT = Path(__file__).resolve().parents[2]


def hidden_metadata(toybooru, path, records):
    """What a user has: pictures and tags; the generator's truth stays hidden from the builder."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({"id": r["id"], "file": r["file"], "tags": r["tags"], "character": r["character"],
                                "artist": r["artist"]}) + "\n")
    return path


def purity(out: Path, truth: dict[str, str]) -> float:
    recs = [json.loads(x) for x in (out / "annotations.jsonl").read_text().splitlines()]
    clusters = defaultdict(list)
    for r in recs:
        clusters[r["cluster"]].append(truth[r["id"]])
    return sum(Counter(v).most_common(1)[0][1] for v in clusters.values()) / len(recs)


@pytest.mark.parametrize("seed", range(5))
def test_linear_clustering_equals_algorithm_1(seed):
    rng = random.Random(seed)
    answers = ["red and white", "white and red", "Red and White.", "blue", "blue and black", "green"]
    recs = [{"id": f"r{i}", "character": rng.choice("abc"), "artist": rng.choice("xy"),
             "answers": [rng.choice(answers)] + ([rng.choice(answers)] if seed % 2 else [])} for i in range(120)]
    fast, slow = cluster(recs), cluster_pairwise(recs)
    assert fast == slow
    assert any(fast.values()) and any(not v for v in fast.values())


def test_metadata_shapes_and_filters(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    for name in ("b.jpg", "c.png", "d.png", "e.png", "f.png"):
        (tmp_path / name).write_bytes(b"x")
    raw = [
        {"id": 1, "file_name": "b.jpg", "tag_string_general": "1girl red_dress smile",
         "tag_string_character": "hatsune_miku", "tag_string_artist": "someone"},  # Danbooru's API shape
        {"id": 2, "file": "c.png", "tags": [{"name": "blue_skirt", "category": "0"},
                                            {"name": "rin", "category": "4"}, {"name": "art", "category": "1"}]},
        {"id": 3, "file": "d.png", "tags": ["monochrome", "dress"], "character": "x"},
        {"id": 4, "file": "e.png", "tags": ["dress"], "characters": ["x", "y"]},
        {"id": 5, "file": "f.png", "tags": ["smile"], "character": "x"},
        {"id": 6, "file": "missing.png", "tags": ["dress"], "character": "x"},
        {"id": 1, "file": "b.jpg", "tags": ["dress"], "character": "x"},
        {"file": "b.jpg", "tags": ["dress"], "character": "x"},
        None,
    ]
    kept, dropped = filter_records(raw, tmp_path)
    assert [(r["id"], r["character"], r["artist"]) for r in kept] == [("1", "hatsune_miku", "someone"),
                                                                       ("2", "rin", "art")]
    assert dropped == {"unwanted_tag": 1, "not_one_character": 1, "no_cloth_tag": 1, "missing_file": 1,
                       "duplicate_id": 1, "missing_field": 1, "broken_metadata": 1}
    assert normalise_record({"id": 9, "file_ext": "png", "tag_string_general": "a b"})["file"] == "9.png"
    lines = tmp_path / "m.jsonl"
    lines.write_text('{"id": 1}\n{broken\n[1]\n')
    assert read_metadata(lines) == [{"id": 1}, None, None]


@pytest.fixture(scope="module")
def built(toybooru, toybooru_records, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    meta = hidden_metadata(toybooru, tmp / "meta.jsonl", toybooru_records)
    report = main(parse_args(["--images", str(toybooru), "--metadata", str(meta), "--out", str(tmp / "out"),
                              "--shard-size", "32"]))
    return tmp / "out", report, meta


def test_builds_pure_outfit_clusters_from_pictures_and_tags(tmp_path, capsys):
    from training.data.toybooru import generate

    data = generate(tmp_path / "tb", 400, seed=55, size=128)  # the demo detector's picture size
    records = [json.loads(x) for x in (data / "annotations.jsonl").read_text().splitlines()]
    meta = hidden_metadata(data, tmp_path / "meta.jsonl", records)
    out = tmp_path / "out"
    # the colour stand-in asked for three colours: with the paper's two it reaches about 0.945 here,
    # as outfits of one character that share their two main colours merge
    report = main(parse_args(["--images", str(data), "--metadata", str(meta), "--out", str(out), "--questions",
                              "List top three colors of the character's clothes"]))
    truth = {r["id"]: r["outfit"] for r in records}
    p = purity(out, truth)
    with capsys.disabled():
        print(f"\nbuilder: kept {report['kept']} of {report['input_records']} ({report['kept_share']:.1%}; the paper "
              f"kept {report['paper_kept_share']:.1%}), {report['clusters']} clusters, purity {p:.3f}")
    assert p >= 0.95
    assert report["kept"] + sum(report["dropped"].values()) == report["input_records"] == len(records)
    assert (out / "report.png").stat().st_size > 1000
    ds = RetriBooruDataset(out, split=None, task="compose", setting="b", resolution=32, num_references=2)
    s = ds[0]
    assert s["reference_pixel_values"].shape == (2, 3, 32, 32)
    recs = [json.loads(x) for x in (out / "annotations.jsonl").read_text().splitlines()]
    by = {r["id"]: r for r in recs}
    assert all(r["id"] in by[o]["similar"] for r in recs for o in r["similar"])  # symmetric
    assert not list(out.glob(".work/*.tmp")) and not (out.parent / f".{out.name}.tmp-build").exists()


def test_bad_pictures_and_odd_modes_are_counted_not_fatal(toybooru, toybooru_records, tmp_path):
    images = shutil.copytree(toybooru, tmp_path / "tb")
    recs = toybooru_records[:40]
    Image.open(images / recs[0]["file"]).convert("RGBA").save(images / recs[0]["file"])
    Image.open(images / recs[1]["file"]).convert("P").save(images / recs[1]["file"])
    Image.open(images / recs[2]["file"]).convert("L").save(images / recs[2]["file"])
    (images / recs[3]["file"]).write_bytes(b"\x89PNG broken")
    meta = hidden_metadata(images, tmp_path / "meta.jsonl", recs)
    report = main(parse_args(["--images", str(images), "--metadata", str(meta), "--out", str(tmp_path / "out")]))
    assert report["dropped"]["unreadable"] == 1
    assert report["kept"] + sum(report["dropped"].values()) == 40


def test_killed_build_resumes_to_the_same_output(built, toybooru, tmp_path):
    reference, _, meta = built
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "training.build_dataset", "--images", str(toybooru), "--metadata", str(meta),
           "--out", str(out), "--shard-size", "32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, out / ".work" / "shard-000000.jsonl")
    assert not (out / "annotations.jsonl").exists()
    done = sorted(p.name for p in (out / ".work").glob("shard-*.jsonl"))
    assert 1 <= len(done) < 4
    main(parse_args(cmd[3:]))
    assert (out / "annotations.jsonl").read_text() == (reference / "annotations.jsonl").read_text()


def test_shards_split_between_processes_then_merge(built, toybooru, tmp_path):
    reference, _, meta = built
    base = ["--images", str(toybooru), "--metadata", str(meta), "--out", str(tmp_path / "out"), "--shard-size", "32"]
    assert main(parse_args(base + ["--num-shards", "2", "--shard-index", "1"])) is None
    assert sorted(p.name for p in (tmp_path / "out" / ".work").glob("shard-*")) == ["shard-000001.jsonl",
                                                                                  "shard-000003.jsonl"]
    assert main(parse_args(base + ["--num-shards", "2", "--shard-index", "0"])) is None
    main(parse_args(base))  # merges; nothing left to annotate
    assert (tmp_path / "out" / "annotations.jsonl").read_text() == (reference / "annotations.jsonl").read_text()
    with pytest.raises(ValueError, match="other inputs or options"):
        main(parse_args(base[:-1] + ["16"]))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        main(parse_args(["--images", str(tmp_path / "x"), "--metadata", "m", "--out", str(tmp_path / "o")]))
    with pytest.raises(SystemExit):
        parse_args(["--images", "i", "--metadata", "m", "--out", "o", "--num-shards", "2"])


def test_demo_detector_is_the_default():
    assert parse_args(["--images", "i", "--metadata", "m", "--out", "o"]).detector == str(DEMO_DETECTOR)
