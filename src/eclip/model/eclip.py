"""The ECLIP model: towers, instance decoder, heads and productness. Selection, scores and
grounding are `Inference`'s, shared with the ONNX runtime."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import INSTANCE_FEATURES, ModelConfig
from ..devices import resolve_device
from .decoder import InstanceDecoder
from .inference import Grounding, ImageEncoding, Inference, select_instances
from .layers import MLP
from .towers import build_text_tower, build_vision_tower

__all__ = ["ECLIP", "Grounding", "ImageEncoding", "LogitScale", "scale_gradient", "select_instances"]


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x unchanged in the forward pass; its gradient multiplied by `scale` in the backward."""
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return x.detach() + (x - x.detach()) * scale


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


class ECLIP(nn.Module, Inference):
    """Image and text towers with their heads, and (unless the baseline) the instance decoder
    with its instance and productness heads. `forward` returns what training needs; the
    inference methods (`image_text_scores`, `product_embedding`, `ground`, ...) are
    `Inference`'s, on top of `encode_image`, `encode_text` and `projected_tokens`."""

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
            level = config.decoder.memory_level
            fuse = config.decoder.memory_fuse_final and level not in (-1, self.vision.num_layers - 1)
            self.decoder = InstanceDecoder(
                config.decoder, self.vision.level_width(level), self.vision.width if fuse else None
            )
            if config.decoder.instance_features == "decoder":  # "tokens" reuses the image head
                self.instance_head = nn.Linear(config.decoder.width, config.embed_dim, bias=False)
            self.productness_head = nn.Linear(config.decoder.width, 1)
            if config.decoder.intra_head:
                self.intra_head = MLP(config.embed_dim, 2.0)
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

    @property
    def device(self) -> torch.device:
        return self.image_head.weight.device

    def _prepare(self, device: str | torch.device | None) -> None:
        self.eval()
        if device is not None:
            self.to(resolve_device(device))

    # ------------------------------------------------------------------ the hub

    def save_pretrained(self, folder: str | Path, evaluation: dict | None = None) -> Path:
        """config.json, model.safetensors and a model card in `folder` (`eclip.io.save_model`)."""
        from ..io import save_model

        return save_model(self, folder, evaluation)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str | torch.device | None = None) -> ECLIP:
        """A folder or `hf-hub:org/name` (`eclip.io.load_model`)."""
        from ..io import load_model

        return load_model(name_or_path, device)

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False,
                    evaluation: dict | None = None) -> str:
        """Save to a temporary folder and upload it to the hub repository `repo_id`; the
        commit's URL (`eclip.hub.push_folder`)."""
        from ..hub import push_folder

        with tempfile.TemporaryDirectory(prefix="eclip-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", evaluation)
            return push_folder(folder, repo_id, token=token, private=private)

    # ------------------------------------------------------------------ encoders

    def encode_image(self, images: torch.Tensor, frozen_layers: int = 0) -> ImageEncoding:
        """images (B, 3, S, S), normalised as `eclip.data.transforms` does; or, with
        `frozen_layers` k > 0, the vision tower's `forward_frozen(images, k)` computed earlier
        (a feature cache of a frozen prefix). Moved to the model's device."""
        images = images.to(self.device)
        features = self.vision.forward_features_chunked(images, frozen_layers)
        global_embedding = F.normalize(self.image_head(features.pooled), dim=-1)
        instances = productness = attention = None
        if self.decoder is not None:
            level, grad_scale = self.config.decoder.memory_level, self.config.decoder.memory_grad_scale
            memory, grid = scale_gradient(features.level(level), grad_scale), features.level_grid(level)
            final = scale_gradient(features.tokens, grad_scale) if self.decoder.final_proj is not None else None
            hidden, attn = self.decoder(memory, grid, final, features.grid)  # (B,M,C), (B,M,N)
            attention = attn.unflatten(-1, grid)  # (B, M, h, w)
            instances = F.normalize(self._instance_features(hidden, attention, features), dim=-1)
            productness = self.productness_head(hidden).squeeze(-1)
        return ImageEncoding(
            global_embedding, instances, productness, attention, features.tokens, features.grid
        )

    def _instance_features(self, hidden: torch.Tensor, attention: torch.Tensor, features) -> torch.Tensor:
        """(B, M, D) unnormalised instances (`DecoderConfig.instance_features`): the decoder's
        output through the instance head, or each query's attention (B, M, h, w) pooling the
        tower's final tokens through the image head (the global embedding's own projection).
        Attention on a finer grid than the final tokens is summed over each token's cells."""
        if self.config.decoder.instance_features == "decoder":
            return self.instance_head(hidden)
        (h, w), (th, tw) = attention.shape[-2:], features.grid
        if (h, w) != (th, tw):
            if h % th == 0 and w % tw == 0:  # (B, M, th, h / th, tw, w / tw) summed per token (ONNX-exportable)
                attention = attention.unflatten(-1, (tw, w // tw)).unflatten(-3, (th, h // th)).sum(dim=(-3, -1))
            else:  # grids that do not nest (odd input sizes): area-weighted, renormalised
                attention = F.adaptive_avg_pool2d(attention, features.grid)
                attention = attention / attention.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        weights = attention.flatten(2)  # (B, M, N) over the final tokens
        return self.image_head(torch.einsum("bmn,bnc->bmc", weights, features.tokens))  # (B, M, D)

    def encode_text(self, texts: list[str] | str | tuple[torch.Tensor, torch.Tensor], frozen_layers: int = 0) -> torch.Tensor:
        """Titles or queries -> (T, D), L2-normalised. Given as (ids, mask) with
        `frozen_layers` k > 0, the ids are the text tower's `forward_frozen(ids, mask, k)`."""
        ids, mask = self.tokenizer(texts) if isinstance(texts, (list, str)) else texts
        ids, mask = ids.to(self.device), mask.to(self.device)
        return F.normalize(self.text_head(self.text.forward_features_from(ids, mask, frozen_layers)), dim=-1)

    def forward(
        self,
        images: torch.Tensor,
        token_ids: torch.Tensor,
        mask: torch.Tensor,
        vision_frozen_layers: int = 0,
        text_frozen_layers: int = 0,
    ) -> dict[str, torch.Tensor | None]:
        """What training needs, in one module call (so that DDP, FSDP and torch.compile, which
        hook `forward`, see the whole computation, as open_clip's CLIP.forward): embeddings of
        the images and texts, and the current value of every logit scale.

        A non-zero `vision_frozen_layers` / `text_frozen_layers` k means `images` / `token_ids`
        already hold that tower's output after its first k (frozen) layers: a feature cache
        computed them once, and only the rest runs here."""
        encoding = self.encode_image(images, vision_frozen_layers)
        intra_instances = None
        if encoding.instances is not None and self.config.decoder.intra_head:
            intra_instances = F.normalize(self.intra_head(encoding.instances), dim=-1)
        return {
            "global_embedding": encoding.global_embedding,  # (B, D)
            "instances": encoding.instances,  # (B, M, D) or None
            "productness": encoding.productness,  # (B, M) or None
            "texts": self.encode_text((token_ids, mask), text_frozen_layers),  # (T, D)
            "intra_instances": intra_instances,  # (B, M, D) through the intra head, or None
            **{f"scale_{name}": scale() for name, scale in self.logit_scales.items()},
        }

    def projected_tokens(self, encoding: ImageEncoding, grounding_map: str) -> torch.Tensor:
        """(B, N, D) the final visual tokens through the image head (grounding reads them)."""
        return self.image_head(encoding.tokens)
