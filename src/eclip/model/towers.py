"""Vision and text towers behind one interface.

Every vision tower implements `forward_features(images) -> VisionFeatures`: a pooled global
feature, the spatial tokens and their grid shape. Every text tower implements
`forward_features(token_ids, mask) -> (B, C)` and carries its `tokenizer`. The rest of the model
only sees this interface, so towers from other libraries plug in behind it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TextConfig, VisionConfig
from .layers import Block, neighbourhood_mask
from .tokenizer import HashTokenizer

# Whether a tower being built fetches/loads its pretrained weights. `io.load_model` turns it off:
# there the architecture comes from config.json and every weight from model.safetensors, so a
# saved model reloads offline and is not first filled with weights it overwrites anyway.
_LOAD_PRETRAINED = contextvars.ContextVar("eclip_load_pretrained", default=True)


def pretrained_enabled() -> bool:
    return _LOAD_PRETRAINED.get()


@contextlib.contextmanager
def pretrained_weights(enabled: bool) -> Iterator[None]:
    """Within the block, towers are built with (True) or without (False) pretrained weights."""
    token = _LOAD_PRETRAINED.set(enabled)
    try:
        yield
    finally:
        _LOAD_PRETRAINED.reset(token)


class Tokenizer(Protocol):
    def __call__(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (T, L) long and a mask (T, L) bool, True on real tokens."""
        ...


def layers_by_prefix(module: nn.Module, stem: tuple[str, ...], blocks: str, num_blocks: int) -> dict[str, int]:
    """Layer index per parameter name: 0 for names starting with a `stem` prefix, i + 1 under
    `{blocks}{i}.`, and `num_blocks` for the rest (the final norm goes with the last block)."""
    layers = {}
    for name, _ in module.named_parameters():
        if name.startswith(blocks):
            layers[name] = int(name[len(blocks) :].split(".", 1)[0]) + 1
        elif name.startswith(stem):
            layers[name] = 0
        else:
            layers[name] = num_blocks
    return layers


class _TunableTower(nn.Module):
    """What both tower kinds share for fine-tuning: layer indices and frozen BatchNorms."""

    def param_layers(self) -> tuple[dict[str, int], int]:
        """(layer of each parameter, n): 0 = input embedding, 1..n the blocks, the final norm in
        layer n. Partial unfreezing and layer-wise lr decay read it; a tower that does not
        override it counts as a single block."""
        return {name: 1 for name, _ in self.named_parameters()}, 1

    def train(self, mode: bool = True):
        # A BatchNorm whose parameters are all frozen keeps its running statistics too: a
        # frozen pretrained CNN must not drift towards the batch statistics of training data.
        super().train(mode)
        for module in self.modules():
            params = list(module.parameters(recurse=False))
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
                module.eval()
        return self


@dataclass
class VisionFeatures:
    pooled: torch.Tensor  # (B, C) global feature
    tokens: torch.Tensor  # (B, N, C) spatial tokens, row-major over the grid
    grid: tuple[int, int]  # (h, w) with h * w == N
    # (B, N, C) tokens after the stem (index 0) and after each block (1..depth), same grid;
    # the instance decoder may read an earlier, more local level than the last
    levels: list[torch.Tensor] | None = None

    def level(self, index: int) -> torch.Tensor:
        """Tokens at a depth: -1 (or depth) is the final normalised output."""
        if index == -1 or (self.levels is not None and index == len(self.levels) - 1):
            return self.tokens
        if self.levels is None:
            raise ValueError(f"this vision tower exposes only its final tokens, not level {index}")
        return self.levels[index]


class VisionTower(_TunableTower):
    """Interface: `width` (C of pooled and tokens), `image_size` and `forward_features`.
    Towers that come with a pretrained projection into a joint space (CLIP) expose it as
    `head_init` (C, D); it is not part of the state dict."""

    width: int
    image_size: int
    head_init: torch.Tensor | None = None
    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass rather than keep its activations."""
        self.grad_checkpointing = enable

    def forward_features(self, images: torch.Tensor) -> VisionFeatures:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> VisionFeatures:
        return self.forward_features(images)


class TextTower(_TunableTower):
    """Interface: `width`, `tokenizer` and `forward_features(ids, mask) -> (B, C)`."""

    width: int
    tokenizer: Tokenizer
    head_init: torch.Tensor | None = None
    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward_features(token_ids, mask)


def run_block(block: nn.Module, x: torch.Tensor, checkpointed: bool, **kwargs) -> torch.Tensor:
    """`block(x, **kwargs)`, recomputed in the backward pass when `checkpointed` (in training)."""
    if checkpointed and block.training and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False, **kwargs)
    return block(x, **kwargs)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels at each position of a (B, C, H, W) map (as in ConvNeXt):
    unlike GroupNorm it keeps a feature independent of other positions, and unlike BatchNorm
    of the rest of the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def stem_norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "channel":
        return ChannelNorm(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown stem_norm {kind!r} (channel or group)")


def build_stem(kind: str, width: int, patch_size: int, norm: str) -> nn.Module:
    """Images (B, 3, S, S) -> (B, width, S / patch, S / patch)."""
    if kind == "patch":
        return nn.Conv2d(3, width, patch_size, stride=patch_size)
    if kind == "conv":
        layers, channels, stride = [], 3, 1
        while stride < patch_size:
            out = width if stride * 2 == patch_size else max(16, width // (patch_size // (stride * 2)))
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), stem_norm_layer(norm, out), nn.GELU()]
            channels, stride = out, stride * 2
        if stride != patch_size:
            raise ValueError(f"conv stem needs a power-of-two patch_size, got {patch_size}")
        layers.append(nn.Conv2d(channels, width, 1))
        return nn.Sequential(*layers)
    raise ValueError(f"unknown stem {kind!r} (patch or conv)")


class BuiltinVisionTower(VisionTower):
    """What the built-in towers share: a stem (`build_stem`) from the image onto a square grid
    of `image_size / patch_size` tokens of `width` channels."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        self.width = config.width
        self.image_size = config.image_size
        side = config.image_size // config.patch_size
        self.grid = (side, side)
        self.patch_embed = build_stem(config.stem, config.width, config.patch_size, config.stem_norm)


