import json

import numpy as np
import pytest
from PIL import Image

from pipelines.concepts import ConceptExtractor
from pipelines.detector import load_yolo
from training.train_detector import main, mask_polygon, parse_args, to_yolo


def test_yolo_labels_from_annotations(toybooru, toybooru_records, tmp_path):
    yaml = to_yolo(toybooru, tmp_path / "y", max_val=10)
    assert "names:\n  0: head\n  1: figure\n" in yaml.read_text()
    train = sorted((tmp_path / "y" / "labels" / "train").glob("*.txt"))
    val = sorted((tmp_path / "y" / "labels" / "val").glob("*.txt"))
    assert len(val) == 10 and len(train) == sum(r["split"] == "train" for r in toybooru_records)
    rec = {r["id"]: r for r in toybooru_records}[train[0].stem]
    head, figure = [line.split() for line in train[0].read_text().splitlines()]
    assert head[0] == "0" and len(head) == 9 and figure[0] == "1" and len(figure) >= 7
    xs, ys = [float(v) * 96 for v in head[1::2]], [float(v) * 96 for v in head[2::2]]
    assert [min(xs), min(ys), max(xs), max(ys)] == pytest.approx(rec["face_bbox"], abs=1e-3)
    assert (tmp_path / "y" / "images" / "train" / f"{train[0].stem}.png").resolve() == (toybooru / rec["file"]).resolve()


def test_mask_polygon_follows_the_largest_region():
    m = np.zeros((40, 40), np.uint8)
    m[5:30, 10:20] = 255
    m[35:37, 35:37] = 255
    poly = mask_polygon(m)
    assert poly[:, 0].min() == 10 and poly[:, 0].max() == 19 and poly[:, 1].min() == 5 and poly[:, 1].max() == 29
    assert mask_polygon(np.zeros((5, 5), np.uint8)) is None


@pytest.mark.slow
def test_one_epoch_trains_offline_and_exports_a_loadable_detector(toybooru, tmp_path):
    export = main(parse_args(["--data", str(toybooru), "--out", str(tmp_path / "det"), "--epochs", "1",
                              "--imgsz", "64", "--batch", "16", "--workers", "0", "--max-val", "8"]))
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors", "model.yaml",
                                                        "training.json"]
    assert json.loads((export / "config.json").read_text())["names"] == {"0": "head", "1": "figure"}
    model, config = load_yolo(export)
    assert config["imgsz"] == 64
    crops = ConceptExtractor.from_pretrained(export).extract(Image.new("RGB", (96, 96), "white"))
    assert crops.mask.size == (96, 96)
    # run again: the finished run is not trained twice, only exported
    mtime = (tmp_path / "det" / "run" / "weights" / "best.pt").stat().st_mtime_ns
    main(parse_args(["--data", str(toybooru), "--out", str(tmp_path / "det"), "--epochs", "1", "--imgsz", "64"]))
    assert (tmp_path / "det" / "run" / "weights" / "best.pt").stat().st_mtime_ns == mtime
