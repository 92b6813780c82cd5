"""The instance decoder: M learnable queries gather the product from the visual tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DecoderConfig
from .layers import MLP, Attention, sine_position_encoding_2d


class DecoderLayer(nn.Module):
    """Pre-norm: self-attention among queries, cross-attention to the tokens, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = Attention(width, heads)
        self.norm_cross = nn.LayerNorm(width)
        self.cross_attn = Attention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)

    def forward(
        self,
        queries: torch.Tensor,  # (B, M, C)
        memory: torch.Tensor,  # (B, N, C) normalised visual tokens
        memory_pos: torch.Tensor,  # (N, C) positional encoding, added to keys only
        need_weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.norm_self(queries)
        queries = queries + self.self_attn(h, h, h)[0]
        attended, weights = self.cross_attn(
            self.norm_cross(queries), memory + memory_pos, memory, need_weights=need_weights
        )
        queries = queries + attended
        queries = queries + self.mlp(self.norm_mlp(queries))
        return queries, weights


class InstanceDecoder(nn.Module):
    def __init__(self, config: DecoderConfig, token_width: int, final_width: int | None = None):
        """`token_width`: C of the tokens the queries read; `final_width`: C of the final
        tokens added to them (`DecoderConfig.memory_fuse_final`), or None."""
        super().__init__()
        self.num_queries = config.num_queries
        self.width = config.width
        # unit scale, as DETR's query embeddings: at 0.02 the queries would be swamped by the attended
        # tokens and all M instances would start out (and stay) alike
        self.queries = nn.Parameter(torch.randn(config.num_queries, config.width))
        self.memory_proj = nn.Linear(token_width, config.width)
        self.final_proj = nn.Linear(final_width, config.width) if final_width is not None else None
        self.memory_norm = nn.LayerNorm(config.width)
        self.registers = nn.Parameter(torch.randn(config.registers, config.width) * 0.02)
        self.layers = nn.ModuleList(
            DecoderLayer(config.width, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}

    def position_encoding(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        if grid not in self._pos_cache:
            self._pos_cache[grid] = sine_position_encoding_2d(grid[0], grid[1], self.width)
        return self._pos_cache[grid].to(device=like.device, dtype=like.dtype)

    def forward(
        self,
        tokens: torch.Tensor,
        grid: tuple[int, int],
        final: torch.Tensor | None = None,
        final_grid: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, C_v) on `grid` -> instances (B, M, C), attention (B, M, N) of the last
        layer. With a `final_proj`, `final` (B, N_f, C_f) on the coarser `final_grid` is
        projected, upsampled to `grid` (nearest) and added."""
        b, n, _ = tokens.shape
        memory = self.memory_proj(tokens)  # (B, N, C)
        if self.final_proj is not None:
            if final is None or final_grid is None:
                raise ValueError("this decoder fuses the final tokens: pass final and final_grid")
            top = self.final_proj(final).transpose(1, 2).unflatten(-1, final_grid)  # (B, C, h_f, w_f)
            memory = memory + F.interpolate(top, size=grid, mode="nearest").flatten(2).transpose(1, 2)
        memory = self.memory_norm(memory)
        pos = self.position_encoding(grid, memory)
        if self.registers.shape[0]:  # registers: no position, appended after the image tokens
            memory = torch.cat([memory, self.registers.expand(b, -1, -1)], dim=1)  # (B, N + R, C)
            pos = torch.cat([pos, pos.new_zeros(self.registers.shape)], dim=0)
        x = self.queries.unsqueeze(0).expand(b, -1, -1)  # (B, M, C)
        attention = None
        for i, layer in enumerate(self.layers):
            x, weights = layer(x, memory, pos, need_weights=i == len(self.layers) - 1)
            if weights is not None:
                attention = weights
        assert attention is not None  # depth >= 1
        attention = attention[..., :n]  # over the image tokens, renormalised
        attention = attention / attention.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.norm(x), attention
