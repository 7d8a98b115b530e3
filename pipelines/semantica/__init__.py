"""Semantica: image variations from a frozen image encoder's tokens (seed 004)."""

from pipelines.semantica.evaluate import CopyBaseline, encoder_extractor, few_shot_report, few_shot_scores, read_groups
from pipelines.semantica.model import (
    CONDITIONINGS,
    ENCODER_CLASSES,
    SemanticaConditioner,
    encode_images,
    image_features,
    load_image_encoder,
    prepare_unet,
    process_images,
)
from pipelines.semantica.pipeline import SemanticaPipeline, SemanticaPipelineOutput

__all__ = [
    "CONDITIONINGS",
    "ENCODER_CLASSES",
    "CopyBaseline",
    "SemanticaConditioner",
    "SemanticaPipeline",
    "SemanticaPipelineOutput",
    "encode_images",
    "encoder_extractor",
    "few_shot_report",
    "few_shot_scores",
    "image_features",
    "load_image_encoder",
    "prepare_unet",
    "process_images",
    "read_groups",
]
