import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines.concepts import (RULE_CUT, RULE_LOW_HEAD, RULE_NO_HEAD, RULE_NOTHING_BELOW, ConceptExtractor,
                                concept_box, concept_region, load_image)
from pipelines.detector import Detection, SamSegmenter, YoloDetector, export_yolo, load_yolo


def scene(w=80, h=120, figures=((20, 10, 60, 110),), bg=(0, 180, 0)):
    """Green background; each figure a blue body with a red head on top; returns picture and masks."""
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    masks = []
    for x0, y0, x1, y1 in figures:
        m = Image.new("L", (w, h), 0)
        md = ImageDraw.Draw(m)
        head_bottom = y0 + (y1 - y0) // 4
        d.rectangle([x0, head_bottom, x1 - 1, y1 - 1], fill=(0, 0, 255))
        d.rectangle([x0 + 5, y0, x1 - 6, head_bottom - 1], fill=(255, 0, 0))
        md.rectangle([x0, head_bottom, x1 - 1, y1 - 1], fill=255)
        md.rectangle([x0 + 5, y0, x1 - 6, head_bottom - 1], fill=255)
        masks.append(m)
    return img, masks


class FakeDetector:
    def __init__(self, heads, figures):
        self.heads, self.figures = heads, figures
        self.seen = None

    def __call__(self, image):
        self.seen = image
        return list(self.heads), list(self.figures)


def test_cut_rule_gives_face_clothes_and_figure():
    img, (mask,) = scene()
    head = Detection((25, 10, 55, 35), 0.9)
    ex = ConceptExtractor(FakeDetector([head], [Detection((20, 10, 60, 110), 0.8, mask)]))
    c = ex.extract(img)
    assert c.rule == RULE_CUT and c.head_box == (25, 10, 55, 35) and c.num_figures == 1
    assert c.face.size == (30, 25) and np.all(np.asarray(c.face) == (255, 0, 0))
    a = np.asarray(c.clothes)
    assert c.clothes.size == (40, 75) and np.all(a == (0, 0, 255))  # rows 35.. of the figure only
    f = np.asarray(c.figure)
    assert c.figure.size == img.size and np.all(f[0, 0] == 255) and not (f == (0, 180, 0)).all(-1).any()
    assert set(c.crops()) == {"face", "clothes", "figure"}
    assert c.head_confidence == 0.9 and c.figure_confidence == 0.8


def test_low_head_rule_keeps_the_figure_whole():
    img, (mask,) = scene()
    ex = ConceptExtractor(FakeDetector([Detection((25, 70, 55, 95), 0.9)], [Detection((20, 10, 60, 110), 0.8, mask)]))
    c = ex.extract(img)
    assert c.rule == RULE_LOW_HEAD and c.clothes is None and c.face is not None
    assert set(c.crops()) == {"face", "figure"}


def test_nothing_below_the_head():
    img, (mask,) = scene()
    head_only = Image.new("L", img.size, 0)
    head_only.paste(255, (25, 10, 55, 35))
    ex = ConceptExtractor(FakeDetector([Detection((25, 10, 55, 35), 0.9)], [Detection((25, 10, 55, 35), 0.8, head_only)]))
    assert ex.extract(img).rule == RULE_NOTHING_BELOW


def test_no_head_is_not_an_error():
    img, (mask,) = scene()
    c = ConceptExtractor(FakeDetector([], [Detection((20, 10, 60, 110), 0.8, mask)])).extract(img)
    assert c.rule == RULE_NO_HEAD and c.head_box is None and c.face is None and c.clothes is None
    assert c.figure.size == img.size and set(c.crops()) == {"figure"}
    nothing = ConceptExtractor(FakeDetector([], [])).extract(img)
    assert nothing.rule == RULE_NO_HEAD and np.asarray(nothing.mask).min() == 255  # the whole picture
    assert np.array_equal(np.asarray(nothing.figure), np.asarray(img))


def test_several_figures_use_the_largest_and_its_head():
    img, (small, big) = scene(w=160, figures=((5, 60, 45, 110), (70, 5, 150, 115)))
    heads = [Detection((10, 60, 40, 72), 0.99), Detection((75, 5, 145, 32), 0.6)]
    figures = [Detection((5, 60, 45, 110), 0.9, small), Detection((70, 5, 150, 115), 0.7, big)]
    c = ConceptExtractor(FakeDetector(heads, figures)).extract(img)
    assert c.num_figures == 2 and c.head_box == (75, 5, 145, 32) and c.figure_confidence == 0.7
    assert np.array_equal(np.asarray(c.mask), np.asarray(big))


