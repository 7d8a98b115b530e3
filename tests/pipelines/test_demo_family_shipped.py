"""The shipped demo family: every model loads offline, fast, and runs once on the CPU."""

import hashlib
import json
import time

import pytest
import torch
from PIL import Image

from pipelines.zoo import DEMO_ZOO, ModelZoo

MANIFEST = DEMO_ZOO / "manifest.json"


@pytest.fixture(scope="module")
def zoo():
    return ModelZoo.load("demo", device="cpu")


def test_manifest_lists_every_shipped_file_with_its_checksum():
    manifest = json.loads(MANIFEST.read_text())
    assert manifest["total_bytes"] <= 60 * 2**20
    for name, info in manifest["files"].items():
        data = (DEMO_ZOO / name).read_bytes()
        assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"], name
    for folder in ("base", "clip", "retrinet", "semantica", "judge", "detector"):
        assert any(name.startswith(folder + "/") for name in manifest["files"]), folder
    stages = manifest["stages"]
    for stage in ("data", "vae", "clip", "base", "base-zsnr", "retrinet", "semantica", "judge"):
        assert stage in stages and stages[stage]["command"][:2] == ["python", "-m"], stage
    for stage in ("vae", "clip", "base", "retrinet", "semantica", "judge"):
        assert stages[stage]["steps"] > 0 and stages[stage]["final_loss"] > 0, stage


def test_loads_offline_in_five_seconds(monkeypatch, capsys):
    """The family's own loading, whichever test ran first: the libraries' import is timed apart (it is
    paid once per process, by every diffusers program alike)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    import ultralytics  # noqa: F401

    import pipelines.retrinet  # noqa: F401
    import pipelines.semantica  # noqa: F401
    t1 = time.perf_counter()
    fresh = ModelZoo.load("demo", device="cpu")
    fresh.retrinet(), fresh.semantica(), fresh.clip(), fresh.extractor()
    loaded = time.perf_counter() - t1
    with capsys.disabled():
        print(f"\ndemo family: libraries imported in {t1 - t0:.1f} s, models loaded in {loaded:.1f} s")
    assert loaded <= 5.0
    assert fresh.loaded() == ["clip", "extractor", "retrinet", "semantica"]


def test_composes_from_references(zoo, toybooru, toybooru_records):
    from pipelines.retrinet import Reference
    from training.data.retribooru import open_record, prepare_reference

    refs = []
    for rec, concept in zip(toybooru_records[:4], ("face", "face", "figure", "figure")):
        image, mask = open_record(toybooru, rec)
        refs.append(Reference(*prepare_reference(image, mask, rec["face_bbox"], concept, 64)))
    pipe = zoo.retrinet()
    pipe.set_progress_bar_config(disable=True)
    out = pipe("1girl, solo, standing, outdoors", refs, num_inference_steps=4, guidance_scale=5.0,
               num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 64, 64, 3) and 0 <= out.min() and out.max() <= 1 and out.std() > 0.01


def test_base_draws_from_a_prompt():
    """The demo's "Stable Diffusion" ships as a plain diffusers folder and draws from a prompt."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(DEMO_ZOO / "base", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["1girl, solo, blue hair, red dress"] * 2, num_inference_steps=4, guidance_scale=5.0, height=64,
               width=64, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 64, 64, 3) and 0 <= out.min() and out.max() <= 1 and out.std() > 0.01
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


def test_makes_variations(zoo, toybooru, toybooru_records):
    pipe = zoo.semantica()
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(toybooru / toybooru_records[0]["file"]).convert("RGB").resize((64, 64))
    out = pipe(image, num_images_per_prompt=2, guidance_scale=1.0, num_inference_steps=4,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 64, 64, 3) and out.std() > 0.01


def test_scores_cuts_and_judges(zoo, toybooru, toybooru_records):
    from pipelines.metrics.attributes import AttributeClassifier

    images = [Image.open(toybooru / r["file"]).convert("RGB") for r in toybooru_records[:3]]
    clip_i, clip_t = zoo.clip().scores(images, [[images[0]]] * 3, ["1girl, blue hair"] * 3)
    assert clip_i[0] == pytest.approx(1.0, abs=1e-4) and (clip_t.abs() <= 1).all()
    crops = zoo.extractor().extract(images[0])
    assert crops.face is not None
    judge = AttributeClassifier.from_pretrained(DEMO_ZOO / "judge")
    accuracy = json.loads((DEMO_ZOO / "judge" / "accuracy.json").read_text())["accuracy"]
    predicted = judge.predict(images)
    assert set(predicted[0]) == set(accuracy)


def test_served_studio_crops_and_composes_with_the_demo_family(tmp_path):
    """What a user on a fresh machine gets: `python app.py` on the shipped family, through gradio_client."""
    from gradio_client import Client, handle_file

    from helpers import free_port
    from studio.app import build_studio, launch
    from studio.engine import Engine

    example = sorted((DEMO_ZOO.parents[0] / "examples").glob("*/character.json"))[0]
    character = json.loads(example.read_text())
    files = [str(example.parent / item["file"]) for item in character["references"]]
    concepts = [item["concept"] for item in character["references"]]
    demo = build_studio(Engine(device="cpu", workspace=tmp_path))
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        crops, overlay, concept = client.predict(handle_file(files[0]), api_name="/crop")
        assert {c["caption"] for c in crops} >= {"face", "figure"} and concept in ("face", "clothes", "figure")
        assert Image.open(overlay).size == Image.open(files[0]).size
        pictures = client.predict("1girl, solo, standing, outdoors", [handle_file(f) for f in files], concepts,
                                  8, 5.0, 1.0, 7, 2, api_name="/compose")
        assert [Image.open(p["image"]).size for p in pictures] == [(64, 64)] * 2
        assert pictures[0]["caption"].startswith("seed 7 ")
    finally:
        demo.close()
