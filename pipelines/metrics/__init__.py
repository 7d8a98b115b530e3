"""Similarity and diversity measures for subject-driven generation (seeds 000 Sec. 4, 001 Sec. 4,
004 Sec. 7): CLIP-I, CLIP-T, face distance (DF-L2), the VQA score, SWD, and the few-shot Fréchet
distance, precision and recall."""

from pipelines.metrics.clip import ClipScorer
from pipelines.metrics.distribution import frechet_distance, precision_recall
from pipelines.metrics.identity import VQA_QUESTIONS, deepface_embedder, face_distance, vqa_score
from pipelines.metrics.swd import CLIP_T_OFFSET, VQA_OFFSET, inverse, median_offset, swd

__all__ = ["ClipScorer", "deepface_embedder", "face_distance", "vqa_score", "VQA_QUESTIONS", "frechet_distance", "precision_recall", "swd", "inverse", "median_offset", "CLIP_T_OFFSET",
           "VQA_OFFSET"]
