"""The tower interface and what every tower shares.

A vision tower maps images (B, 3, S, S) to `VisionFeatures`; a text tower maps (token ids, mask)
to a pooled (B, C) feature and carries its `tokenizer`. Both number their parameters in layers
(`param_layers`: 0 = input embedding, 1..n = blocks, the final norm with block n) and run in
those layers, so that a frozen prefix can be computed once and the rest on top of it:

    hidden = tower.forward_frozen(images, k)            # layers 0..k-1
    features = tower.forward_features_from(hidden, k)   # layers k.. and the pooling
    # == tower.forward_features(images) for every 0 <= k <= tower.num_layers
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Tokenizer(Protocol):
    def __call__(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (T, L) long and a mask (T, L) bool, True on real tokens."""
        ...


@dataclass
class VisionFeatures:
    pooled: torch.Tensor  # (B, C) global feature
    tokens: torch.Tensor  # (B, N, C) spatial tokens, row-major over the grid
    grid: tuple[int, int]  # (h, w) with h * w == N
    # The output of the stem (index 0) and of each block (1..depth): (B, N, C) tokens on the
    # final grid (a ViT), or (B, C, h, w) feature maps on their own, finer grids (a CNN); the
    # instance decoder may read an earlier, more local level than the last. Levels before the
    # layer a split forward started from are None (they were not computed).
    levels: list[torch.Tensor | None] | None = None

    def _level(self, index: int) -> torch.Tensor | None:
        """The stored level, or None for the final tokens."""
        if index == -1 or (self.levels is not None and index == len(self.levels) - 1):
            return None
        if self.levels is None:
            raise ValueError(f"this vision tower exposes only its final tokens, not level {index}")
        if self.levels[index] is None:
            raise ValueError(f"level {index} lies inside the frozen prefix this forward started after")
        return self.levels[index]

    def level(self, index: int) -> torch.Tensor:
        """(B, N_level, C_level) tokens at a depth, row-major over `level_grid(index)`; -1 (or
        depth) is the final normalised output."""
        x = self._level(index)
        if x is None:
            return self.tokens
        return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x

    def level_grid(self, index: int) -> tuple[int, int]:
        """(h, w) of `level(index)`'s tokens."""
        x = self._level(index)
        return (x.shape[2], x.shape[3]) if x is not None and x.ndim == 4 else self.grid

    @staticmethod
    def cat(parts: list[VisionFeatures]) -> VisionFeatures:
        """The features of consecutive chunks of one batch, as one batch."""
        first = parts[0]
        levels = None
        if first.levels is not None:
            levels = [None if level is None else torch.cat([p.levels[i] for p in parts]) for i, level in enumerate(first.levels)]
        return VisionFeatures(torch.cat([p.pooled for p in parts]), torch.cat([p.tokens for p in parts]), first.grid, levels)


# A CPU runs a convnet's high-resolution layers several times faster a few images at a time,
# while their activations stay in its caches, than a whole batch at once: a forward without
# gradient runs in chunks of about this many input elements (4 images at 320 px) there.
CPU_CHUNK_ELEMENTS = 4 * 3 * 320 * 320


