"""Few-shot distribution metrics (seed 004, Sec. 7): the Fréchet distance between Gaussian fits of
two feature sets, and k-nearest-neighbour precision and recall (Kynkäänniemi et al., k = 3).

Both take (N, D) arrays or tensors of features (DINOv2 or CLIP embeddings). Pairwise distances are
computed in blocks of rows, so memory stays bounded (a 50,000 x 50,000 comparison holds one block of
``block x 50,000`` distances at a time).
"""

from __future__ import annotations

import numpy as np
import torch


def _features(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float64)
    if t.ndim != 2 or t.shape[0] < 2 or t.shape[1] < 1:
        raise ValueError(f"{name} must be an (N, D) array with N >= 2, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds a value that is not finite")
    return t


def frechet_distance(real, fake) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) of Gaussians fitted to the features."""
    r, f = _features(real, "real"), _features(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real features have {r.shape[1]} dimensions, fake ones {f.shape[1]}")
    mu_r, mu_f = r.mean(0), f.mean(0)
    s_r, s_f = torch.cov(r.T).reshape(r.shape[1], -1), torch.cov(f.T).reshape(f.shape[1], -1)
    # Tr((S_r S_f)^(1/2)) = sum of sqrt of the eigenvalues of S_r^(1/2) S_f S_r^(1/2) (symmetric, PSD)
    w, v = torch.linalg.eigh(s_r)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = root @ s_f @ root
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_r - mu_f).square().sum() + s_r.trace() + s_f.trace() - 2 * tr_sqrt)


def _kth_neighbour_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance from every row of ``x`` to its k-th nearest other row."""
    radii = torch.empty(x.shape[0], dtype=x.dtype)
    for i in range(0, x.shape[0], block):
        d = torch.cdist(x[i:i + block], x)  # (block, N)
        radii[i:i + block] = d.kthvalue(k + 1, dim=1).values  # + 1: the row itself is at distance 0
    return radii


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """Whether each point lies within the radius of at least one centre."""
    out = torch.zeros(points.shape[0], dtype=torch.bool)
    for i in range(0, points.shape[0], block):
        d = torch.cdist(points[i:i + block], centres)  # (block, M)
        out[i:i + block] = (d <= radii[None, :]).any(dim=1)
    return out


def precision_recall(real, fake, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Precision: the share of fake features inside the k-NN balls of the real ones; recall: the
    share of real features inside the k-NN balls of the fake ones."""
    r, f = _features(real, "real"), _features(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real features have {r.shape[1]} dimensions, fake ones {f.shape[1]}")
    if not 1 <= k < min(r.shape[0], f.shape[0]):
        raise ValueError(f"k = {k} needs more than k features in each set ({r.shape[0]} and {f.shape[0]})")
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    r_radii, f_radii = _kth_neighbour_radii(r, k, block), _kth_neighbour_radii(f, k, block)
    precision = _covered(f, r, r_radii, block).double().mean().item()
    recall = _covered(r, f, f_radii, block).double().mean().item()
    return precision, recall
