"""The ECLIP model: towers, instance decoder, heads, selection, productness and grounding."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import INSTANCE_FEATURES, READOUTS, ModelConfig
from .decoder import InstanceDecoder
from .grounding import box_by_rule, upsample_heatmap
from .towers import build_text_tower, build_vision_tower


@dataclass
class ImageEncoding:
    global_embedding: torch.Tensor  # (B, D), L2-normalised
    instances: torch.Tensor | None  # (B, M, D), L2-normalised; None without a decoder
    productness: torch.Tensor | None  # (B, M) logits
    attention: torch.Tensor | None  # (B, M, h, w), each map sums to 1
    tokens: torch.Tensor  # (B, N, C) final visual tokens (the baseline's grounding projects them)
    grid: tuple[int, int]


@dataclass
class Grounding:
    heatmaps: torch.Tensor  # (B, H, W) in [0, 1] at the model's input resolution
    boxes: list[tuple[float, float, float, float]]  # (x0, y0, x1, y1) as fractions
    # (B,) the selected query; None when the map is not a query's (the baseline, "similarity")
    query_index: torch.Tensor | None


def select_instances(
    instances: torch.Tensor,  # (B, M, D)
    texts: torch.Tensor,  # (T, D)
    mode: str = "softmax",
    temperature: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-guided selection: the instance score of each image for each text, (B, T), and the
    selection weights over the queries, (B, T, M)."""
    sims = torch.einsum("bmd,td->btm", instances, texts)
    if mode == "softmax":
        weights = (sims / temperature).softmax(dim=-1)
        return (weights * sims).sum(dim=-1), weights
    if mode == "max":
        scores, index = sims.max(dim=-1)
        return scores, F.one_hot(index, sims.shape[-1]).to(sims.dtype)
    raise ValueError(f"unknown selection mode {mode!r} (softmax or max)")


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x unchanged in the forward pass; its gradient multiplied by `scale` in the backward."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return x.detach() + (x - x.detach()) * scale


def product_embedding(encoding: ImageEncoding, readout: str = "instance") -> torch.Tensor:
    """One unit vector per image, no text needed (`ModelConfig.readout`): the instances
    weighted by productness, the global embedding, or the two summed and renormalised."""
    if encoding.instances is None or readout == "global":
        return encoding.global_embedding
    weights = encoding.productness.softmax(dim=-1)  # (B, M)
    instance = F.normalize(torch.einsum("bm,bmd->bd", weights, encoding.instances), dim=-1)
    return _instance_or_mix(instance, encoding.global_embedding, readout)


def _instance_or_mix(instance: torch.Tensor, global_embedding: torch.Tensor, readout: str) -> torch.Tensor:
    """The instance embedding as it is, or summed with the global one and renormalised."""
    if readout == "instance":
        return instance
    if readout == "mix":
        return F.normalize(instance + global_embedding, dim=-1)
    raise ValueError(f"unknown readout {readout!r}; choose from {READOUTS}")


def image_text_scores(
    encoding: ImageEncoding, texts: torch.Tensor, config: ModelConfig
) -> torch.Tensor:
    """(B, T) image-text similarity for zero-shot search and classification
    (`ModelConfig.readout`): the text-guided instance score, the global cosine, or their mean.
    The baseline always reads the global cosine."""
    global_scores = encoding.global_embedding @ texts.T
    if encoding.instances is None or config.readout == "global":
        return global_scores
    instance_scores, _ = select_instances(
        encoding.instances, texts, config.selection, config.selection_temperature
    )
    if config.readout == "instance":
        return instance_scores
    if config.readout == "mix":
        return (instance_scores + global_scores) / 2
    raise ValueError(f"unknown readout {config.readout!r}; choose from {READOUTS}")


def text_guided_embedding(
    encoding: ImageEncoding, texts: torch.Tensor, config: ModelConfig
) -> torch.Tensor:
    """(B, D) the image side of an image-plus-text query: the instance that text i selects in
    image i rather than the productness choice, combined with the global embedding as
    `config.readout` says."""
    if encoding.instances is None or config.readout == "global":
        return encoding.global_embedding
    _, weights = select_instances(
        encoding.instances, texts, config.selection, config.selection_temperature
    )  # (B, T, M)
    weights = weights[torch.arange(len(texts)), torch.arange(len(texts))]  # (B, M): text i, image i
    instance = F.normalize(torch.einsum("bm,bmd->bd", weights, encoding.instances), dim=-1)
    return _instance_or_mix(instance, encoding.global_embedding, config.readout)


