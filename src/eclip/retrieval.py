"""Query vectors shared by search and evaluation.

Image + text: the query photo may show several products, and the text says which one. With an
instance decoder the image side is the *text-guided* instance (ECLIP's selection: the decoder
query that matches the text, as in training), not the productness-weighted average; the query
vector is then normalise((1 - w) * image_vec + w * text_vec). Both are unit vectors in the same
space, so with w = 0.5 its inner product with a product vector is proportional to the mean of
the two cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model.inference import ImageEncoding, Inference


def image_text_query(
    model: Inference,
    encoding: ImageEncoding,
    texts: torch.Tensor,  # (B, D) unit vectors: text i goes with image i
    text_weight: float = 0.5,
    field: str = "product",
    readout: str | None = None,
) -> torch.Tensor:
    """(B, D) unit query vectors for image i plus text i. field="global" (an index of global
    embeddings) takes the global embedding as the image side; readout, when given, reads the
    decoder as that instead of the model's config. `model`: ECLIP or the ONNX encoder."""
    if field == "global":
        image_vec = encoding.global_embedding
    else:
        image_vec = model.text_guided_embedding(encoding, texts, readout)
    return mix_query(image_vec, texts, text_weight)


def mix_query(image_vec: torch.Tensor, texts: torch.Tensor, text_weight: float) -> torch.Tensor:
    """(B, D) normalise((1 - w) * image side + w * text): the query of an image plus a text."""
    if not 0.0 <= text_weight <= 1.0:
        raise ValueError(f"text_weight must be in [0, 1], got {text_weight}")
    return F.normalize((1 - text_weight) * image_vec + text_weight * texts, dim=-1)
