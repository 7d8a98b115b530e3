"""Similarity and diversity measures for subject-driven generation (seeds 000 Sec. 4, 001 Sec. 4,
004 Sec. 7): CLIP-I, CLIP-T, SWD, and the few-shot Fréchet distance, precision and recall."""

from pipelines.metrics.clip import ClipScorer
from pipelines.metrics.distribution import frechet_distance, precision_recall
from pipelines.metrics.swd import CLIP_T_OFFSET, VQA_OFFSET, inverse, median_offset, swd

__all__ = ["ClipScorer", "frechet_distance", "precision_recall", "swd", "inverse", "median_offset", "CLIP_T_OFFSET",
           "VQA_OFFSET"]
