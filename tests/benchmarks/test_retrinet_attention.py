"""benchmarks.retrinet_attention: where RetriNet's cross-attentions look."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.retrinet_attention import attention_locality, main, measure


def test_uniform_attention_puts_the_uniform_share_near_each_place():
    side, n = 5, 3
    q, k = torch.zeros(2, 2, side * side, 4), torch.zeros(2, 2, n * side * side, 4)  # every logit 0: uniform
    r = attention_locality(q, k)
    # a corner token has 4 places within one token, an edge one 6, an inner one 9: 3 * 4 * 4 + ... over 25 queries
    expected = (4 * 4 + 12 * 6 + 9 * 9) / (side * side) ** 2
    assert r["side"] == side and r["references"] == n
    assert r["near"] == pytest.approx(expected) and r["uniform"] == pytest.approx(expected)
    assert r["entropy"] == pytest.approx(1.0)


def test_attention_to_the_own_place_counts_in_full():
    side, n = 4, 2
    eye = torch.eye(side * side) * 50  # each query's key is the same place, in every reference
    q, k = eye.view(1, 1, side * side, side * side), eye.repeat(n, 1).view(1, 1, n * side * side, side * side)
    r = attention_locality(q, k)
    assert r["near"] == pytest.approx(1.0, abs=1e-6) and r["uniform"] < 0.5
    assert r["entropy"] == pytest.approx(math.log(n) / math.log(n * side * side), abs=1e-3)
    with pytest.raises(ValueError, match="square grids"):
        attention_locality(torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 12, 4))
    with pytest.raises(ValueError, match="not \\(B, h, L, d\\)"):
        attention_locality(torch.zeros(1, 4, 4), torch.zeros(1, 8, 4))


def test_measure_reads_every_cross_attention_of_a_pipeline(tmp_path, toybooru):
    from pipelines.components import build_components
    from pipelines.retrinet import RetriNetModel, RetriNetPipeline

    c = build_components("tiny", seed=0)
    retrinet = RetriNetModel.from_unet(c["unet"])
    RetriNetPipeline(**c, retrinet=retrinet).save_pretrained(tmp_path / "pipe")
    result = measure(tmp_path / "pipe", toybooru, samples=2, timesteps=(10, 990))
    assert result["samples"] == 2 and result["references"] == 4 and list(result["timesteps"]) == [10, 990]
    for rows in result["timesteps"].values():
        assert len(rows) == retrinet.num_skips + 1  # every skip and the mid block
        assert all(0 <= r["near"] <= 1 and 0 < r["uniform"] <= 1 and 0 < r["entropy"] <= 1 for r in rows)
        assert all(r["references"] == 4 for r in rows)
    import pipelines.retrinet.attention as module

    assert module.F is torch.nn.functional  # the spy is gone
    with pytest.raises(ValueError, match="must lie in"):
        measure(tmp_path / "pipe", toybooru, samples=2, timesteps=(1000,))
    with pytest.raises(SystemExit):
        main(["--pipeline", str(tmp_path / "nothing"), "--data", str(toybooru)])
