import subprocess
import sys

import gradio as gr
import pytest
from helpers import serve

from studio import data_tab
from studio.engine import Engine, RecordRequest


@pytest.fixture
def engine(toybooru):
    return Engine(data=str(toybooru))


def test_record_view_has_the_crops_the_loader_makes(engine, toybooru, toybooru_records):
    low = next(i for i, r in enumerate(toybooru_records) if r["face_bbox"][3] > 2 / 3 * r["height"])
    view = engine.record(RecordRequest(str(toybooru), low, "all", crop_size=64))
    assert view.record["id"] == toybooru_records[low]["id"]
    assert [c for _, c in view.crops][0] == "face" and view.crops[2][1] == "figure"
    assert view.crops[1][1].startswith("clothes -> figure")
    assert all(im.size == (64, 64) for im, _ in view.crops)
    assert [sid for _, sid in view.similar] == view.record["similar"]
    assert view.image.size == view.mask.size == (96, 96)
    normal = next(i for i, r in enumerate(toybooru_records) if r["face_bbox"][3] < r["height"] / 2)
    assert engine.record(RecordRequest(str(toybooru), normal)).crops[1][1] == "clothes"


def test_splits_index_within_the_split(engine, toybooru, toybooru_records):
    test_ids = [r["id"] for r in toybooru_records if r["split"] == "test"]
    view = engine.record(RecordRequest(str(toybooru), 1, "test"))
    assert view.record["id"] == test_ids[1] and view.count == len(test_ids)
    info = engine.dataset_info(str(toybooru))
    assert info.num_records == 120 and sum(info.splits.values()) == 120
    assert info.num_clusters == len({r["cluster"] for r in toybooru_records})


@pytest.mark.parametrize("req, match", [
    (RecordRequest("", 0), "no data set"), (RecordRequest("/nonexistent/folder", 0), "not a folder"),
    (RecordRequest("{tb}", 500), "does not exist"), (RecordRequest("{tb}", 0, "val"), "no split"),
    (RecordRequest("{tb}", 0, crop_size=5000), "crop size"),
])
def test_bad_requests_raise_value_error(engine, toybooru, req, match):
    req = RecordRequest(req.path.replace("{tb}", str(toybooru)), req.index, req.split, req.crop_size)
    with pytest.raises(ValueError, match=match):
        engine.record(req)


def test_folder_without_annotations(engine, tmp_path):
    with pytest.raises(ValueError, match="annotations.jsonl"):
        engine.dataset_info(str(tmp_path))


def test_handlers_turn_errors_into_gr_error(engine, toybooru):
    n_train = engine.dataset_info(str(toybooru)).splits["train"]
    summary, split, slider, count = data_tab.open_dataset(engine, str(toybooru), "train")
    assert "**120** pictures" in summary and count == n_train and split.value == "train"
    assert [c[0] for c in split.choices] == ["all", "test", "train"] and slider.maximum == n_train - 1
    title, annotated, crops, tags, similar, rec = data_tab.show_record(engine, str(toybooru), "train", 0)
    image, layers = annotated
    assert [label for _, label in layers] == ["figure", "head box"]
    assert layers[0][0].shape == (96, 96) and layers[0][0].max() == 1.0
    assert {c for _, c in tags} == {"cloth", "tag"}
    with pytest.raises(gr.Error):
        data_tab.show_record(engine, str(toybooru), "train", 10_000)
    with pytest.raises(gr.Error):
        data_tab.open_dataset(engine, "/nonexistent", "all")
    assert data_tab.step(0, -1, 5) == 0 and data_tab.step(4, 1, 5) == 4 and data_tab.step(2, 1, 5) == 3


def test_default_dataset_is_made_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRINET_STUDIO_CACHE", str(tmp_path))
    engine = Engine()
    path = engine.ensure_default_dataset()
    assert path.startswith(str(tmp_path))
    first = (tmp_path / path / "annotations.jsonl").stat().st_mtime_ns
    assert Engine().ensure_default_dataset() == path
    assert (tmp_path / path / "annotations.jsonl").stat().st_mtime_ns == first
    assert engine.dataset_info(path).num_records == 240


def test_engine_does_not_import_gradio():
    code = "import sys, studio.engine; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"



def test_served_studio_answers_the_data_endpoints(engine, toybooru):
    from gradio_client import Client

    with serve(engine) as url:
        client = Client(url, verbose=False)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        # exactly the public endpoints: every other event is private
        assert set(endpoints) == {"/data_open", "/data_record", "/crop", "/compose", "/vary", "/sweep", "/train_start", "/train_status", "/train_stop"}
        summary, split, slider = client.predict(str(toybooru), "all", api_name="/data_open")
        assert "**120** pictures" in summary and slider["maximum"] == 119
        title, annotated, crops, tags, similar, rec = client.predict(str(toybooru), "all", 3, api_name="/data_record")
        assert rec["id"] in title and [c["caption"] for c in crops][0] == "face"
        assert len(similar) == len(rec["similar"])
        assert [a["label"] for a in annotated["annotations"]] == ["figure", "head box"]
