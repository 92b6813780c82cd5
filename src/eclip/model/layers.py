"""Small building blocks shared by the towers and the instance decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, width: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value inputs.

    Returns the output and, on request, the attention weights averaged over heads (B, Q, K).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(
        self,
        query: torch.Tensor,  # (B, Q, C)
        key: torch.Tensor,  # (B, K, C)
        value: torch.Tensor,  # (B, K, C)
        key_padding_mask: torch.Tensor | None = None,  # (B, K), True where the key is real
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,  # (Q, K), True where the query may look
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, nq, c = query.shape
        nk = key.shape[1]
        h = self.heads
        q = self.q(query).view(b, nq, h, c // h).transpose(1, 2)  # (B, H, Q, D)
        k = self.k(key).view(b, nk, h, c // h).transpose(1, 2)  # (B, H, K, D)
        v = self.v(value).view(b, nk, h, c // h).transpose(1, 2)
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        if attn_mask is not None:
            mask = attn_mask if mask is None else mask & attn_mask
        if not need_weights:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            weights = None
        else:
            logits = q @ k.transpose(-2, -1) / math.sqrt(c // h)  # (B, H, Q, K)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            attn = logits.softmax(dim=-1)
            x = attn @ v
            weights = attn.mean(dim=1)  # (B, Q, K)
        x = x.transpose(1, 2).reshape(b, nq, c)
        return self.out(x), weights


class Block(nn.Module):
    """Pre-norm transformer encoder block (self-attention, MLP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask, attn_mask=attn_mask)[0]
        return x + self.mlp(self.norm2(x))


def sine_position_encoding_2d(height: int, width: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's 2-D sine encoding, (height * width, dim): half the channels for y, half for x."""
    if dim % 4:
        raise ValueError(f"2-D sine encoding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = temperature ** (-torch.arange(quarter, dtype=torch.float32) / quarter)  # (D/4,)
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    y = ys[:, None] * freqs[None]  # (H, D/4)
    x = xs[:, None] * freqs[None]  # (W, D/4)
    y_enc = torch.cat([y.sin(), y.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    x_enc = torch.cat([x.sin(), x.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([y_enc, x_enc], dim=-1).reshape(height * width, dim)


def neighbourhood_mask(height: int, width: int, radius: int, extra: int = 0) -> torch.Tensor:
    """(N + extra, N + extra) bool: grid tokens see grid tokens within `radius` rows and
    columns; the `extra` tokens (registers, after the grid) see everything, and no grid token
    sees them, so global information cannot flow back into the grid."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    near = ((ys[:, None] - ys[None, :]).abs() <= radius) & ((xs[:, None] - xs[None, :]).abs() <= radius)
    n = height * width
    mask = torch.zeros(n + extra, n + extra, dtype=torch.bool)
    mask[:n, :n] = near
    mask[n:, :] = True
    return mask
