"""Untrusted files (issue 12, part 4, model loading): only safetensors load by default.

Every refused pickle here would write a marker file if it were unpickled (a control shows that it
does); the tests assert the marker never appears. Trusted pickles load with a ``PickleWarning`` and
through ``torch.load(weights_only=True)`` (a spy on ``torch.load`` checks the argument), which also
stops a malicious file that was trusted by mistake.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.detector import (
    DEMO_DETECTOR,
    PickleWarning,
    SamSegmenter,
    YoloDetector,
    check_yolo_spec,
    load_yolo,
    open_yolo,
    ultralytics_restricted_loading,
)
from pipelines.zoo import ROOT, TRUSTABLE, ModelZoo, ZooSpec


class Payload:
    """Unpickled, it opens (so creates) ``marker``: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def malicious(path: Path, marker: Path, zip_format: bool = True) -> Path:
    """A checkpoint-shaped pickle at ``path`` (torch.save's zip format, or a bare pickle)."""
    obj = {"model": Payload(marker), "state_dict": {"w": torch.zeros(1)}}
    if zip_format:
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    return path


class LoadSpy:
    """Records the keyword arguments of every ``torch.load`` call and calls through."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        real = torch.load

        def load(*args, **kwargs):
            self.calls.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, "load", load)


@pytest.fixture()
def marker(tmp_path) -> Path:
    return tmp_path / "UNPICKLED"


def test_control_the_payload_writes_its_marker_when_unpickled(tmp_path, marker):
    for zip_format in (True, False):
        path = malicious(tmp_path / "x.pt", marker, zip_format)
        assert not marker.exists()
        torch.load(path, weights_only=False) if zip_format else pickle.loads(path.read_bytes())
        assert marker.exists()
        marker.unlink()


# ---------------------------------------------------------------------- the detector

@pytest.fixture(scope="module")
def yolo_pt(tmp_path_factory):
    """A random-weight YOLO11n-seg (classes head, figure) saved as ultralytics saves: a pickle."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import yaml_model_load

    spec = {k: v for k, v in yaml_model_load("yolo11n-seg.yaml").items() if k != "yaml_file"}
    spec["nc"] = 2
    folder = tmp_path_factory.mktemp("yolo")
    (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    torch.manual_seed(0)
    model = YOLO(str(folder / "model.yaml"), task="segment", verbose=False)
    model.model.names = {0: "head", 1: "figure"}
    torch.save({"model": model.model, "ema": None}, folder / "best.pt")
    return folder / "best.pt", model.model.state_dict()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_a_pickle_detector_is_refused_by_default_and_never_unpickled(tmp_path, marker, suffix, monkeypatch):
    path = malicious(tmp_path / f"detector{suffix}", marker)
    spy = LoadSpy(monkeypatch)
    with pytest.raises(ValueError, match=r"a Python pickle.*refused by default.*trusted=True.*trust_pickle"):
        YoloDetector(path)
    with pytest.raises(ValueError, match="refused by default"):
        open_yolo(str(path))
    assert not marker.exists() and not spy.calls  # not even opened by torch


def test_a_hub_pickle_is_refused_before_any_download(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **k: pytest.fail("downloaded a file that is refused anyway"))
    with pytest.raises(ValueError, match="refused by default"):
        YoloDetector("Bingsu/adetailer/face_yolov8n.pt")


def test_a_trusted_yolo_pt_loads_with_a_warning_and_weights_only(yolo_pt, monkeypatch):
    path, state = yolo_pt
    if not ultralytics_restricted_loading():
        pytest.skip("this ultralytics has no weights_only loader for .pt files")
    spy = LoadSpy(monkeypatch)
    with pytest.warns(PickleWarning, match=r"marked trusted; ultralytics reads it with torch.load\(weights_only=True\)"):
        det = YoloDetector(path, trusted=True, imgsz=64, confidence=0.0)
    assert spy.calls and all(c.get("weights_only") is True for c in spy.calls), spy.calls
    loaded = det.model.model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    from PIL import Image

    heads, figures = det(Image.new("RGB", (64, 64), "white"))  # it runs
    assert isinstance(heads, list) and isinstance(figures, list)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_trusted_malicious_yolo_pt_is_still_stopped_by_weights_only(tmp_path, marker):
    if not ultralytics_restricted_loading():
        pytest.skip("this ultralytics unpickles .pt files in full")
    for zip_format in (True, False):
        path = malicious(tmp_path / f"evil-{zip_format}.pt", marker, zip_format)
        with pytest.warns(PickleWarning), pytest.raises(ValueError):
            YoloDetector(path, trusted=True)
        assert not marker.exists()


def test_the_demo_detector_loads_from_safetensors_without_any_pickle(monkeypatch):
    from pipelines.concepts import ConceptExtractor

    spy = LoadSpy(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PickleWarning)
        extractor = ConceptExtractor.from_pretrained(DEMO_DETECTOR)
        YoloDetector(DEMO_DETECTOR)  # a folder path is fine too
    assert not spy.calls
    assert extractor.detector.model.model.names == {0: "head", 1: "figure"}


def _demo_spec() -> dict:
    return yaml.safe_load((DEMO_DETECTOR / "model.yaml").read_text())


def test_a_detector_folder_whose_yaml_would_run_code_is_refused(tmp_path, marker):
    evil_pt = malicious(tmp_path / "evil.pt", marker)
    attacks = {
        # ultralytics eval()s the activation
        "activation": lambda s: s.update(activation=f"__import__('builtins').open({str(marker)!r}, 'w') or nn.SiLU()"),
        # and calls whatever its module holds under a layer's name: here a full unpickle of a file
        "layer": lambda s: s["backbone"].insert(0, [-1, 1, "torch_load", [str(evil_pt)]]),
    }
    for name, attack in attacks.items():
        folder = shutil.copytree(DEMO_DETECTOR, tmp_path / name)
        spec = _demo_spec()
        attack(spec)
        (folder / "model.yaml").write_text(yaml.safe_dump(spec))
        with pytest.raises(ValueError, match="refused"):
            load_yolo(folder)
        with pytest.raises(ValueError, match="refused"):
            YoloDetector(folder)
        assert not marker.exists(), name
    check_yolo_spec(_demo_spec(), "demo")  # the shipped one passes
    ok = _demo_spec()
    ok["activation"] = "nn.SiLU()"
    check_yolo_spec(ok, "with an activation")
    bad_task = shutil.copytree(DEMO_DETECTOR, tmp_path / "task")
    cfg = json.loads((bad_task / "config.json").read_text())
    (bad_task / "config.json").write_text(json.dumps({**cfg, "task": "__import__('os')"}))
    with pytest.raises(ValueError, match="task"):
        load_yolo(bad_task)


def test_other_detector_files_are_refused_with_what_is_accepted(tmp_path):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x01")
    with pytest.raises(ValueError, match="a detector is a folder written by pipelines.detector.export_yolo"):
        YoloDetector(onnx, trusted=True)


# ---------------------------------------------------------------------- SAM

def _tiny_sam(checkpoint=None):
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    return _build_sam(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=1, encoder_global_attn_indexes=[0],
                      checkpoint=checkpoint)


@pytest.fixture()
def tiny_sam_registry(monkeypatch):
    """``vit_b`` built tiny (SAM's own ViT-B has 94 M parameters)."""
    from segment_anything import sam_model_registry

    monkeypatch.setitem(sam_model_registry, "vit_b", _tiny_sam)


def test_a_sam_pickle_is_refused_by_default_and_never_unpickled(tmp_path, marker, tiny_sam_registry, monkeypatch):
    spy = LoadSpy(monkeypatch)
    for suffix in (".pth", ".pt", ".bin", ".ckpt"):
        path = malicious(tmp_path / f"sam{suffix}", marker)
        with pytest.raises(ValueError, match=r"SAM checkpoint files other than safetensors are refused by default"):
            SamSegmenter.from_checkpoint("vit_b", path)
    assert not marker.exists() and not spy.calls
    path = malicious(tmp_path / "sam_trusted.pth", marker)
    with pytest.warns(PickleWarning), pytest.raises(ValueError, match=r"weights_only=True\) refused it"):
        SamSegmenter.from_checkpoint("vit_b", path, trusted=True)  # trusted by mistake: weights_only still stops it
    assert not marker.exists()


def test_a_trusted_sam_pth_loads_as_a_state_dict_with_weights_only(tmp_path, tiny_sam_registry, monkeypatch):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = _tiny_sam()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)  # unlike the random weights from_checkpoint starts from
    state = source.state_dict()
    torch.save(state, tmp_path / "sam.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "sam.safetensors"))
    spy = LoadSpy(monkeypatch)
    with pytest.warns(PickleWarning, match=r"weights_only=True"):
        seg = SamSegmenter.from_checkpoint("vit_b", tmp_path / "sam.pth", trusted=True)
    assert spy.calls == [{"map_location": "cpu", "weights_only": True}]
    got = seg.predictor.model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)
    spy.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PickleWarning)
        seg = SamSegmenter.from_checkpoint("vit_b", tmp_path / "sam.safetensors")  # no trust needed
    assert not spy.calls and all(torch.equal(seg.predictor.model.state_dict()[k], state[k]) for k in state)
    from pipelines.detector import to_safetensors

    with pytest.warns(PickleWarning):  # converting is trusting it once
        converted = to_safetensors(tmp_path / "sam.pth", tmp_path / "converted.safetensors")
    seg = SamSegmenter.from_checkpoint("vit_b", converted)
    assert all(torch.equal(seg.predictor.model.state_dict()[k], state[k]) for k in state)
    torch.save({"not": "a state dict"}, tmp_path / "other.pth")
    with pytest.warns(PickleWarning), pytest.raises(ValueError, match="does not hold a state dict"):
        SamSegmenter.from_checkpoint("vit_b", tmp_path / "other.pth", trusted=True)


