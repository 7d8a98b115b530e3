"""The demo family's concept detector, trained by `python -m training.train_detector` and shipped
in assets/demo-zoo/detector, measured on a Toybooru it never saw."""

from pathlib import Path

from benchmarks.concepts import evaluate
from pipelines.detector import DEMO_DETECTOR
from pipelines.concepts import ConceptExtractor
from training.data.toybooru import generate


def test_demo_detector_meets_the_quality_bar(tmp_path, capsys):
    assert (DEMO_DETECTOR / "model.safetensors").is_file(), "the demo detector is not in assets/demo-zoo/detector"
    data = generate(Path(tmp_path) / "tb", 300, seed=101, size=128)  # seed 0 trained it
    result = evaluate(ConceptExtractor.from_pretrained(DEMO_DETECTOR), data, "test")
    with capsys.disabled():
        print(f"\ndemo detector on {result['pictures']} unseen test pictures: median head-box IoU "
              f"{result['head_iou']:.3f}, median figure-mask IoU {result['mask_iou']:.3f}, "
              f"right crop rule {result['rule_accuracy']:.1%}")
    assert result["pictures"] >= 30
    assert result["head_iou"] >= 0.8
    assert result["mask_iou"] >= 0.9
    assert result["rule_accuracy"] >= 0.95