class TinyViT(BuiltinVisionTower):
    """A plain ViT. Global feature = mean of the final normalised tokens, so a token projected
    by the image head lives in the same space as the global embedding (what MaskCLIP-style
    grounding of the CLIP baseline relies on)."""

    def __init__(self, config: VisionConfig):
        super().__init__(config)
        side = self.grid[0]
        self.pos_embed = nn.Parameter(torch.randn(1, side * side, config.width) * 0.02)
        self.registers = nn.Parameter(torch.randn(1, config.registers, config.width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width)
        self.local_blocks = config.local_blocks
        self.register_buffer(
            "local_mask", neighbourhood_mask(side, side, config.local_radius, config.registers), persistent=False
        )

    def forward_features(self, images: torch.Tensor) -> VisionFeatures:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, C)
        n = x.shape[1]
        x = x + self.pos_embed
        levels = [x]
        x = torch.cat([x, self.registers.expand(x.shape[0], -1, -1)], dim=1)  # (B, N + R, C)
        for i, block in enumerate(self.blocks):
            x = run_block(block, x, self.grad_checkpointing, attn_mask=self.local_mask if i < self.local_blocks else None)
            levels.append(x[:, :n])
        tokens = self.norm(x[:, :n])
        return VisionFeatures(pooled=tokens.mean(dim=1), tokens=tokens, grid=self.grid, levels=levels)

    def param_layers(self) -> tuple[dict[str, int], int]:
        n = len(self.blocks)
        return layers_by_prefix(self, ("patch_embed", "pos_embed", "registers"), "blocks.", n), n


class ConvBlock(nn.Module):
    """A ConvNeXt block at the token grid: depthwise 5x5, LayerNorm over channels, pointwise MLP,
    residual."""

    def __init__(self, width: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.spatial = nn.Conv2d(width, width, 5, padding=2, groups=width)
        self.norm = ChannelNorm(width)
        self.expand = nn.Conv2d(width, hidden, 1)
        self.project = nn.Conv2d(hidden, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w)
        return x + self.project(nn.functional.gelu(self.expand(self.norm(self.spatial(x)))))


class TinyConvNet(BuiltinVisionTower):
    """A small convolutional tower with the ViT's interface: the same stem, then `depth`
    ConvNeXt blocks at the token grid instead of transformer blocks. Convolutions learn shape
    from few samples where a ViT trained from scratch needs many more steps
    (`tools/shape_probe.py`). Tokens = the final map, LayerNormed; global = their mean."""

    def __init__(self, config: VisionConfig):
        super().__init__(config)
        self.blocks = nn.ModuleList(ConvBlock(config.width, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)

    def forward_features(self, images: torch.Tensor) -> VisionFeatures:
        x = self.patch_embed(images)  # (B, C, h, w)
        levels = [x.flatten(2).transpose(1, 2)]
        for block in self.blocks:
            x = run_block(block, x, self.grad_checkpointing)
            levels.append(x.flatten(2).transpose(1, 2))  # (B, N, C)
        tokens = self.norm(levels[-1])
        return VisionFeatures(pooled=tokens.mean(dim=1), tokens=tokens, grid=self.grid, levels=levels)

    def param_layers(self) -> tuple[dict[str, int], int]:
        n = len(self.blocks)
        return layers_by_prefix(self, ("patch_embed",), "blocks.", n), n


class TinyTextTransformer(TextTower):
    """A bidirectional transformer over hashed words; pooled = mean over real tokens."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.width = config.width
        self.tokenizer = HashTokenizer(config.vocab_size, config.context_length)
        self.token_embed = nn.Embedding(config.vocab_size, config.width)
        self.pos_embed = nn.Parameter(torch.randn(1, config.context_length, config.width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward_features(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embed(token_ids) + self.pos_embed[:, : token_ids.shape[1]]
        for block in self.blocks:
            x = run_block(block, x, self.grad_checkpointing, key_padding_mask=mask)
        x = self.norm(x)
        weights = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def param_layers(self) -> tuple[dict[str, int], int]:
        n = len(self.blocks)
        return layers_by_prefix(self, ("token_embed", "pos_embed"), "blocks.", n), n


VISION_KINDS = ("vit", "convnet", "open_clip", "timm", "efficientnet_lite0")
TEXT_KINDS = ("transformer", "open_clip", "hf")


def build_vision_tower(config: VisionConfig) -> VisionTower:
    if config.kind == "vit":
        return TinyViT(config)
    if config.kind == "convnet":
        return TinyConvNet(config)
    from . import external  # lazily: open_clip / timm are optional

    if config.kind == "open_clip":
        return external.OpenCLIPVision(config)
    if config.kind == "timm":
        return external.TimmVision(config)
    if config.kind == "efficientnet_lite0":
        return external.EfficientNetLite0(config)
    raise ValueError(f"unknown vision tower kind {config.kind!r} (one of {VISION_KINDS})")


def build_text_tower(config: TextConfig) -> TextTower:
    if config.kind == "transformer":
        return TinyTextTransformer(config)
    from . import external

    if config.kind == "open_clip":
        return external.OpenCLIPText(config)
    if config.kind == "hf":
        return external.HFText(config)
    raise ValueError(f"unknown text tower kind {config.kind!r} (one of {TEXT_KINDS})")
