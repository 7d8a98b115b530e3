import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.concepts import (check_box, composition_concept, concept_box, concept_region, crop_concept,
                                remove_background, resize_and_pad, resolve_concept, scale_box)


def figure(w=60, h=90, head=(20, 5, 40, 30), body=(15, 25, 45, 85), bg=(0, 200, 0)):
    """A picture with a green background, a red head and a blue body, and its mask."""
    img = Image.new("RGB", (w, h), bg)
    mask = Image.new("L", (w, h), 0)
    d, m = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    d.rectangle([body[0], body[1], body[2] - 1, body[3] - 1], fill=(0, 0, 255))
    d.rectangle([head[0], head[1], head[2] - 1, head[3] - 1], fill=(255, 0, 0))
    for box in (head, body):
        m.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
    return img, mask


def test_face_is_the_head_box():
    img, mask = figure()
    crop, cmask, concept = crop_concept(img, mask, [20, 5, 40, 30], "face")
    assert concept == "face" and crop.size == (20, 25)
    assert np.all(np.asarray(crop) == (255, 0, 0))


def test_clothes_removes_every_row_above_the_head_bottom_and_the_background():
    img, mask = figure()
    crop, cmask, concept = crop_concept(img, mask, [20, 5, 40, 30], "clothes")
    assert concept == "clothes"
    # rows 30.. of the figure, tightened to the mask: x 15..45, y 30..85
    assert concept_box("clothes", [20, 5, 40, 30], 60, 90, mask) == (15, 30, 45, 85)
    a = np.asarray(crop)
    assert crop.size == (30, 55)
    assert np.all(a == (0, 0, 255))  # no head row, no background left
    assert not (a == (255, 0, 0)).all(axis=-1).any()


def test_figure_is_the_whole_picture_without_background():
    img, mask = figure()
    crop, cmask, concept = crop_concept(img, mask, [20, 5, 40, 30], "figure")
    assert concept == "figure" and crop.size == img.size
    a = np.asarray(crop)
    assert np.all(a[0, 0] == 255) and np.all(a[50, 30] == (0, 0, 255))
    assert not (a == (0, 200, 0)).all(axis=-1).any()


@pytest.mark.parametrize("y_max, expected", [(59, "clothes"), (60, "clothes"), (61, "figure"), (89, "figure")])
def test_two_thirds_rule(y_max, expected):
    # 2/3 of 90 is 60: a head box that ends lower than that leaves the reference whole
    assert resolve_concept("clothes", [10, y_max - 10, 30, y_max], 60, 90) == expected
    assert resolve_concept("face", [10, y_max - 10, 30, y_max], 60, 90) == "face"


def test_clothes_with_nothing_below_the_head_is_figure():
    img, mask = figure(head=(20, 5, 40, 30), body=(15, 25, 45, 30))
    assert resolve_concept("clothes", [20, 5, 40, 30], 60, 90, mask) == "figure"
    _, _, concept = crop_concept(img, mask, [20, 5, 40, 30], "clothes")
    assert concept == "figure"
    with pytest.raises(ValueError, match="no figure pixel"):
        concept_box("clothes", [20, 5, 40, 30], 60, 90, mask)


def test_composition_draws_face_and_clothes_equally():
    rng = random.Random(0)
    draws = [composition_concept([20, 5, 40, 30], 60, 90, rng) for _ in range(4000)]
    assert set(draws) == {"face", "clothes"}
    assert abs(draws.count("face") / 4000 - 0.5) < 0.03
    upside_down = [composition_concept([20, 70, 40, 90], 60, 90, rng) for _ in range(400)]
    assert set(upside_down) == {"face", "figure"}


def test_boxes_are_clamped_and_checked():
    assert check_box([-5, -3, 70.4, 20], 60, 90) == (0, 0, 60, 20)
    with pytest.raises(ValueError, match="empty"):
        check_box([30, 10, 30, 20], 60, 90)
    with pytest.raises(ValueError, match="empty"):
        check_box([70, 10, 80, 20], 60, 90)
    with pytest.raises(ValueError, match="4 numbers"):
        check_box([1, 2, 3], 60, 90)
    with pytest.raises(ValueError, match="unknown concept"):
        resolve_concept("hat", [1, 2, 3, 4], 60, 90)


def test_remove_background_checks_sizes():
    img, mask = figure()
    with pytest.raises(ValueError, match="mask"):
        remove_background(img, mask.resize((10, 10)))


def test_resize_and_pad_keeps_aspect_and_reports_the_valid_area():
    img = Image.new("RGB", (60, 90), (255, 0, 0))
    canvas, valid = resize_and_pad(img, 30, fill=(0, 0, 0))
    assert canvas.size == (30, 30) and valid == (5, 0, 25, 30)
    a = np.asarray(canvas)
    assert np.all(a[:, :5] == 0) and np.all(a[:, 25:] == 0) and np.all(a[:, 5:25] == (255, 0, 0))
    assert scale_box([0, 0, 60, 90], 60, 90, 30) == valid
    assert scale_box([20, 5, 40, 30], 60, 90, 30) == (11, 1, 19, 10)  # 5 + 20/3, 5/3, 5 + 40/3, 30/3, rounded outwards
    with pytest.raises(ValueError, match="positive"):
        resize_and_pad(img, 0)


def test_concept_region_is_the_references_square_in_its_pictures_square_frame():
    # a square picture: the whole picture is the frame; a 10x20 face box becomes a 20x20 square around its centre
    assert concept_region((0, 0, 64, 64), 64, 64) == pytest.approx((0, 0, 1, 1))
    assert concept_region((27, 4, 37, 24), 64, 64) == pytest.approx((22 / 64, 4 / 64, 42 / 64, 24 / 64))
    # a tall picture (48x64) is centred in a 64-pixel frame, 8 pixels of padding on either side: the whole picture,
    # padded as the frame is, is the frame; its lower half a 48-pixel square around (32, 48) of the frame
    assert concept_region((0, 0, 48, 64), 48, 64) == pytest.approx((0, 0, 1, 1))
    assert concept_region((0, 32, 48, 64), 48, 64) == pytest.approx((8 / 64, 24 / 64, 56 / 64, 72 / 64))
    with pytest.raises(ValueError, match="empty"):
        concept_region((10, 10, 10, 20), 64, 64)
    with pytest.raises(ValueError, match="empty 0x64"):
        concept_region((0, 0, 1, 1), 0, 64)
