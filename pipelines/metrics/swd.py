"""Similarity Weighted Diversity (seed 000, Sec. 4; seed 001, Sec. 4).

    SWD(div, sim)(f) = 1 / |runs| * sum over runs (r, theta_r), g = f(r, theta_r) of div(r, g) * sim(r, g)

A run scores high only where the picture is both different from its reference in the asked-for
way (div: CLIP-T, the VQA score) and faithful to it (sim: CLIP-I, 1 / DF-L2). By Cauchy-Schwarz,
(sum div * sim)^2 <= (sum div^2) * (sum sim^2): the bound is reached when div and sim rise together.

The papers transform the raw measures before multiplying them:

- a distance (DF-L2, smaller is more similar) becomes a similarity as ``1 / distance`` (``inverse``);
- "we add the same number to the lower median, keeping all numbers positive, so that the numerators
  and L2 have the same median" (seed 000, Supp. 8.4): Table 2 adds ``+1.3`` to CLIP-T and ``+1`` to
  the VQA score (``CLIP_T_OFFSET``, ``VQA_OFFSET``); ``median_offset`` computes such a number.
"""

from __future__ import annotations

import numpy as np

CLIP_T_OFFSET = 1.3  # seed 000, Table 2: added to CLIP-T before multiplying with 1 / DF-L2
VQA_OFFSET = 1.0  # seed 000, Table 2: added to the VQA score before multiplying with 1 / DF-L2


def _array(values, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds a value that is not finite")
    return a


def swd(div, sim) -> float:
    """The mean over runs of ``div * sim``; ``div`` and ``sim`` hold one number per run."""
    d, s = _array(div, "div"), _array(sim, "sim")
    if d.shape != s.shape:
        raise ValueError(f"{d.size} diversity scores for {s.size} similarity scores; one pair per run")
    return float(np.mean(d * s))


def inverse(distances) -> np.ndarray:
    """``1 / distance``: a distance-type similarity (DF-L2) turned into larger-is-more-similar."""
    d = _array(distances, "distances")
    if np.any(d <= 0):
        raise ValueError("distances must be positive to be inverted")
    return 1.0 / d


def median_offset(values, target) -> float:
    """The number to add to ``values`` so that their median equals ``target``'s (Supp. 8.4)."""
    return float(np.median(_array(target, "target")) - np.median(_array(values, "values")))
