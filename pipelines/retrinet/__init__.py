"""RetriNet: retrieving concepts from reference pictures for Stable Diffusion (seeds 000-002)."""

from pipelines.retrinet.attention import ControlCrossAttention
from pipelines.retrinet.model import TRAINING_MODES, RetrievalFeatures, RetriNetModel
from pipelines.retrinet.pipeline import (Reference, RetriNetPipeline, RetriNetPipelineOutput, embed_texts,
                                       embed_words)

__all__ = ["ControlCrossAttention", "RetriNetModel", "RetrievalFeatures", "RetriNetPipeline", "RetriNetPipelineOutput",
           "Reference", "TRAINING_MODES", "embed_texts", "embed_words"]
