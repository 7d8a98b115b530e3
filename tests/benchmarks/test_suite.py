"""The benchmark suite runs in quick mode and reports every benchmark's fields (not its figures), into a
temporary file: the repository's BENCHMARKS.md is never touched by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.__main__ import BENCHMARKS, compose_file, read_blocks

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {
    "data": {"toybooru", "loader"},
    "retrinet_step": {"tables"},
    "sweep": {"ratio", "ratio_unscored", "studio_s", "single_s", "nocache_s", "scoring_share", "cache"},
    "optimise": {"rows", "threads"},
    "concepts": {"head_iou", "mask_iou", "rule_accuracy", "ms_per_picture"},
    "cluster": {"rows"},
    "metrics": {"pictures_per_second", "seconds_per_5000"},
    "compose": {"median_seconds", "first_seconds", "load_seconds", "two_threads_median_seconds"},
    "training": {"sps", "efficiency", "peak_worker_rss"},
    "studio": {"page_s", "import_floor_s", "first_picture_s", "sweep_s", "peak_rss"},
    "memory": {"demo_training", "composition", "training"},
}
SUMMARY_KEYS = {"figure", "value", "goal", "met", "why"}


def _env():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "YOLO_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out, results = tmp / "BENCHMARKS.md", tmp / "results.json"
    before = (ROOT / "BENCHMARKS.md").read_bytes()
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--json", str(results)],
                         check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1200)
    seconds = time.perf_counter() - t0
    print(f"python -m benchmarks --quick: {seconds:.0f} s")
    print("\n".join(line for line in run.stderr.splitlines() if line.startswith("[benchmarks]")))
    assert run.returncode == 0, run.stderr[-5000:]
    assert (ROOT / "BENCHMARKS.md").read_bytes() == before, "the quick run wrote the repository's BENCHMARKS.md"
    return out, json.loads(results.read_text()), seconds


@pytest.mark.slow  # python -m benchmarks --quick: a few minutes (CI runs the slow tests too)
def test_every_benchmark_runs_and_reports_its_fields(quick_run):
    _, results, _ = quick_run
    assert set(results) == set(BENCHMARKS)
    for name, fields in FIELDS.items():
        r = results[name]
        assert "error" not in r, f"{name}: {r.get('error')}"
        assert fields <= set(r), f"{name} lacks {sorted(fields - set(r))}"
        assert r["quick"] is True and r["seconds"] > 0 and {"cpu", "cores", "torch", "date"} <= set(r["machine"])
        assert r["summary"], f"{name} reports no figure against a goal or an anchor"
        for line in r["summary"]:
            assert set(line) == SUMMARY_KEYS and line["value"], (name, line)
            if line["met"] is False:
                assert line["why"], f"{name}: {line['figure']} misses its goal without saying why"
    step = results["retrinet_step"]["tables"][0]["rows"]
    assert {(r["N"], r["batch"]) for r in step} == {(1, 1), (1, 8), (4, 1), (4, 8)}
    assert all("measured" in r and "predicted" in r for r in step)
    assert set(results["training"]["sps"]) >= {"1x1", "2x1"}
    assert [r["records"] for r in results["cluster"]["rows"]] == [1000, 10000, 100000]


@pytest.mark.slow  # python -m benchmarks --quick: a few minutes (CI runs the slow tests too)
def test_the_file_holds_every_section_with_its_machine_and_summary(quick_run):
    out, results, _ = quick_run
    text = out.read_text()
    blocks = read_blocks(out)
    for name in BENCHMARKS:
        summary, body = blocks[("benchmark", name)]
        assert body.startswith("## ") and "Quick mode" in body and results[name]["machine"]["cpu"] in body, name
        assert summary == results[name]["summary"]
    for note in ("builder", "demo-training", "ci"):
        assert ("notes", note) in blocks
    assert text.startswith("# Benchmarks") and "## Figures against their goals" in text


@pytest.mark.slow  # python -m benchmarks --quick: a few minutes (CI runs the slow tests too)
def test_only_reruns_one_section_and_keeps_the_others(quick_run, tmp_path):
    out, _, _ = quick_run
    again = tmp_path / "B.md"
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "cluster", "--base", str(out),
                          "--out", str(again)], check=False, cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    old, new = read_blocks(out), read_blocks(again)
    assert set(old) == set(new)
    for key in old:
        if key != ("benchmark", "cluster"):
            assert new[key] == old[key], key


def test_blocks_survive_a_round_trip_even_with_double_dashes(tmp_path):
    blocks = {("benchmark", "sweep"): ([{"figure": "a --flag", "value": "1", "goal": "2", "met": False,
                                         "why": "x -- y"}], "## Sweep\n\nbody with `--lock none`")}
    machine = {"date": "2026-01-01", "cpu": "cpu", "cores": 2, "torch": "2"}
    path = tmp_path / "B.md"
    path.write_text(compose_file(blocks, machine, quick=False))
    assert "x -- y" in path.read_text()  # in the table of figures
    assert read_blocks(path)[("benchmark", "sweep")] == blocks[("benchmark", "sweep")]
    assert "Not measured yet" in read_blocks(path)[("benchmark", "data")][1]