# ---------------------------------------------------------------------- the zoo and its config

def write(tmp_path, **cfg) -> Path:
    path = tmp_path / "zoo.json"
    path.write_text(json.dumps(cfg))
    return path


def test_trust_pickle_in_the_config(tmp_path):
    base = {"family": "sd15", "clip": "c", "detector": "d"}
    assert ZooSpec.from_file(write(tmp_path, **base)).trust_pickle == ()
    assert ZooSpec.from_file(write(tmp_path, **base, trust_pickle=["sam", "detector"])).trust_pickle == \
        ("detector", "sam")
    assert ZooSpec.from_file(write(tmp_path, **base, trust_pickle=True)).trust_pickle == TRUSTABLE
    assert ZooSpec.from_file(write(tmp_path, **base, trust_pickle=False)).trust_pickle == ()
    with pytest.raises(ValueError, match="trust_pickle names unet, not model keys"):
        ZooSpec.from_file(write(tmp_path, **base, trust_pickle=["unet"]))
    with pytest.raises(ValueError, match="trust_pickle must be true, false or a list"):
        ZooSpec.from_file(write(tmp_path, **base, trust_pickle="detector"))
    shipped = ZooSpec.from_file(ROOT / "configs" / "sd15.json")
    assert shipped.trust_pickle == ("detector",) and shipped.detector.endswith(".pt")
    assert ZooSpec.demo().trust_pickle == ()


