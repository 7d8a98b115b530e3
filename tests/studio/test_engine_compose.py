"""The engine behind Compose and Variations: requests, seeds, validation, missing models, the character library."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from pipelines.zoo import MissingModel, ModelZoo, ZooSpec
from studio.engine import (
    CHOICES,
    ComposeRequest,
    CropRequest,
    Engine,
    VaryRequest,
    resolve_seed,
)


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    return Engine(models=tiny_models, workspace=tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def pictures(toybooru, toybooru_records):
    """Three Toybooru pictures whose heads sit high, so that every concept can be cut."""
    high = [r for r in toybooru_records if r["face_bbox"][3] < r["height"] / 2][:3]
    return [Image.open(toybooru / r["file"]).convert("RGB") for r in high]


def compose(engine, pictures, **kw):
    refs = kw.pop("references", [(pictures[0], "face"), (pictures[1], "clothes")])
    args = {"prompt": "a girl", "references": refs, "steps": 2, "guidance": 3.0, "seed": 7, "num_images": 2,
            "width": 32, "height": 32, **kw}
    return engine.compose(ComposeRequest(**args))


def pixels(generation):
    return [np.asarray(p.image) for p in generation.pictures]


def test_crop_cuts_the_concepts_and_picks_a_default(engine, pictures):
    card = engine.crop(CropRequest(pictures[0]))
    assert card.picture.size == card.overlay.size == card.mask.size == pictures[0].size
    assert set(card.crops) <= set(CHOICES) and {"figure", "whole"} <= set(card.crops)
    assert card.rule
    if card.head_box is not None:
        x0, y0, x1, y1 = card.head_box
        assert card.crops["face"].size == (x1 - x0, y1 - y0)
        assert card.overlay.getpixel((x0, y0)) == (239, 68, 68)  # the head box is drawn
        assert card.concept == "face"
        second = engine.crop(CropRequest(pictures[0], position=1))
        assert second.concept == ("clothes" if "clothes" in card.crops else "figure")
    else:
        assert card.concept == "figure"
    assert np.array_equal(np.asarray(card.crops["whole"]), np.asarray(pictures[0]))
    with pytest.raises(ValueError, match="no picture"):
        engine.crop(CropRequest(None))
    with pytest.raises(ValueError, match="not a picture"):
        engine.crop(CropRequest(b"not a png"))


def test_compose_makes_the_pictures_asked_for(engine, pictures):
    steps = []
    refs = [(pictures[0], "whole"), (pictures[1], "figure")]
    out = engine.compose(ComposeRequest("a girl", refs, steps=3, guidance=3.0, seed=7, num_images=3, width=32,
                                        height=48), progress=lambda done, total: steps.append((done, total)))
    assert len(out.pictures) == 3 and all(p.image.size == (32, 48) for p in out.pictures)
    assert [p.seed for p in out.pictures] == [7, 8, 9] and out.seed == 7
    assert steps == [(1, 3), (2, 3), (3, 3)]
    s = out.pictures[0].settings
    assert (s["prompt"], s["steps"], s["guidance"], s["concepts"]) == ("a girl", 3, 3.0, ["whole", "figure"])
    assert "seed 8" in out.pictures[1].caption() and "32x48" in out.pictures[1].caption()
    assert [c for _, c in out.references] == ["figure", "figure"]


def test_same_seed_same_pictures_other_seed_other_pictures(engine, pictures):
    a, b = pixels(compose(engine, pictures)), pixels(compose(engine, pictures))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], a[1])  # each picture has its own seed
    c = pixels(compose(engine, pictures, seed=8))
    assert not np.array_equal(a[0], c[0])
    assert np.abs(a[1].astype(int) - c[0].astype(int)).max() <= 2  # picture 2 of seed 7 is picture 1 of seed 8


def test_a_randomised_run_reports_a_seed_that_reproduces_it(engine, pictures):
    first = compose(engine, pictures, seed="randomise", num_images=1)
    again = compose(engine, pictures, seed=first.pictures[0].seed, num_images=1)
    assert np.array_equal(pixels(first)[0], pixels(again)[0])
    drawn = {resolve_seed(-1), resolve_seed(-1.0), resolve_seed("randomise"), resolve_seed(None)}
    assert all(0 <= s < 2**32 for s in drawn) and len(drawn) > 1
    assert resolve_seed(5) == 5 and resolve_seed(5.0) == 5 and resolve_seed(" 12 ") == 12


def test_an_empty_prompt_is_allowed(engine, pictures):
    assert len(compose(engine, pictures, prompt="", num_images=1).pictures) == 1


@pytest.mark.parametrize("change, match", [
    ({"references": []}, "no reference given"),
    ({"references": "nine"}, "9 references given, at most 8"),
    ({"references": [(None, "hat")]}, "unknown concept 'hat'"),
    ({"references": [(None, "face")]}, "reference 1: no picture"),
    ({"guidance": math.nan}, "guidance must be a finite number"),
    ({"guidance": -1.0}, "guidance -1 is outside"),
    ({"retrieval_scale": math.inf}, "retrieval scale must be a finite"),
    ({"seed": 2**32}, "seed 4294967296 is outside 0..4294967295"),
    ({"seed": -5}, "seed -5 is outside"),
    ({"seed": "lucky"}, "seed must be a whole number"),
    ({"steps": 0}, "steps 0 is outside"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"num_images": 9}, "number of pictures 9 is outside 1..8"),
    ({"width": 36}, "width 36 is not a multiple of 8"),
    ({"prompt": 3}, "must be text"),
])
def test_bad_compose_requests_raise_value_error(engine, pictures, change, match):
    if change.get("references") == "nine":
        change = {"references": [(pictures[0], "figure")] * 9}
    with pytest.raises(ValueError, match=match):
        compose(engine, pictures, **change)


def test_a_concept_that_cannot_be_cut_is_refused(engine):
    blank = Image.new("RGB", (48, 48), (40, 160, 40))  # no figure, no head
    assert engine.crop(CropRequest(blank)).concept == "figure"
    with pytest.raises(ValueError, match="reference 1: no face can be cut"):
        engine.compose(ComposeRequest("x", [(blank, "face")], steps=1, seed=0, width=32, height=32))


def test_vary_makes_variations(engine, pictures):
    req = VaryRequest(pictures[0], num_images=2, guidance=0.5, steps=2, seed=3, width=32, height=32)
    a, b = engine.vary(req), engine.vary(req)
    assert [p.image.size for p in a.pictures] == [(32, 32)] * 2 and [p.seed for p in a.pictures] == [3, 4]
    assert all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))
    assert not np.array_equal(pixels(a)[0], pixels(a)[1])
    for bad, match in (({"guidance": -0.5}, "guidance -0.5 is outside"), ({"guidance": math.nan}, "finite"),
                       ({"image": None}, "no picture"), ({"seed": 2**40}, "seed")):
        with pytest.raises(ValueError, match=match):
            engine.vary(VaryRequest(**{**req.__dict__, **bad}))


def test_missing_models_point_to_the_train_tab(tiny_zoo_spec, pictures, tmp_path):
    spec = ZooSpec("sd15", retrinet=None, stable_diffusion=None, semantica=None, clip=tiny_zoo_spec.clip,
                   detector=tiny_zoo_spec.detector)
    engine = Engine(models=ModelZoo(spec, device="cpu"), workspace=tmp_path)
    with pytest.raises(MissingModel, match="No RetriNet model for the 'sd15' family.*Train one in the Train tab"):
        engine.compose(ComposeRequest("a girl", [(pictures[0], "whole")], steps=1, seed=0))
    with pytest.raises(MissingModel, match="No Semantica model.*Train tab"):
        engine.vary(VaryRequest(pictures[0], steps=1, seed=0))
    assert engine.models.loaded() == []  # nothing was generated with an untrained model


def test_character_library_round_trips(engine, pictures):
    info = engine.save_character("Riko 2", [(pictures[0], "face"), (pictures[1], "clothes"), (pictures[2], "whole")])
    assert (info.name, info.source, info.num_references) == ("Riko 2", "saved", 3)
    loaded = engine.load_character(" Riko 2 ")
    assert [c for _, c in loaded.references] == ["face", "clothes", "whole"] and loaded.source == "saved"
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), b in zip(loaded.references, pictures))
    engine.save_character("Riko 2", [(pictures[2], "figure")])  # saving again replaces it, atomically
    assert [c for _, c in engine.load_character("Riko 2").references] == ["figure"]
    assert not [p for p in engine.library().iterdir() if p.name.startswith(".")]  # no temporary folder left
    listed = engine.list_characters()
    assert ("Riko 2", "saved") in [(c.name, c.source) for c in listed]


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", "   ", "x" * 65, "naïve", "a\\b", ".hidden"])
def test_character_names_are_checked(engine, pictures, name):
    with pytest.raises(ValueError, match="name"):
        engine.save_character(name, [(pictures[0], "face")])
    with pytest.raises(ValueError):
        engine.load_character(name)


def test_bad_characters_are_refused(engine, pictures):
    with pytest.raises(ValueError, match="1 to 8 references"):
        engine.save_character("empty", [])
    with pytest.raises(ValueError, match="unknown concept"):
        engine.save_character("hat", [(pictures[0], "hat")])
    with pytest.raises(ValueError, match="bundled example"):
        engine.save_character("kimara_samasa", [(pictures[0], "face")])
    with pytest.raises(ValueError, match="no character named 'nobody'"):
        engine.load_character("nobody")


def test_bundled_examples_are_listed_and_load(engine):
    examples = [c for c in engine.list_characters() if c.source == "example"]
    assert {c.name for c in examples} == {"kimara_samasa", "riko_shihato"}
    for c in examples:
        loaded = engine.load_character(c.name)
        assert len(loaded.references) == c.num_references == 3
        assert [x for _, x in loaded.references] == ["face", "clothes", "figure"]
        assert all(im.size == (128, 128) for im, _ in loaded.references)
    folder = engine.examples
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 100_000
    meta = json.loads((folder / "kimara_samasa" / "character.json").read_text())
    assert meta["name"] == "kimara_samasa"


def test_the_examples_compose(engine):
    refs = engine.load_character("riko_shihato").references
    cards = [engine.crop(CropRequest(im, i)) for i, (im, _) in enumerate(refs)]
    assert all(c.head_box is not None for c in cards)  # the demo detector finds the heads of Toybooru pictures
    out = engine.compose(ComposeRequest("a girl", refs, steps=1, seed=0, width=32, height=32))
    assert len(out.pictures) == 1


def test_each_reference_carries_where_it_was_cut_from(engine, pictures, monkeypatch):
    """A crop reaches the pipeline with its region in the picture (what a RetriNet trained with
    retrieval_regions reads); a whole picture with none."""
    cut = engine._extract(pictures[0])
    face = engine._reference(0, pictures[0], "face")
    assert face.concept == "face" and face.image.size == cut.face.size and face.region == cut.region("face")
    assert 0 <= face.region[1] < face.region[3] <= 1
    whole = engine._reference(0, pictures[0], "whole")
    assert (whole.concept, whole.region) == ("figure", None) and whole.image.size == pictures[0].size
    seen = []
    pipe = engine._model("retrinet")
    call = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__", lambda self, *a, **kw: seen.append(kw["references"]) or call(
        self, *a, **kw))
    compose(engine, pictures, num_images=1)
    assert [r.region for r in seen[0]] == [cut.region("face"), engine._extract(pictures[1]).region("clothes")]
