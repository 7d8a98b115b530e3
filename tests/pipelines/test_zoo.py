import json
from pathlib import Path

import pytest

from pipelines.zoo import ROOT, MissingModel, ModelZoo, ZooSpec, pick_device


def write(tmp_path, **cfg):
    path = tmp_path / "zoo.json"
    path.write_text(json.dumps(cfg))
    return path


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="cannot read the model config"):
        ZooSpec.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ZooSpec.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown keys in .*: unet_path"):
        ZooSpec.from_file(write(tmp_path, family="sd15", clip="c", detector="d", unet_path="x"))
    with pytest.raises(ValueError, match="must set 'clip'"):
        ZooSpec.from_file(write(tmp_path, family="sd15", detector="d"))
    with pytest.raises(ValueError, match="family 'sdxl' is not one of"):
        ZooSpec.from_file(write(tmp_path, family="sdxl", clip="c", detector="d"))
    with pytest.raises(ValueError, match="unknown model family"):
        ModelZoo.load("sdxl")
    with pytest.raises(ValueError, match="needs a config file"):
        ModelZoo.load("sd15")
    with pytest.raises(ValueError, match="describes the 'sd15' family"):
        ModelZoo.load("demo", write(tmp_path, family="sd15", clip="c", detector="d"))


def test_device_and_dtype():
    import torch

    assert pick_device("cpu") == ("cpu", torch.float32)
    if torch.cuda.is_available():
        assert pick_device() == ("cuda", torch.float16)
    else:
        assert pick_device() == ("cpu", torch.float32)
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda:0")


def test_relative_paths_are_relative_to_the_config_and_hub_ids_stay(tmp_path):
    (tmp_path / "weights").mkdir()
    spec = ZooSpec.from_file(write(tmp_path, family="sd15", clip="openai/clip-vit-large-patch14",
                                   detector="./weights", retrinet="weights", _comment="ignored"))
    assert spec.detector == spec.retrinet == str((tmp_path / "weights").resolve())
    assert spec.clip == "openai/clip-vit-large-patch14" and spec.semantica is None


def test_shipped_sd15_config_fails_offline_with_the_missing_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    zoo = ModelZoo.load("sd15", ROOT / "configs" / "sd15.json")
    assert zoo.device == "cpu" or zoo.device.startswith("cuda")
    with pytest.raises(MissingModel, match="no RetriNet pipeline is configured"):
        zoo.retrinet()
    with pytest.raises(ValueError, match=r"openai/clip-vit-large-patch14.*config key 'clip'.*offline"):
        zoo.clip()
    assert zoo.loaded() == []


def test_missing_folder_and_wrong_folder(tmp_path):
    zoo = ModelZoo(ZooSpec("demo", retrinet=str(tmp_path / "nope"), stable_diffusion=None, semantica=str(tmp_path),
                           clip="c", detector="d"))
    with pytest.raises(ValueError, match="config key 'retrinet'.*no such folder"):
        zoo.retrinet()
    with pytest.raises(ValueError, match="not a SemanticaPipeline folder"):
        zoo.semantica()


def test_a_training_output_loads_on_its_base(tiny_sd, tmp_path):
    from diffusers import UNet2DConditionModel

    from pipelines.retrinet import RetriNetModel, RetriNetPipeline

    RetriNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")).save_pretrained(
        tmp_path / "run" / "retrinet")
    no_base = ModelZoo(ZooSpec("sd15", retrinet=str(tmp_path / "run"), stable_diffusion=None, semantica=None,
                               clip="c", detector="d"))
    with pytest.raises(MissingModel, match="stable_diffusion"):
        no_base.retrinet()
    zoo = ModelZoo(ZooSpec("sd15", retrinet=str(tmp_path / "run"), stable_diffusion=str(tiny_sd), semantica=None,
                           clip="c", detector="d"))
    pipe = zoo.retrinet()
    assert isinstance(pipe, RetriNetPipeline) and zoo.retrinet() is pipe  # loaded once, then shared
    assert zoo.loaded() == ["retrinet"]
