"""The Compose and Variations tabs: their handlers, and /crop, /compose, /vary through gradio_client."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from helpers import Progress, serve
from PIL import Image

from studio import compose_tab, variations_tab
from studio.engine import Engine


def test_dropped_pictures_become_cards_that_can_be_changed_and_removed(engine, files):
    items, cleared = compose_tab.add_pictures(engine, files[:2], [])
    assert cleared is None and [it["concept"] for it in items] == ["face", "clothes"]
    assert all(it["card"].picture.size == (96, 96) for it in items)
    items = compose_tab.set_concept(items, items[1]["id"], "whole")
    assert [it["concept"] for it in items] == ["face", "whole"]
    assert [it["id"] for it in compose_tab.remove(items, items[0]["id"])] == [items[1]["id"]]
    with pytest.warns(UserWarning, match="At most 8 references"):
        full, _ = compose_tab.add_pictures(engine, files[:1] * 10, [])
    assert len(full) == 8  # the rest are refused with a warning


def test_generate_fills_the_gallery_and_reports_the_seed(engine, files):
    items, _ = compose_tab.add_pictures(engine, files[:2], [])
    progress = Progress()
    gallery, downloads, status, seed = compose_tab.generate(engine, items, "a girl", "", 2, 3.0, 1.0, -1, 2, 32, 32,
                                                            progress=progress)
    assert len(gallery) == len(downloads) == 2 and progress.calls == [(1, 2), (2, 2)]
    assert f"seeds {seed} to" in status and f"seed {seed} " in gallery[0][1]
    with Image.open(downloads[0]) as im:
        assert im.size == (32, 32) and f'"seed": {seed}' in im.info["parameters"]
    with pytest.raises(gr.Error, match="no reference given"):
        compose_tab.generate(engine, [], "a girl", "", 2, 3.0, 1.0, 0, 1, 32, 32, progress=progress)
    with pytest.raises(gr.Error, match="seed"):
        compose_tab.generate(engine, items, "a girl", "", 2, 3.0, 1.0, 2**33, 1, 32, 32, progress=progress)


def test_the_library_saves_and_loads_through_the_tab(engine, files):
    items, _ = compose_tab.add_pictures(engine, files[:2], [])
    dropdown = compose_tab.save_character(engine, "My hero", compose_tab.set_concept(items, items[0]["id"], "figure"))
    names = [value for _, value in dropdown.choices]
    assert dropdown.value == "My hero" and {"My hero", "kimara_samasa", "riko_shihato"} <= set(names)
    loaded = compose_tab.load_character(engine, "My hero")
    assert [it["concept"] for it in loaded] == ["figure", "clothes"]
    with pytest.raises(gr.Error, match="name"):
        compose_tab.save_character(engine, "../x", items)
    assert len(compose_tab.load_character(engine, "kimara_samasa")) == 3



def test_served_studio_answers_crop_compose_and_vary(engine, files):
    from gradio_client import Client, handle_file

    with serve(engine) as url:
        client = Client(url, verbose=False)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert {"/crop", "/compose", "/vary", "/sweep", "/train_start", "/train_status", "/train_stop", "/data_open", "/data_record"} == set(endpoints)
        assert [p["parameter_name"] for p in endpoints["/compose"]["parameters"]][:8] == [
            "prompt", "files", "concepts", "steps", "guidance", "retrieval_scale", "seed", "num_images"]

        crops, overlay, concept = client.predict(handle_file(files[0]), api_name="/crop")
        assert [c["caption"] for c in crops] == ["face", "clothes", "figure", "whole", "mask"] and concept == "face"
        assert Image.open(overlay).size == (96, 96)

        refs = [handle_file(f) for f in files[:2]]
        pictures = client.predict("a girl", refs, ["face", "clothes"], 2, 3.0, 1.0, 5, 2, "", 32, 32,
                                  api_name="/compose")
        assert len(pictures) == 2 and [Image.open(p["image"]).size for p in pictures] == [(32, 32)] * 2
        assert pictures[0]["caption"].startswith("seed 5 ") and pictures[1]["caption"].startswith("seed 6 ")
        again = client.predict(prompt="a girl", files=refs, concepts=["face", "clothes"], steps=2, guidance=3.0,
                               retrieval_scale=1.0, seed=5, num_images=1, width=32, height=32, api_name="/compose")
        # the same picture, made alone: equal up to the last bit of the CPU kernels, which may differ with the
        # batch size (a batch of 2 and a batch of 1 run different convolution paths)
        alone = np.asarray(Image.open(again[0]["image"]), np.int16)
        assert np.abs(alone - np.asarray(Image.open(pictures[0]["image"]), np.int16)).max() <= 2
        with pytest.raises(Exception, match="unknown concept 'hat'"):
            client.predict("a girl", refs[:1], ["hat"], 2, 3.0, 1.0, 5, 1, api_name="/compose")

        variations = client.predict(handle_file(files[0]), 2, 0.5, 2, 3, api_name="/vary")
        assert [Image.open(v["image"]).size for v in variations] == [(32, 32)] * 2
        assert variations[1]["caption"].startswith("seed 4 ")


def test_variations_handler_turns_errors_into_gr_error(engine, files):
    with pytest.raises(gr.Error, match="guidance"):
        variations_tab.vary(engine, files[0], 1, -1.0, 2, 0, progress=Progress())


def test_space_settings_live_in_one_place(monkeypatch):
    import importlib.machinery
    import sys
    import types

    from studio import spaces

    monkeypatch.delenv("SPACE_ID", raising=False)
    assert spaces.launch_kwargs() == {"max_file_size": spaces.MAX_FILE_SIZE, "allowed_paths": []}

    def f():
        return 1

    assert spaces.gpu(f) is f  # no `spaces` package here: nothing changes
    monkeypatch.setenv("SPACE_ID", "someone/retrinet-studio")
    assert spaces.launch_kwargs() == {"max_file_size": spaces.SPACE_MAX_FILE_SIZE, "allowed_paths": []}
    fake = types.ModuleType("spaces")
    fake.__spec__ = importlib.machinery.ModuleSpec("spaces", None)
    fake.GPU = lambda duration: (lambda fn: ("on the GPU", duration, fn))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert spaces.gpu(f) == ("on the GPU", spaces.GPU_DURATION, f)


def test_app_options_reach_the_engine(monkeypatch, tmp_path, capsys):
    import app

    args = app.parse_args(["--device", "cpu", "--workspace", str(tmp_path), "--zoo", "demo"])
    assert (args.device, args.workspace, args.zoo, args.port) == ("cpu", str(tmp_path), "demo", 7860)
    with pytest.raises(SystemExit, match="needs a config file"):
        app.main(["--zoo", "sd15"])
    engine = Engine(device="cpu", workspace=tmp_path)
    assert engine.models.device == "cpu" and engine.library() == tmp_path / "characters"
    assert engine.models.loaded() == []  # nothing loads before it is needed


def test_a_shared_studio_accepts_no_local_path_and_saves_no_character(tiny_models, toybooru, tmp_path, files,
                                                                       monkeypatch):
    """On a Space every visitor shares the engine: the Data tab opens the studio's own data set only,
    and the character library holds the bundled examples only (a saved one would be shown to all)."""
    private = Engine(data=str(toybooru), models=tiny_models, workspace=tmp_path)
    private.save_character("Mine", [(files[0], "face")])
    monkeypatch.setenv("SPACE_ID", "someone/retrinet-studio")
    shared = Engine(data=str(toybooru), models=tiny_models, workspace=tmp_path)
    assert shared.shared and not Engine(data=str(toybooru), models=tiny_models, workspace=tmp_path, shared=False).shared
    assert shared.dataset_info(str(toybooru)).num_records > 0
    for path in (str(tmp_path), "/etc", str(toybooru / ".." / toybooru.name / "images")):
        with pytest.raises(ValueError, match="local paths are not accepted"):
            shared.dataset_info(path)
    with pytest.raises(ValueError, match="saving is off"):
        shared.save_character("Theirs", [(files[0], "face")])
    assert [c.name for c in shared.list_characters()] == ["kimara_samasa", "riko_shihato"]
    with pytest.raises(ValueError, match="no character named 'Mine'"):
        shared.load_character("Mine")
    assert "Mine" in [c.name for c in private.list_characters()]