def test_transparent_fill():
    img, (mask,) = scene()
    ex = ConceptExtractor(FakeDetector([Detection((25, 10, 55, 35), 0.9)], [Detection((20, 10, 60, 110), 0.8, mask)]),
                          fill="transparent")
    c = ex.extract(img)
    assert c.figure.mode == "RGBA" and np.array_equal(np.asarray(c.figure)[..., 3], np.asarray(mask))
    assert c.clothes.mode == "RGBA"
    with pytest.raises(ValueError, match="fill"):
        ConceptExtractor(FakeDetector([], []), fill="pink")


def test_input_modes_and_orientation():
    img, _ = scene()
    rgba = img.convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent becomes white
    assert load_image(img.convert("L")).mode == "RGB"
    assert load_image(img.convert("P")).mode == "RGB"
    assert load_image(np.zeros((5, 7), np.uint8)).size == (7, 5)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    img.save(buf, "JPEG", exif=exif)
    rotated = load_image(buf.getvalue())
    assert rotated.size == (120, 80)
    det = FakeDetector([], [])
    ConceptExtractor(det).extract(buf.getvalue())
    assert det.seen.size == (120, 80)  # the detector sees the picture upright


@pytest.mark.parametrize("bad, match", [
    (b"not a picture at all", "not a picture"), (np.zeros((0, 4, 3), np.uint8), "H x W"), (42, "not a picture"),
    (np.zeros((2, 2, 2, 2), np.uint8), "H x W"),
])
def test_bad_pictures_raise_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        ConceptExtractor(FakeDetector([], [])).extract(bad)


def test_pixel_limit():
    with pytest.raises(ValueError, match="larger than the limit"):
        ConceptExtractor(FakeDetector([], []), max_pixels=100).extract(Image.new("RGB", (20, 20)))


def test_missing_file_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="not a picture"):
        load_image(tmp_path / "missing.png")


# ---------------------------------------------------------------------------- backends

@pytest.fixture(scope="module")
def random_yolo_folder(tmp_path_factory):
    """A random-weight YOLO11n-seg with the classes head and figure, exported as the demo's is."""
    import yaml
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    spec = {k: v for k, v in yaml_model_load("yolo11n-seg.yaml").items() if k != "yaml_file"}
    spec["nc"] = 2
    path = tmp_path_factory.mktemp("y") / "model.yaml"
    path.write_text(yaml.safe_dump(spec))
    torch.manual_seed(0)
    model = YOLO(str(path), task="segment", verbose=False)
    pt = tmp_path_factory.mktemp("pt") / "best.pt"
    torch.save({"model": model.model, "ema": None}, pt)
    return export_yolo(pt, tmp_path_factory.mktemp("det") / "detector", {0: "head", 1: "figure"}, imgsz=128), model


def test_yolo_export_round_trip_and_detector_runs(random_yolo_folder):
    folder, original = random_yolo_folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "model.yaml"]
    model, config = load_yolo(folder)
    a, b = original.model.state_dict(), model.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert config["imgsz"] == 128 and model.model.names == {0: "head", 1: "figure"}
    det = YoloDetector(model, imgsz=128, confidence=0.0)
    img, _ = scene()
    heads, figures = det(img)
    assert all(isinstance(d, Detection) and len(d.box) == 4 for d in heads + figures)
    assert all(f.mask is not None and f.mask.size == img.size for f in figures)
    crops = ConceptExtractor.from_pretrained(folder).extract(img)  # whatever random weights find
    assert crops.mask.size == img.size and crops.rule in (RULE_CUT, RULE_LOW_HEAD, RULE_NO_HEAD, RULE_NOTHING_BELOW)
    with pytest.raises(ValueError, match="no class 'face'"):
        YoloDetector(model, head_class="face")


def test_not_a_detector_folder(tmp_path):
    with pytest.raises(ValueError, match="not a detector folder"):
        load_yolo(tmp_path)


def tiny_sam():
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    return _build_sam(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=1, encoder_global_attn_indexes=[0])


def test_sam_segmenter_backend_with_a_tiny_model():
    seg = SamSegmenter(tiny_sam().eval())
    img, (mask,) = scene()
    out = seg(img, (20, 10, 60, 110))
    assert out.size == img.size and out.mode == "L" and set(np.unique(np.asarray(out))) <= {0, 255}
    ex = ConceptExtractor(FakeDetector([Detection((25, 10, 55, 35), 0.9)], [Detection((20, 10, 60, 110), 0.8, mask)]),
                          segmenter=seg)
    c = ex.extract(img)
    assert np.array_equal(np.asarray(c.mask), np.asarray(out))  # the segmenter's mask wins