def inference_chunk(x: torch.Tensor) -> int:
    """How many rows of `x` a forward without gradient runs at once: all of them on an
    accelerator, a few on a CPU (`CPU_CHUNK_ELEMENTS`)."""
    if x.device.type != "cpu":
        return max(x.shape[0], 1)
    return max(1, CPU_CHUNK_ELEMENTS // max(x[0].numel(), 1)) if x.shape[0] else 1


def uses_batch_statistics(module: _TunableTower, below_layer: int | None = None) -> bool:
    """Whether a BatchNorm in `module` normalises by the batch (training mode): then a forward
    in chunks would not equal the forward of the whole batch. `below_layer` k: only the
    BatchNorms of the tower's layers 0..k-1 (`param_layers`); one without parameters to place
    it counts wherever it is."""
    training = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not training or below_layer is None:
        return bool(training)
    layers = module.param_layers()[0]
    for name, m in training:
        placed = [layers.get(f"{name}.{p}") for p, _ in m.named_parameters(recurse=False)]
        if not placed or any(layer is None or layer < below_layer for layer in placed):
            return True
    return False


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


def run_block(block: nn.Module, x: torch.Tensor, checkpointed: bool, *args, **kwargs) -> torch.Tensor:
    """`block(x, ...)`, recomputed in the backward pass when `checkpointed` (in training)."""
    if checkpointed and block.training and torch.is_grad_enabled():
        return checkpoint(block, x, *args, use_reentrant=False, **kwargs)
    return block(x, *args, **kwargs)


def frozen_prefix_length(tower: _TunableTower, frozen: bool, unfreeze_last_blocks: int = 0) -> int:
    """How many leading layers (`param_layers` numbering) freezing a tower with `frozen` and
    `unfreeze_last_blocks` leaves without gradient: the `num_frozen_layers` to hand to
    `forward_frozen`. 0 when nothing is frozen, `num_layers` when everything is."""
    if not frozen:
        return 0
    _, n = tower.param_layers()
    return min(max(n + 1 - unfreeze_last_blocks, 0), n + 1)


class _TunableTower(nn.Module):
    """What both tower kinds share for fine-tuning: layer indices, frozen BatchNorms and the
    layer-by-layer forward that a frozen prefix is cut from."""

    grad_checkpointing: bool = False

    def param_layers(self) -> tuple[dict[str, int], int]:
        """(layer of each parameter, n): 0 = input embedding, 1..n the blocks, the final norm in
        layer n. Partial unfreezing and layer-wise lr decay read it; a tower that does not
        override it counts as a single block."""
        return {name: 1 for name, _ in self.named_parameters()}, 1

    @cached_property
    def num_layers(self) -> int:
        """Layers 0..n of `param_layers`: the largest valid `num_frozen_layers`."""
        return self.param_layers()[1] + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass rather than keep its activations."""
        self.grad_checkpointing = enable

    def train(self, mode: bool = True):
        # A module whose parameters are all frozen runs in eval mode (as LiT's locked tower):
        # a frozen BatchNorm keeps its running statistics (a pretrained CNN must not drift
        # towards the batch statistics of training data), and dropout inside a frozen prefix
        # is off, so that the prefix is a fixed function a feature cache can store.
        super().train(mode)
        for module in self.modules():
            params = list(module.parameters())
            if module is not self and params and not any(p.requires_grad for p in params):
                module.eval()
        return self

    def _check_split(self, num_frozen_layers: int) -> int:
        if not 0 <= num_frozen_layers <= self.num_layers:
            raise ValueError(f"num_frozen_layers must be in [0, {self.num_layers}], got {num_frozen_layers}")
        return num_frozen_layers


class VisionTower(_TunableTower):
    """Interface: `width` (C of pooled and tokens), `image_size`, and the forward in layers:
    `forward_layer(i, x)` runs layer i (0: images -> stem output), `finish(x, levels)` turns
    the last layer's output into `VisionFeatures`, `level_tokens(x)` reads a layer's output as
    (B, N, C) grid tokens (None for a tower without levels). Towers that come with a
    pretrained projection into a joint space (CLIP) expose it as `head_init` (C, D); it is not
    part of the state dict."""

    width: int
    image_size: int
    head_init: torch.Tensor | None = None

    def level_width(self, index: int) -> int:
        """C of `VisionFeatures.level(index)` (-1: the final tokens)."""
        return self.width

    def forward_layer(self, index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def level_tokens(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def finish(self, x: torch.Tensor, levels: list[torch.Tensor | None] | None) -> VisionFeatures:
        raise NotImplementedError

    def forward_frozen(self, images: torch.Tensor, num_frozen_layers: int) -> torch.Tensor:
        """The output of layers 0..num_frozen_layers-1 (the images themselves for 0). The final
        norm is left to `forward_features_from` even when every layer is frozen."""
        x = images
        for index in range(self._check_split(num_frozen_layers)):
            x = self.forward_layer(index, x)
        return x

    def forward_features_from(self, hidden: torch.Tensor, num_frozen_layers: int) -> VisionFeatures:
        """The rest of the forward after `forward_frozen(images, num_frozen_layers)`."""
        start = self._check_split(num_frozen_layers)
        x, levels = hidden, [None] * self.num_layers
        if start > 0:
            levels[start - 1] = self.level_tokens(x)
        for index in range(start, self.num_layers):
            x = self.forward_layer(index, x)
            levels[index] = self.level_tokens(x)
        return self.finish(x, levels if any(level is not None for level in levels) else None)

    def forward_features(self, images: torch.Tensor) -> VisionFeatures:
        return self.forward_features_from(images, 0)

    def forward_frozen_chunked(self, images: torch.Tensor, num_frozen_layers: int) -> torch.Tensor:
        """`forward_frozen`, run in chunks (`inference_chunk`) where that gives the same output:
        without gradient and with no BatchNorm of those layers normalising by the batch (a
        frozen prefix's run in eval mode, so a feature cache's fill is chunked in training too)."""
        size = inference_chunk(images)
        if size >= images.shape[0] or torch.is_grad_enabled() or uses_batch_statistics(self, num_frozen_layers):
            return self.forward_frozen(images, num_frozen_layers)
        return torch.cat([self.forward_frozen(chunk, num_frozen_layers) for chunk in images.split(size)])

    def forward_features_chunked(self, hidden: torch.Tensor, num_frozen_layers: int = 0) -> VisionFeatures:
        """`forward_features_from`, run in chunks (`inference_chunk`) where that gives the same
        features: without gradient and with no BatchNorm normalising by the batch."""
        size = inference_chunk(hidden)
        if size >= hidden.shape[0] or torch.is_grad_enabled() or uses_batch_statistics(self):
            return self.forward_features_from(hidden, num_frozen_layers)
        return VisionFeatures.cat([self.forward_features_from(chunk, num_frozen_layers) for chunk in hidden.split(size)])

    def forward(self, images: torch.Tensor) -> VisionFeatures:
        return self.forward_features(images)


class TextTower(_TunableTower):
    """Interface: `width`, `tokenizer` and the forward in layers, as for `VisionTower`:
    `forward_layer(i, x, mask)` (layer 0 takes the token ids) and `finish(x, mask) -> (B, C)`."""

    width: int
    tokenizer: Tokenizer
    head_init: torch.Tensor | None = None

    def forward_layer(self, index: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_frozen(self, token_ids: torch.Tensor, mask: torch.Tensor, num_frozen_layers: int) -> torch.Tensor:
        """The output (B, T, C) of layers 0..num_frozen_layers-1 (the ids themselves for 0)."""
        x = token_ids
        for index in range(self._check_split(num_frozen_layers)):
            x = self.forward_layer(index, x, mask)
        return x

    def forward_features_from(self, hidden: torch.Tensor, mask: torch.Tensor, num_frozen_layers: int) -> torch.Tensor:
        """The rest of the forward after `forward_frozen(ids, mask, num_frozen_layers)`: (B, C)."""
        x = hidden
        for index in range(self._check_split(num_frozen_layers), self.num_layers):
            x = self.forward_layer(index, x, mask)
        return self.finish(x, mask)

    def forward_features(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward_features_from(token_ids, mask, 0)

    def forward(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward_features(token_ids, mask)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) -> (B, C): the mean over the real tokens (mask True)."""
    weights = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


# ----------------------------------------------------------------------------- for adapters


class Renormalize(nn.Module):
    """eclip's (x - 0.5) / 0.5 input -> (x - mean) / std. The constants are buffers that are
    not saved: they follow from the config, and an old model.safetensors stays loadable."""

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # x01 = 0.5 x + 0.5, so (x01 - mean) / std = x * scale + shift
        self.register_buffer("scale", 0.5 / std, persistent=False)
        self.register_buffer("shift", (0.5 - mean) / std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale.to(images.dtype) + self.shift.to(images.dtype)


def wants_pretrained(value) -> bool:
    """`pretrained` may be a tag (open_clip), a flag or a tag (timm): "" / false mean none."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in ("", "false", "0", "none", "no")


def check_file(path: str, what: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what} checkpoint {str(file)!r} not found")
    return file


def load_exactly(module: nn.Module, state: dict[str, torch.Tensor], what: str, ignore: tuple[str, ...] = ()) -> None:
    """Load `state` into `module` and raise unless every tensor of the module was filled with
    a tensor of the same shape (keys starting with one of `ignore` may be left over)."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{what}: weights do not match the architecture: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of another shape {sorted(wrong)[:3]}"
        )
    module.load_state_dict(state, strict=True)
