import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.metrics import (CLIP_T_OFFSET, ClipScorer, frechet_distance, inverse, median_offset,
                               precision_recall, swd)


def pictures(n, seed=0, size=40):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_clip_t_equals_torchmetrics_clip_score(tiny_clip):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    scorer = ClipScorer.from_pretrained(str(tiny_clip))
    images, prompts = pictures(6), ["1girl, red hair", "a cat", "blue dress", "smiling", "outdoors", "face"]
    ours = scorer.clip_t(images, prompts)
    class Tensors(torch.nn.Module):
        """torchmetrics 1.9 expects transformers 4's tensors from get_*_features; v5 returns outputs."""

        def __init__(self, clip):
            super().__init__()
            self.clip, self.config = clip, clip.config

        def get_image_features(self, *a, **k):
            return self.clip.get_image_features(*a, **k).pooler_output

        def get_text_features(self, *a, **k):
            return self.clip.get_text_features(*a, **k).pooler_output

    # the same locally saved model, handed over as torchmetrics accepts a local one
    metric = CLIPScore(model_name_or_path=lambda: (Tensors(CLIPModel.from_pretrained(tiny_clip)),
                                                   CLIPProcessor.from_pretrained(tiny_clip)))
    for img, prompt, value in zip(images, prompts, ours):
        tensor = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)
        theirs = metric(tensor, prompt).item() / 100
        metric.reset()
        assert theirs == pytest.approx(max(float(value), 0.0), abs=1e-4)
    assert (ours > 0).any()  # at least one positive cosine was compared without the clamp


def test_clip_i_of_a_picture_with_itself_is_one(tiny_clip):
    scorer = ClipScorer.from_pretrained(str(tiny_clip), batch_size=2)
    images = pictures(3)
    assert torch.allclose(scorer.clip_i(images, [[im] for im in images]), torch.ones(3), atol=1e-5)
    other = pictures(2, seed=1)
    mixed = scorer.clip_i(images[:1], [[images[0], other[0]]])
    single = scorer.clip_i(images[:1], [[other[0]]])
    assert mixed.item() == pytest.approx((1 + single.item()) / 2, abs=1e-5)
    with pytest.raises(ValueError, match="no reference"):
        scorer.clip_i(images[:1], [[]])
    with pytest.raises(ValueError, match="3 pictures for 2 prompts"):
        scorer.clip_t(images, ["a", "b"])


def test_scores_equal_clip_i_and_clip_t_computed_apart(tiny_clip):
    scorer = ClipScorer.from_pretrained(str(tiny_clip), batch_size=2)
    images, refs = pictures(3), pictures(4, seed=2)
    references = [[refs[0]], [refs[1], refs[2]], [refs[3], refs[0], refs[1]]]
    prompts = ["blue hair", "red shirt", "1girl, outdoors"]
    clip_i, clip_t = scorer.scores(images, references, prompts)
    assert torch.allclose(clip_i, scorer.clip_i(images, references), atol=1e-5)
    assert torch.allclose(clip_t, scorer.clip_t(images, prompts), atol=1e-5)
    with pytest.raises(ValueError, match="one of each per picture"):
        scorer.scores(images, references[:2], prompts)
    with pytest.raises(ValueError, match="no reference"):
        scorer.scores(images[:1], [[]], prompts[:1])


def test_frechet_distance_matches_scipy():
    from scipy import linalg

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(300, 16)), rng.normal(0.3, 1.2, size=(250, 16)) @ rng.normal(size=(16, 16)) * 0.5
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance(real, fake) == pytest.approx(expected, abs=1e-6)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(torch.tensor(real), torch.tensor(fake)) == pytest.approx(expected, abs=1e-6)


def test_precision_recall_match_prdc():
    from prdc import compute_prdc

    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(400, 8)), rng.normal(0.5, 1.0, size=(300, 8))
    expected = compute_prdc(real_features=real, fake_features=fake, nearest_k=3)
    p, r = precision_recall(real, fake, k=3, block=37)  # an odd block size: the blocks must not matter
    assert p == pytest.approx(expected["precision"], abs=1e-12)
    assert r == pytest.approx(expected["recall"], abs=1e-12)


def test_copying_the_conditioning_picture_lowers_recall():
    """Seed 004, Sec. 7: a model that copies its one conditioning picture covers the group badly."""
    rng = np.random.default_rng(2)
    group = rng.normal(size=(200, 12))  # features of the test pictures of one group
    new_draws = rng.normal(size=(200, 12))  # a model that draws new pictures of the group
    copies = np.repeat(group[:1], 200, axis=0) + rng.normal(scale=0.01, size=(200, 12))  # one-shot copying
    _, recall_new = precision_recall(group, new_draws)
    _, recall_copy = precision_recall(group, copies)
    assert recall_copy < 0.1 < 0.5 < recall_new