@pytest.mark.slow
def test_sam_vit_b_loading_path_with_random_weights():
    seg = SamSegmenter.from_checkpoint("vit_b", None)
    n = sum(p.numel() for p in seg.predictor.model.parameters())
    assert 90e6 < n < 95e6  # SAM ViT-B has 93.7 M parameters
    img, _ = scene()
    assert seg(img, (20, 10, 60, 110)).size == img.size
    with pytest.raises(ValueError, match="unknown SAM model"):
        SamSegmenter.from_checkpoint("vit_x", None)


def test_corrupt_files_raise_pil_errors_even_after_ultralytics_patched_pil(tmp_path):
    import ultralytics  # noqa: F401  (patches PIL.Image.open on import)
    from PIL import UnidentifiedImageError

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(UnidentifiedImageError):
        Image.open(bad)
    with pytest.raises(ValueError, match="not a picture"):
        load_image(bad)


def test_refine_mask_snaps_a_coarse_mask_to_the_outline():
    from pipelines.concepts import refine_mask

    img = Image.new("RGB", (80, 100), (250, 230, 200))  # a plain background
    truth = Image.new("L", img.size, 0)
    d, t = ImageDraw.Draw(img), ImageDraw.Draw(truth)
    for draw, fill, outline in ((d, (200, 40, 60), (20, 20, 20)), (t, 255, 255)):
        draw.ellipse([25, 5, 55, 35], fill=fill, outline=outline, width=2)  # head
        draw.rectangle([30, 35, 50, 90], fill=fill, outline=outline, width=2)  # body
        draw.line([30, 40, 24, 62], fill=outline, width=3)  # a thin arm the coarse mask misses
    coarse = Image.new("L", img.size, 0)
    ImageDraw.Draw(coarse).rectangle([28, 14, 53, 92], fill=255)  # blocky: no head top, no arm, spills over
    iou = lambda a, b: (np.logical_and(np.asarray(a) > 127, np.asarray(b) > 127).sum()
                        / np.logical_or(np.asarray(a) > 127, np.asarray(b) > 127).sum())
    refined = refine_mask(img, coarse, head_box=(25, 5, 56, 36), grow=6)
    assert iou(coarse, truth) < 0.8 < 0.95 < iou(refined, truth)
    blank = Image.new("L", img.size, 0)
    assert refine_mask(img, blank) is not blank and not np.asarray(refine_mask(img, blank)).any()


def test_extractor_refines_only_when_asked():
    img, (mask,) = scene()
    coarse = Image.new("L", img.size, 0)
    coarse.paste(255, (23, 33, 57, 106))  # short of the figure on every side, by less than ``grow``
    det = FakeDetector([Detection((25, 10, 55, 35), 0.9)], [Detection((20, 10, 60, 110), 0.8, coarse)])
    assert np.array_equal(np.asarray(ConceptExtractor(det).extract(img).mask), np.asarray(coarse))
    refined = np.asarray(ConceptExtractor(det, refine=True).extract(img).mask)
    assert np.array_equal(refined, np.asarray(mask))  # the picture's own figure, exactly


def test_each_crop_knows_where_it_lies_in_the_pictures_square_frame():
    img, (mask,) = scene()
    ex = ConceptExtractor(FakeDetector([Detection((25, 10, 55, 35), 0.9)], [Detection((20, 10, 60, 110), 0.8, mask)]))
    c = ex.extract(img)
    w, h = img.size
    assert c.region("figure") == pytest.approx(concept_region((0, 0, w, h), w, h))
    assert c.region("face") == pytest.approx(concept_region((25, 10, 55, 35), w, h))
    assert c.region("clothes") == pytest.approx(concept_region(concept_box("clothes", c.head_box, w, h, c.mask), w, h))
    # the clothes crop and its region are the same box: its square holds the crop's size
    x0, _, x1, _ = c.region("clothes")
    assert (x1 - x0) * max(w, h) == pytest.approx(max(c.clothes.size))
    assert ConceptExtractor(FakeDetector([], [])).extract(img).region("face") is None  # no head, no face region
    with pytest.raises(ValueError, match="unknown concept"):
        c.region("hat")
