"""The sweep (``studio.sweep``), its tab's handlers and ``/sweep`` through gradio_client, on the tiny family."""

from __future__ import annotations

import csv
import threading

import gradio as gr
import pytest
from helpers import Progress, serve
from PIL import Image

from studio import compose_tab, sweep_tab
from studio.engine import ComposeRequest
from studio.sweep import COLUMNS, METRICS, SWD_PAIRS, SweepRequest, parse_values, plan, run, write_csv

STEPS = 2


def request(files, **kw) -> SweepRequest:
    args = {"guidance": "2, 4", "retrieval_scales": "0.5, 1", "seeds": 2, "seed": 7, "steps": STEPS,
            "prompt": "a girl", "references": [(files[0], "face"), (files[1], "clothes")], "width": 32, "height": 32}
    return SweepRequest(**{**args, **kw})


@pytest.fixture(scope="module")
def sweep(engine, files):
    engine.models.retrinet().retrieval_cache.clear()  # the tiny family is shared by the session's tests
    return run(engine, request(files))


def test_values_are_parsed_checked_and_deduplicated():
    assert parse_values("guidance", "3, 5 7;5", 0, 50) == [3.0, 5.0, 7.0]
    assert parse_values("guidance", [1, 2.5], 0, 50) == [1.0, 2.5]
    assert parse_values("guidance", 4, 0, 50) == [4.0]
    for bad, message in (("", "at least one"), ("3, x", "'x' is not a number"), ("-1", "outside"),
                         ("nan", "finite"), ("1 2 3 4 5 6 7 8 9", "at most 8")):
        with pytest.raises(ValueError, match=message):
            parse_values("guidance", bad, 0, 50)


@pytest.mark.parametrize(("change", "message"), [
    ({"model": "dalle"}, "unknown model"),
    ({"guidance": "1 2 3 4 5 6 7", "retrieval_scales": "1 2 3 4 5 6"}, "42 cells, at most 36"),
    ({"references": []}, "no reference given"),
    ({"references": [("x.png", "hat")]}, "reference 1 must be"),
    ({"seeds": 0}, "seeds per cell 0"),
    ({"steps": 1000}, "steps 1000"),
    ({"best_by": "beauty"}, "best_by 'beauty'"),
    ({"retrieval_scales": "0.5, 11"}, "retrieval scale 11"),
    ({"model": "semantica", "image": None}, "picture: no picture given"),
])
def test_a_bad_request_fails_before_any_picture_is_made(engine, files, change, message):
    with pytest.raises(ValueError, match=message):
        plan(engine, request(files, **change))


def test_a_2x2_sweep_scores_every_cell_and_shares_the_reference_features(engine, files, sweep):
    assert [(c.guidance, c.retrieval_scale) for c in sweep.done] == [(2.0, 0.5), (2.0, 1.0), (4.0, 0.5), (4.0, 1.0)]
    rows = sweep.rows()
    assert [r["cell"] for r in rows] == [1, 2, 3, 4] and all(r["pictures"] == 2 for r in rows)
    for cell in sweep.done:
        assert set(cell.summary) == {*METRICS, *SWD_PAIRS}
        for m in ("CLIP-I", "CLIP-T", "VQA", "SWD(CLIP-I, CLIP-T)", "SWD(VQA, CLIP-I)"):
            assert isinstance(cell.summary[m], float), m
        assert [p.seed for p in cell.pictures] == [7, 8]  # the same seeds in every cell
        # the cell's SWD is the mean of the products of its pictures' scores (seed 000, Sec. 4)
        scores = cell.scores
        assert cell.summary["SWD(CLIP-I, CLIP-T)"] == pytest.approx(
            sum(s["CLIP-I"] * s["CLIP-T"] for s in scores) / len(scores))
    assert sweep.vqa == "colour stand-in"
    # the retrieval encoder ran for the first cell's timesteps only; the other cells read the cache
    assert sweep.cache == {"misses": STEPS, "hits": 3 * STEPS}
    again = run(engine, request(files, guidance="3", retrieval_scales="2"))  # new settings, the same references
    assert again.cache == {"misses": 0, "hits": STEPS}


def test_a_cell_is_the_composition_it_names(engine, files, sweep):
    cell = sweep.done[3]
    out = engine.compose(ComposeRequest("a girl", [(files[0], "face"), (files[1], "clothes")], steps=STEPS,
                                        guidance=4.0, retrieval_scale=1.0, seed=7, num_images=2, width=32, height=32))
    for a, b in zip(cell.pictures, out.pictures):
        assert list(a.image.getdata()) == list(b.image.getdata())
    assert cell.pictures[0].settings["retrieval_scale"] == 1.0 and cell.pictures[0].settings["guidance"] == 4.0


def test_the_best_cell_is_the_highest_by_the_chosen_measure(sweep):
    by = "SWD(CLIP-I, CLIP-T)"
    assert sweep.best(by).summary[by] == max(c.summary[by] for c in sweep.done)
    assert sweep.best("DF-L2") is None or sweep.best("DF-L2").summary["DF-L2"] == min(
        c.summary["DF-L2"] for c in sweep.done if c.summary["DF-L2"] is not None)


def test_stop_keeps_the_cells_done(engine, files):
    sweep, runner = plan(engine, request(files))
    stop = threading.Event()
    for cell in runner(stop):
        stop.set()  # the user presses Stop while the first cell is shown
    assert len(sweep.done) == 1 and len(sweep.cells) == 4