def grounding_maps(
    encoding: ImageEncoding,
    texts: torch.Tensor,  # (B, D): text i for image i
    config: ModelConfig,
    projected_tokens: Callable[[], torch.Tensor],  # () -> (B, N, D) tokens through the image head
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grid maps (B, h, w) for image i and text i (`ModelConfig.grounding_map`): the
    similarity of the text to each projected token (MaskCLIP-style; always for the baseline),
    or the selected query's cross-attention, alone or times each projected token's dot product
    with the text ("contribution"), with that query's index (B,)."""
    if config.effective_grounding_map == "similarity":
        sims = torch.einsum("bnd,bd->bn", F.normalize(projected_tokens(), dim=-1), texts)
        return sims.unflatten(-1, encoding.grid), None
    sims = torch.einsum("bmd,bd->bm", encoding.instances, texts)
    index = sims.argmax(dim=-1)  # (B,)
    maps = encoding.attention[torch.arange(len(index)), index]  # (B, h, w)
    if config.grounding_map == "contribution":
        relevance = torch.einsum("bnd,bd->bn", projected_tokens(), texts)  # (B, N)
        maps = maps * relevance.unflatten(-1, encoding.grid)
    return maps, index


class LogitScale(nn.Module):
    """A learnable temperature stored as its log, clamped when read."""

    def __init__(self, init: float, maximum: float):
        super().__init__()
        # shape (1,), not (): FSDP2 shards parameters along dim 0 and refuses scalars
        self.log_scale = nn.Parameter(torch.tensor([math.log(init)]))
        self.maximum = maximum

    def forward(self) -> torch.Tensor:  # () the scale
        return self.log_scale.exp().clamp(max=self.maximum)[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "log_scale"
        if key in state_dict and state_dict[key].dim() == 0:  # saved before the (1,) shape
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ECLIP(nn.Module):
    def __init__(self, config: ModelConfig, pretrained: bool = True):
        """`pretrained`: the towers load their pretrained weights (off when a saved model or a
        checkpoint supplies every weight)."""
        super().__init__()
        self.config = config
        self.vision = build_vision_tower(config.vision, pretrained)
        self.text = build_text_tower(config.text, pretrained)
        self.image_head = nn.Linear(self.vision.width, config.embed_dim, bias=False)
        self.text_head = nn.Linear(self.text.width, config.embed_dim, bias=False)
        # CLIP towers bring their projections into CLIP's joint space: starting the heads there
        # makes the untrained global path exactly the pretrained CLIP (when the sizes agree)
        for head, tower in ((self.image_head, self.vision), (self.text_head, self.text)):
            init = getattr(tower, "head_init", None)  # (C, D) or None
            if init is not None and tuple(init.shape) == (head.in_features, head.out_features):
                with torch.no_grad():
                    head.weight.copy_(init.T)
        scale = lambda: LogitScale(config.init_logit_scale, config.max_logit_scale)  # noqa: E731
        self.logit_scales = nn.ModuleDict({"global": scale()})
        self.decoder: InstanceDecoder | None = None
        if config.decoder is not None:
            if config.decoder.instance_features not in INSTANCE_FEATURES:
                raise ValueError(
                    f"decoder.instance_features must be one of {INSTANCE_FEATURES}, not {config.decoder.instance_features!r}"
                )
            self.decoder = InstanceDecoder(config.decoder, self.vision.width)
            if config.decoder.instance_features == "decoder":  # "tokens" reuses the image head
                self.instance_head = nn.Linear(config.decoder.width, config.embed_dim, bias=False)
            self.productness_head = nn.Linear(config.decoder.width, 1)
            self.logit_scales.update({"inter": scale(), "intra": scale()})

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in both towers (timm's and open_clip's method name)."""
        self.vision.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    @property
    def tokenizer(self):
        return self.text.tokenizer

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    # ------------------------------------------------------------------ encoders

    def encode_image(self, images: torch.Tensor) -> ImageEncoding:
        """images (B, 3, S, S), normalised as `eclip.data.transforms` does."""
        features = self.vision.forward_features(images)
        global_embedding = F.normalize(self.image_head(features.pooled), dim=-1)
        instances = productness = attention = None
        if self.decoder is not None:
            memory = scale_gradient(features.level(self.config.decoder.memory_level), self.config.decoder.memory_grad_scale)
            hidden, attn = self.decoder(memory, features.grid)  # (B,M,C), (B,M,N)
            instances = F.normalize(self._instance_features(hidden, attn, features.tokens), dim=-1)
            productness = self.productness_head(hidden).squeeze(-1)
            attention = attn.unflatten(-1, features.grid)
        return ImageEncoding(
            global_embedding, instances, productness, attention, features.tokens, features.grid
        )

    def _instance_features(self, hidden: torch.Tensor, attention: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, M, D) unnormalised instances (`DecoderConfig.instance_features`): the decoder's
        output through the instance head, or each query's attention pooling the tower's final
        tokens through the image head (the global embedding's own projection)."""
        if self.config.decoder.instance_features == "decoder":
            return self.instance_head(hidden)
        if attention.shape[-1] != tokens.shape[1]:
            raise ValueError(
                f"instance_features='tokens' pools the final tokens ({tokens.shape[1]}) with the attention "
                f"over the decoder's memory ({attention.shape[-1]}): set a memory_level on the same grid"
            )
        return self.image_head(torch.einsum("bmn,bnc->bmc", attention, tokens))  # (B, M, D)

    def encode_text(self, texts: list[str] | str | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Titles or queries -> (T, D), L2-normalised."""
        if isinstance(texts, (list, str)):
            ids, mask = self.tokenizer(texts)
            device = self.text_head.weight.device
            ids, mask = ids.to(device), mask.to(device)
        else:
            ids, mask = texts
        return F.normalize(self.text_head(self.text.forward_features(ids, mask)), dim=-1)

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """What training needs, in one module call (so that DDP, FSDP and torch.compile, which
        hook `forward`, see the whole computation, as open_clip's CLIP.forward): embeddings of
        the images and texts, and the current value of every logit scale."""
        encoding = self.encode_image(images)
        return {
            "global_embedding": encoding.global_embedding,  # (B, D)
            "instances": encoding.instances,  # (B, M, D) or None
            "productness": encoding.productness,  # (B, M) or None
            "texts": self.encode_text((token_ids, mask)),  # (T, D)
            **{f"scale_{name}": scale() for name, scale in self.logit_scales.items()},
        }

    # ------------------------------------------------------------------ scoring

    def select(self, encoding: ImageEncoding, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert encoding.instances is not None
        return select_instances(
            encoding.instances, texts, self.config.selection, self.config.selection_temperature
        )

    def image_text_scores(self, encoding: ImageEncoding, texts: torch.Tensor) -> torch.Tensor:
        """(B, T) similarity used for zero-shot search and classification, read as
        `config.readout` says (the module function `image_text_scores`)."""
        return image_text_scores(encoding, texts, self.config)

    def product_embedding_from(self, encoding: ImageEncoding) -> torch.Tensor:
        """One vector per image with no text, read as `config.readout` says."""
        return product_embedding(encoding, self.config.readout)

    @torch.no_grad()
    def product_embedding(self, images: torch.Tensor) -> torch.Tensor:
        return self.product_embedding_from(self.encode_image(images))

    # ------------------------------------------------------------------ grounding

    def heatmaps_from(self, encoding: ImageEncoding, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Grid maps (B, h, w) for image i and text i, as `config.grounding_map` says (the
        module function `grounding_maps`); tokens are projected only here, not on every
        training step."""
        return grounding_maps(encoding, texts, self.config, lambda: self.image_head(encoding.tokens))

    def box_from_heatmap(self, heatmap: np.ndarray) -> tuple[float, float, float, float]:
        """The box of one upsampled map in [0, 1] (`upsample_heatmap`), by this model's rule
        (`ModelConfig.box_rule()`: above the mean of an attention map, the top fifth of a
        token-similarity map)."""
        return box_by_rule(heatmap, self.config.box_rule())

    @torch.no_grad()
    def ground(self, images: torch.Tensor, texts: list[str] | torch.Tensor) -> Grounding:
        """Where in image i is the product that text i describes: heat map and box."""
        encoding = self.encode_image(images)
        text_emb = self.encode_text(texts) if isinstance(texts, list) else texts
        maps, index = self.heatmaps_from(encoding, text_emb)
        heatmaps = upsample_heatmap(maps, (images.shape[-2], images.shape[-1]))
        boxes = [self.box_from_heatmap(h.cpu().numpy()) for h in heatmaps]
        return Grounding(heatmaps=heatmaps, boxes=boxes, query_index=index)