def test_copying_lowers_recall_on_toybooru_features(tmp_path):
    """The same argument on Toybooru: features are 8 x 8 thumbnails of the figure (background
    removed); the "copying" model returns its one conditioning picture, the other draws new
    pictures of the same cluster (here: the cluster's held-out pictures)."""
    from training.data.retribooru import open_record, read_annotations
    from training.data.toybooru import generate
    from pipelines.concepts import remove_background

    root = generate(tmp_path / "tb", 300, seed=9, size=64)
    records, _ = read_annotations(root)

    def feature(rec):
        image, mask = open_record(root, rec)
        return np.asarray(remove_background(image, mask).resize((8, 8), Image.Resampling.BOX), np.float64).ravel()

    recalls_copy, recalls_new = [], []
    by_cluster = {}
    for r in records:
        by_cluster.setdefault(r["cluster"], []).append(r)
    clusters = [c for c in by_cluster.values() if len(c) >= 6]
    assert len(clusters) >= 20
    for c in clusters:
        feats = np.stack([feature(r) for r in c])
        real, conditioning, new = feats[:3], feats[3], feats[4:6]
        copies = np.repeat(conditioning[None], len(new), axis=0) + np.random.default_rng(0).normal(0, 0.5, new.shape)
        recalls_copy.append(precision_recall(real, copies, k=1)[1])
        recalls_new.append(precision_recall(real, new, k=1)[1])
    assert np.mean(recalls_copy) < np.mean(recalls_new)


def test_precision_recall_bound_memory_by_blocks():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(50, 4)), rng.normal(size=(60, 4))
    assert precision_recall(a, b, block=1) == precision_recall(a, b, block=1000)
    with pytest.raises(ValueError, match="k = 60"):
        precision_recall(a, b, k=60)
    with pytest.raises(ValueError, match="dimensions"):
        precision_recall(a, rng.normal(size=(60, 5)))


@pytest.mark.parametrize("seed", range(20))
def test_swd_obeys_the_cauchy_schwarz_bound(seed):
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 200)
    div, sim = rng.uniform(-1, 2, n), rng.uniform(0, 3, n)
    value = swd(div, sim)
    assert (value * n) ** 2 <= (div ** 2).sum() * (sim ** 2).sum() + 1e-9
    assert value == pytest.approx(float(np.mean(div * sim)))


def test_swd_transforms():
    assert inverse([0.5, 2.0]).tolist() == [2.0, 0.5]
    with pytest.raises(ValueError, match="positive"):
        inverse([0.0, 1.0])
    assert median_offset([0.2, 0.3, 0.25], [1.5, 1.6, 1.55]) == pytest.approx(1.3)
    assert CLIP_T_OFFSET == 1.3
    with pytest.raises(ValueError, match="one pair per run"):
        swd([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        swd([], [])
    with pytest.raises(ValueError, match="not finite"):
        swd([np.nan], [1])


def test_face_distance_uses_the_extractors_faces(tiny_clip):
    from pipelines.concepts import ConceptExtractor
    from pipelines.detector import Detection
    from pipelines.metrics import face_distance

    class Heads:
        """A detector that finds a head in the top half of pictures wider than 30 px."""

        def __call__(self, image):
            w, h = image.size
            return ([Detection((0, 0, w, h // 2), 0.9)] if w > 30 else []), []

    scorer = ClipScorer.from_pretrained(str(tiny_clip))
    ex = ConceptExtractor(Heads())
    a, b = pictures(2, seed=4)
    d = face_distance([a, a, b, Image.new("RGB", (20, 20))], [a, b, a, a], ex, scorer.image_embeds)
    assert d[0].item() == pytest.approx(0.0, abs=1e-5)
    assert d[1].item() == pytest.approx(d[2].item(), abs=1e-5) and d[1] > 0.01
    assert torch.isnan(d[3])  # no face in the generated picture
    face_a = ex.extract(a).face
    face_b = ex.extract(b).face
    e = torch.nn.functional.normalize(scorer.image_embeds([face_a, face_b]), dim=-1)
    assert d[1].item() == pytest.approx((e[0] - e[1]).norm().item(), abs=1e-5)


def test_vqa_score_is_the_answers_cosine_distance(tiny_clip):
    from pipelines.metrics import vqa_score

    scorer = ClipScorer.from_pretrained(str(tiny_clip))
    same = vqa_score([["smiling", "long hair"]], [["smiling", "long hair"]], scorer.text_embeds)
    assert same.item() == pytest.approx(0.0, abs=1e-5)
    g, r = ["smiling", "standing"], ["crying", "sitting"]
    e = scorer.text_embeds(g + r)
    expected = (1 - (e[:2] * e[2:]).sum(-1)).mean()
    assert vqa_score([g], [r], scorer.text_embeds).item() == pytest.approx(expected.item(), abs=1e-5)
    with pytest.raises(ValueError, match="as many answers"):
        vqa_score([["a"]], [["a", "b"]], scorer.text_embeds)


def test_deepface_backend_is_optional():
    import importlib.util

    from pipelines.metrics import deepface_embedder

    if importlib.util.find_spec("deepface") is None:
        with pytest.raises(ValueError, match="pip install deepface"):
            deepface_embedder()
    else:  # installed: the backend builds (its weights come on first use)
        assert callable(deepface_embedder())
