"""Face distance (DF-L2) and the VQA score (seed 000, Sec. 4 and 6.1, Supp. 8.1; seed 002, A.2).

- **DF-L2**: the L2 distance between unit-norm embeddings of the face crop of a generated picture
  and of its reference, faces found by ``pipelines.concepts.ConceptExtractor``; the embedder is any
  ``pictures -> (N, D)`` function (the CLIP image tower, ``ClipScorer.image_embeds``, by default in
  the studio). Smaller is more similar; ``swd`` takes ``1 / DF-L2``. NaN where no face is found.
- **VQA score**: a VQA model answers the same questions (expression, hairstyle, pose, clothing)
  about the generated picture and its reference; the answers are embedded with the CLIP text tower
  and the score is the cosine *distance* between them, averaged over the questions: larger is more
  diverse, a ``div`` for SWD.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from PIL import Image

Embed = Callable[[Sequence[Image.Image]], torch.Tensor]
EmbedText = Callable[[Sequence[str]], torch.Tensor]

# seed 000, Fig. 5 and Supp. 8.1: what the VQA model is asked about a picture
VQA_QUESTIONS = (
    "What is the facial expression of the character?",
    "What is the hairstyle of the character?",
    "What is the pose of the character?",
    "What is the character wearing?",
)


def face_distance(generated: Sequence[Image.Image], references: Sequence[Image.Image], extractor,
                  embed: Embed) -> torch.Tensor:
    """(N,) L2 distances between unit-norm face embeddings of ``generated[i]`` and ``references[i]``."""
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} pictures for {len(references)} references")
    faces = [extractor.extract(im).face for im in (*generated, *references)]
    n = len(generated)
    found = [i for i in range(n) if faces[i] is not None and faces[n + i] is not None]
    out = torch.full((n,), math.nan)
    if found:
        e = torch.nn.functional.normalize(embed([faces[i] for i in found] + [faces[n + i] for i in found]).float(), dim=-1)
        out[found] = (e[:len(found)] - e[len(found):]).norm(dim=-1)
    return out


def vqa_score(generated_answers: Sequence[Sequence[str]], reference_answers: Sequence[Sequence[str]],
              embed_text: EmbedText) -> torch.Tensor:
    """(N,) mean over questions of 1 - cos(answer to the generated picture, answer to its reference)."""
    if len(generated_answers) != len(reference_answers):
        raise ValueError(f"{len(generated_answers)} answer lists for {len(reference_answers)} references")
    if any(len(g) != len(r) or not g for g, r in zip(generated_answers, reference_answers)):
        raise ValueError("each picture needs as many answers as its reference, and at least one")
    flat_g = [a for g in generated_answers for a in g]
    flat_r = [a for r in reference_answers for a in r]
    e = torch.nn.functional.normalize(embed_text(flat_g + flat_r).float(), dim=-1)
    dist = 1 - (e[:len(flat_g)] * e[len(flat_g):]).sum(-1)
    out, start = [], 0
    for g in generated_answers:
        out.append(dist[start:start + len(g)].mean())
        start += len(g)
    return torch.stack(out)


def deepface_embedder(model_name: str = "Facenet512") -> Embed:
    """An ``embed`` for ``face_distance`` from DeepFace (the paper's DF-L2), when it is installed.

    DeepFace downloads its weights on first use, so it is an option for machines with a network,
    never a default; without the package this raises a clear ``ValueError``.
    """
    import importlib.util

    if importlib.util.find_spec("deepface") is None:
        raise ValueError("the DeepFace backend needs the deepface package: pip install deepface")
    import numpy as np
    from deepface import DeepFace

    def embed(faces: Sequence[Image.Image]) -> torch.Tensor:
        vectors = []
        for face in faces:
            bgr = np.asarray(face.convert("RGB"))[:, :, ::-1]
            rep = DeepFace.represent(bgr, model_name=model_name, detector_backend="skip", enforce_detection=False)
            vectors.append(rep[0]["embedding"])
        return torch.tensor(vectors, dtype=torch.float32)

    return embed
