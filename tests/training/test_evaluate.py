import csv
import json

import pytest
import torch

from pipelines.components import build_components
from pipelines.retrinet import RetriNetModel, RetriNetPipeline
from training.evaluate import load_eval_set, main, parse_args, summarise


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    c = build_components("tiny", seed=0)
    retrinet = RetriNetModel.from_unet(c["unet"])
    with torch.no_grad():
        for conv in [*retrinet.zero_convs, retrinet.mid_zero_conv]:
            conv.weight.normal_(std=0.05)
    folder = tmp_path_factory.mktemp("pipe") / "pipe"
    RetriNetPipeline(**c, retrinet=retrinet).save_pretrained(folder)
    return folder


@pytest.fixture
def eval_set(toybooru, toybooru_records, tmp_path):
    recs = [r for r in toybooru_records if r["split"] == "test"][:2]
    spec = {"prompts": ["1girl, smiling", "1girl, outdoors"],
            "references": [{"name": r["character"], "images": [{"file": str(toybooru / r["file"]), "concept": "figure"}]}
                           for r in recs],
            "seeds": [0, 1], "samples_per_seed": 2, "num_inference_steps": 2, "height": 32, "width": 32}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(spec))
    return path


def rows(out, name="scores.csv"):
    with open(out / name, newline="") as f:
        return list(csv.DictReader(f))


def test_scores_summary_plot_and_resume(tiny_pipeline, tiny_clip, eval_set, tmp_path):
    args = parse_args(["--pipeline", str(tiny_pipeline), "--eval-set", str(eval_set), "--clip", str(tiny_clip),
                       "--out", str(tmp_path / "out")])
    summary = main(args)
    out = tmp_path / "out"
    table = rows(out)
    assert len(table) == 2 * 2 * 2 * 2  # references x prompts x seeds x samples
    assert len({r["file"] for r in table}) == 16 and all((out / r["file"]).is_file() for r in table)
    assert all(-1 <= float(r["clip_i"]) <= 1 and -1 <= float(r["clip_t"]) <= 1 for r in table)
    assert summary["pictures"] == 16 and summary["VQA"] is None and summary["SWD(VQA, CLIP-I)"] is None
    assert summary["CLIP-I"] == pytest.approx(sum(float(r["clip_i"]) for r in table) / 16)
    md = (out / "summary.md").read_text()
    assert "SWD(CLIP-I, CLIP-T)" in md and (out / "summary.csv").is_file()
    assert (out / "clip_i_vs_clip_t.png").stat().st_size > 1000
    # a rerun scores nothing again; a lost row is scored again
    first = (out / table[0]["file"]).stat().st_mtime_ns
    lines = (out / "scores.csv").read_text().splitlines()
    (out / "scores.csv").write_text("\n".join(lines[:-2]) + "\n")
    main(args)
    again = rows(out)
    assert sorted(r["file"] for r in again) == sorted(r["file"] for r in table)
    assert (out / table[0]["file"]).stat().st_mtime_ns == first


def test_swd_pairs_follow_the_papers_transforms():
    rows = [{"clip_i": "0.8", "clip_t": "0.2", "df_l2": "0.5", "vqa": "0.4"},
            {"clip_i": "0.6", "clip_t": "0.3", "df_l2": "nan", "vqa": ""}]
    s = summarise(rows)
    assert s["SWD(CLIP-I, CLIP-T)"] == pytest.approx((0.8 * 0.2 + 0.6 * 0.3) / 2)
    assert s["SWD(CLIP-T, DF-L2)"] == pytest.approx((0.2 + 1.3) / 0.5)  # only the picture with a face
    assert s["SWD(VQA, DF-L2)"] == pytest.approx((0.4 + 1.0) / 0.5)
    assert s["SWD(VQA, CLIP-I)"] == pytest.approx(0.4 * 0.8)


def test_bad_eval_sets(tmp_path):
    bad = tmp_path / "e.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="needs 'prompts' and 'references'"):
        load_eval_set(bad)
    bad.write_text(json.dumps({"prompts": ["a"], "references": [{"name": "x", "images": [{"file": "no.png",
                                                                                          "concept": "face"}]}]}))
    with pytest.raises(ValueError, match="does not exist"):
        load_eval_set(bad)


def test_two_processes_share_the_pictures_and_merge(tiny_pipeline, tiny_clip, eval_set, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.evaluate",
           "--pipeline", str(tiny_pipeline), "--eval-set", str(eval_set), "--clip", str(tiny_clip), "--out", str(out),
           "--device", "cpu"]
    run = subprocess.run(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    parts = [rows(out, f"scores.rank{i}.csv") for i in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 8  # 8 of the 16 pictures each
    assert {r["file"] for r in parts[0]}.isdisjoint({r["file"] for r in parts[1]})
    assert len(rows(out)) == 16 and (out / "summary.md").is_file()



def test_a_semantica_pipeline_gets_the_few_shot_protocol(toybooru, tiny_pipeline, tmp_path):
    from pipelines.zoo import DEMO_ZOO

    semantica = DEMO_ZOO / "semantica"
    with pytest.raises(SystemExit):
        parse_args(["--pipeline", str(semantica), "--out", str(tmp_path)])  # no --data
    with pytest.raises(SystemExit):
        parse_args(["--pipeline", str(tiny_pipeline), "--out", str(tmp_path)])  # RetriNet: no eval set
    report = main(parse_args(["--pipeline", str(semantica), "--data", str(toybooru), "--out", str(tmp_path),
                              "--groups", "3", "--device", "cpu"]))
    assert report["shots"] == 1 and report["groups"] == 3
    for model in ("semantica", "copy"):
        assert report[model]["fid"] >= 0 and 0 <= report[model]["precision"] <= 1 and 0 <= report[model]["recall"] <= 1
    assert json.loads((tmp_path / "few_shot.json").read_text()) == json.loads(json.dumps(report))
    assert "| copy |" in (tmp_path / "summary.md").read_text()