def test_the_csv_is_the_table(sweep, tmp_path):
    path = write_csv(sweep.rows(), tmp_path / "sweep.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COLUMNS) and len(rows) == 4
    assert float(rows[2]["CLIP-I"]) == pytest.approx(sweep.done[2].summary["CLIP-I"])
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_a_semantica_sweep_has_one_axis(engine, files):
    sweep = run(engine, SweepRequest(model="semantica", guidance="0, 1, 2", seeds=1, seed=3, steps=STEPS,
                                     image=files[0], retrieval_scales="not read", width=32, height=32))
    assert [(c.guidance, c.retrieval_scale) for c in sweep.done] == [(0.0, None), (1.0, None), (2.0, None)]
    assert sweep.best_by == "SWD(VQA, CLIP-I)"
    assert all(c.summary["CLIP-T"] is None and isinstance(c.summary["CLIP-I"], float) for c in sweep.done)
    assert "retrieval scale" not in sweep_tab.table(sweep).columns


def test_the_tab_streams_table_plots_and_csv_cell_by_cell(engine, files):
    items, _ = compose_tab.add_pictures(engine, files[:2], [])
    progress = Progress()
    updates = list(sweep_tab.run_sweep(engine, "retrinet", items, "a girl", "", None, "2, 4", "0.5, 1", 1, STEPS, 0,
                                       "SWD(CLIP-I, CLIP-T)", progress=progress))
    assert len(updates) == 5  # the empty table, then one update per cell
    sizes = [len(u[2]) for u in updates]
    assert sizes == [0, 1, 2, 3, 4]
    status, gallery, table, curve, scatter, csv_path = updates[-1]
    assert status.startswith("**Done: 4 of 4 cells**") and "Best by SWD(CLIP-I, CLIP-T)" in status
    assert len(gallery) == 4 and gallery[0][1] == "g 2, s 0.5, seed 0"
    assert (table["best"] == "★").sum() == 1
    starred = table.loc[table["best"] == "★", "SWD(CLIP-I, CLIP-T)"].item()
    assert starred == table["SWD(CLIP-I, CLIP-T)"].max()
    lines = curve.axes[0].get_lines()  # one line per guidance, two scales each, and the best cell ringed
    assert [line.get_label() for line in lines] == ["guidance 2", "guidance 4"]
    assert [list(line.get_xdata()) for line in lines] == [[0.5, 1.0], [0.5, 1.0]]
    assert sorted(y for line in lines for y in line.get_ydata()) == sorted(table["SWD(CLIP-I, CLIP-T)"].round(4)) \
        or len(lines[0].get_ydata()) == 2
    ringed = curve.axes[0].collections[-1].get_offsets()[0]
    assert ringed[1] == pytest.approx(starred, abs=1e-4)
    assert len(scatter.axes[0].collections) == 4  # one point per cell
    with open(csv_path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert progress.calls[-1] == (4 * STEPS, 4 * STEPS)
    with pytest.raises(gr.Error, match="no reference given"):
        next(sweep_tab.run_sweep(engine, "retrinet", [], "a girl", "", None, "2", "1", 1, STEPS, 0, None,
                                 progress=progress))


def test_served_sweep_endpoint_returns_one_row_per_cell(engine, files):
    from gradio_client import Client, handle_file

    with serve(engine) as url:
        client = Client(url, verbose=False)
        refs = [handle_file(f) for f in files[:2]]
        out = client.predict("retrinet", "a girl", refs, ["face", "clothes"], None, "2, 4", "0.5, 1", 1, STEPS, 3,
                             api_name="/sweep")
        headers, data = out["headers"], out["data"]
        assert len(data) == 4 and [row[headers.index("cell")] for row in data] == [1, 2, 3, 4]
        for name in ("CLIP-I", "CLIP-T", "VQA", *SWD_PAIRS[:3]):
            assert name in headers
        for row in data:
            for name in ("CLIP-I", "CLIP-T", "VQA", "SWD(CLIP-I, CLIP-T)"):
                assert isinstance(row[headers.index(name)], float), name
        variations = client.predict("semantica", "", None, None, handle_file(files[0]), "0, 1", "", 1, STEPS, 3,
                                    api_name="/sweep")
        assert len(variations["data"]) == 2 and "retrieval scale" not in variations["headers"]
        with pytest.raises(Exception, match="not a number"):
            client.predict("retrinet", "a girl", refs, ["face", "clothes"], None, "2, x", "1", 1, STEPS, 3,
                           api_name="/sweep")
    assert Image.open(files[0]).size == (96, 96)


def test_the_stop_button_ends_the_sessions_sweep_after_its_cell(engine, files):
    from types import SimpleNamespace

    items, _ = compose_tab.add_pictures(engine, files[:2], [])
    mine, other = SimpleNamespace(session_hash="mine"), SimpleNamespace(session_hash="other")
    run = sweep_tab.run_sweep(engine, "retrinet", items, "a girl", "", None, "2, 4", "0.5, 1", 1, STEPS, 0, None,
                              request=mine, progress=Progress())
    first, one_cell = next(run), next(run)
    assert first[0].startswith("**Running: 0 of 4") and one_cell[0].startswith("**Running: 1 of 4")
    sweep_tab.stop_sweep(other)  # another user's Stop does not touch this sweep
    assert next(run)[0].startswith("**Running: 2 of 4")
    sweep_tab.stop_sweep(mine)
    rest = list(run)
    assert len(rest) == 1 and rest[0][0].startswith("**Stopped: 2 of 4 cells**")
    assert len(rest[0][2]) == 2  # the table keeps the cells done
    sweep_tab.stop_sweep(mine)  # nothing running: nothing happens
