"""The built-in towers (random init, no extra dependency): a small ViT, a ConvNeXt-style
CNN with the same interface, and a text transformer over hashed words."""

from __future__ import annotations

import torch
from torch import nn

from ...config import TextConfig, VisionConfig
from ..layers import Block, neighbourhood_mask
from ..tokenizer import HashTokenizer
from .base import TextTower, VisionFeatures, VisionTower, layers_by_prefix, masked_mean, run_block


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

    def __init__(self, config: VisionConfig, pretrained: bool = False):
        super().__init__()  # random init: `pretrained` has nothing to load
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

    def __init__(self, config: VisionConfig, pretrained: bool = False):
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

    def forward_layer(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:  # images -> (B, N + R, C): patch tokens, then the registers
            x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
            return torch.cat([x, self.registers.expand(x.shape[0], -1, -1)], dim=1)
        mask = self.local_mask if index - 1 < self.local_blocks else None
        return run_block(self.blocks[index - 1], x, self.grad_checkpointing, attn_mask=mask)

    def level_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.grid[0] * self.grid[1]]  # (B, N, C): the registers dropped

    def finish(self, x: torch.Tensor, levels: list[torch.Tensor | None] | None) -> VisionFeatures:
        tokens = self.norm(self.level_tokens(x))
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
    ConvNeXt blocks at the token grid instead of transformer blocks: convolutions learn shape
    from fewer samples than a ViT trained from scratch. Tokens = the final map, LayerNormed;
    global = their mean."""

    def __init__(self, config: VisionConfig, pretrained: bool = False):
        super().__init__(config)
        self.blocks = nn.ModuleList(ConvBlock(config.width, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)

    def forward_layer(self, index: int, x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w)
        if index == 0:
            return self.patch_embed(x)
        return run_block(self.blocks[index - 1], x, self.grad_checkpointing)

    def level_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # (B, N, C)

    def finish(self, x: torch.Tensor, levels: list[torch.Tensor | None] | None) -> VisionFeatures:
        tokens = self.norm(self.level_tokens(x))
        return VisionFeatures(pooled=tokens.mean(dim=1), tokens=tokens, grid=self.grid, levels=levels)

    def param_layers(self) -> tuple[dict[str, int], int]:
        n = len(self.blocks)
        return layers_by_prefix(self, ("patch_embed",), "blocks.", n), n


class TinyTextTransformer(TextTower):
    """A bidirectional transformer over hashed words; pooled = mean over real tokens."""

    def __init__(self, config: TextConfig, pretrained: bool = False):
        super().__init__()  # random init: `pretrained` has nothing to load
        self.width = config.width
        self.tokenizer = HashTokenizer(config.vocab_size, config.context_length)
        self.token_embed = nn.Embedding(config.vocab_size, config.width)
        self.pos_embed = nn.Parameter(torch.randn(1, config.context_length, config.width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward_layer(self, index: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if index == 0:  # ids (B, T) -> (B, T, C)
            return self.token_embed(x) + self.pos_embed[:, : x.shape[1]]
        return run_block(self.blocks[index - 1], x, self.grad_checkpointing, key_padding_mask=mask)

    def finish(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.norm(x), mask)

    def param_layers(self) -> tuple[dict[str, int], int]:
        n = len(self.blocks)
        return layers_by_prefix(self, ("token_embed", "pos_embed"), "blocks.", n), n