def test_the_zoo_refuses_an_untrusted_detector_or_sam_pickle(tmp_path, marker, yolo_pt, tiny_sam_registry):
    evil = malicious(tmp_path / "det.pt", marker)
    zoo = ModelZoo(ZooSpec("sd15", None, None, None, clip="c", detector=str(evil)), device="cpu")
    with pytest.raises(ValueError, match=r"config key 'detector'.*refused by default.*trust_pickle"):
        zoo.extractor()
    evil_sam = malicious(tmp_path / "sam.pth", marker)
    zoo = ModelZoo(ZooSpec("sd15", None, None, None, clip="c", detector=str(DEMO_DETECTOR), sam=str(evil_sam)),
                   device="cpu")
    with pytest.raises(ValueError, match=r"config key 'sam'.*refused by default"):
        zoo.extractor()
    assert not marker.exists()
    if ultralytics_restricted_loading():  # trusted in the config: loads, with the warning
        zoo = ModelZoo(ZooSpec("sd15", None, None, None, clip="c", detector=str(yolo_pt[0]),
                               trust_pickle=("detector",)), device="cpu")
        with pytest.warns(PickleWarning):
            assert zoo.extractor().detector.head_ids == {0}


@pytest.fixture(scope="module")
def clip_bin(tiny_clip, tmp_path_factory) -> Path:
    """The tiny CLIP with its weights as ``pytorch_model.bin`` (a pickle) instead of safetensors."""
    from transformers import CLIPModel

    folder = tmp_path_factory.mktemp("clip-bin") / "clip"
    shutil.copytree(tiny_clip, folder)
    (folder / "model.safetensors").unlink()
    # transformers 5 saves safetensors only: write the older format by hand
    torch.save(CLIPModel.from_pretrained(tiny_clip).state_dict(), folder / "pytorch_model.bin")
    assert (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists()
    return folder


def test_transformers_weights_load_as_safetensors_only_unless_trusted(clip_bin, tiny_clip, tmp_path, marker,
                                                                      monkeypatch):
    ok = ModelZoo(ZooSpec("sd15", None, None, None, clip=str(tiny_clip), detector="d"), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PickleWarning)
        ok.clip()  # safetensors: fine
    zoo = ModelZoo(ZooSpec("sd15", None, None, None, clip=str(clip_bin), detector="d"), device="cpu")
    with pytest.raises(ValueError, match=r"cannot load the CLIP model .*config key 'clip'"):
        zoo.clip()
    spy = LoadSpy(monkeypatch)
    trusted = ModelZoo(ZooSpec("sd15", None, None, None, clip=str(clip_bin), detector="d", trust_pickle=("clip",)),
                       device="cpu")
    with pytest.warns(PickleWarning, match="'clip' is trusted with pickles"):
        trusted.clip()
    assert spy.calls and all(c.get("weights_only") is True for c in spy.calls), spy.calls
    # a malicious .bin trusted by mistake: transformers' weights_only load stops it
    evil = shutil.copytree(clip_bin, tmp_path / "evil-clip")
    malicious(evil / "pytorch_model.bin", marker)
    zoo = ModelZoo(ZooSpec("sd15", None, None, None, clip=str(evil), detector="d", trust_pickle=True), device="cpu")
    with pytest.warns(PickleWarning), pytest.raises(ValueError, match="config key 'clip'"):
        zoo.clip()
    assert not marker.exists()


def test_diffusers_weights_load_as_safetensors_only_unless_trusted(tiny_sd, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from pipelines.retrinet import RetriNetModel

    bin_sd = tmp_path / "sd-bin"
    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    base.save_pretrained(bin_sd, safe_serialization=False)  # diffusers' models as .bin
    (bin_sd / "text_encoder" / "model.safetensors").unlink()  # transformers 5 saves safetensors only
    torch.save(base.text_encoder.state_dict(), bin_sd / "text_encoder" / "pytorch_model.bin")
    assert not list(bin_sd.rglob("*.safetensors")) and list(bin_sd.rglob("*.bin"))
    run = tmp_path / "run"
    RetriNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")).save_pretrained(
        run / "retrinet")
    zoo = ModelZoo(ZooSpec("sd15", retrinet=str(run), stable_diffusion=str(bin_sd), semantica=None, clip="c",
                           detector="d"), device="cpu")
    with pytest.raises(ValueError, match="config key 'stable_diffusion'"):
        zoo.retrinet()
    spy = LoadSpy(monkeypatch)
    zoo = ModelZoo(ZooSpec("sd15", retrinet=str(run), stable_diffusion=str(bin_sd), semantica=None, clip="c",
                           detector="d", trust_pickle=("stable_diffusion",)), device="cpu")
    with pytest.warns(PickleWarning, match="'stable_diffusion' is trusted"):
        zoo.retrinet()
    assert spy.calls and all(c.get("weights_only") is True for c in spy.calls), spy.calls
    # RetriNet's own folder stays safetensors-only: a .bin there is refused even with the base trusted
    bin_run = tmp_path / "run-bin"
    RetriNetModel.from_pretrained(run / "retrinet").save_pretrained(bin_run / "retrinet", safe_serialization=False)
    zoo = ModelZoo(ZooSpec("sd15", retrinet=str(bin_run), stable_diffusion=str(tiny_sd), semantica=None, clip="c",
                           detector="d", trust_pickle=("stable_diffusion",)), device="cpu")
    with pytest.warns(PickleWarning), pytest.raises(ValueError, match="config key 'retrinet'"):
        zoo.retrinet()
