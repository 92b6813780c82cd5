"""Optimiser parameter groups: weight-decay exemptions, and for pretrained towers freezing,
partial unfreezing, a lower learning rate and layer-wise learning-rate decay.

Each tower reports the layer of every parameter (`param_layers()`: 0 = input embedding,
1..n = blocks, the final norm with block n); everything here is expressed in those layers, so
it works the same for the built-in, open_clip, timm and Hugging Face towers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from eclip.config import Checked, ranged
from eclip.model.towers import frozen_prefix_length

# Parameters that are positions, learned tokens or temperatures: decaying them towards zero has
# no regularising meaning (plus every tensor under two dimensions: norms and biases).
NO_DECAY_SUFFIXES = (
    "queries",
    "pos_embed",
    "registers",
    "positional_embedding",  # open_clip
    "class_embedding",  # open_clip
    "cls_token",  # timm
    "reg_token",  # timm
)


@dataclass
class OptimConfig(Checked):
    # lr multiplier for every tower parameter (heads, decoder and temperatures keep the full lr):
    # pretrained towers usually want 0.1 or less, or new heads drag them off their features
    tower_lr_scale: float = ranged(1.0, ge=0)
    freeze_vision: bool = False
    freeze_text: bool = False
    # with freeze_*: the last k blocks (and the final norm) stay trainable; 0 = all frozen
    unfreeze_last_vision_blocks: int = ranged(0, ge=0)
    unfreeze_last_text_blocks: int = ranged(0, ge=0)
    # layer-wise lr decay: a tower parameter in layer l of n gets lr * layer_decay ** (n - l),
    # so the input embedding moves least; 1.0 = off
    layer_decay: float = ranged(1.0, gt=0, le=1)

    def validate(self) -> None:
        # checked when used, not in __post_init__: overrides set fields one at a time
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.tower_lr_scale < 0:
            raise ValueError(f"tower_lr_scale must be >= 0, got {self.tower_lr_scale}")
        for tower in ("vision", "text"):
            k = getattr(self, f"unfreeze_last_{tower}_blocks")
            if k < 0 or (k > 0 and not getattr(self, f"freeze_{tower}")):
                raise ValueError(f"unfreeze_last_{tower}_blocks={k} needs freeze_{tower}=true (and k >= 0)")


def _towers(model: torch.nn.Module):
    return {"vision": model.vision, "text": model.text}


def frozen_prefix(model: torch.nn.Module, optim: OptimConfig) -> dict[str, int]:
    """Per tower, how many leading layers `apply_freezing` freezes: the `num_frozen_layers` of
    the towers' split forward (`forward_frozen` / `forward_features_from`)."""
    return {
        kind: frozen_prefix_length(tower, getattr(optim, f"freeze_{kind}"), getattr(optim, f"unfreeze_last_{kind}_blocks"))
        for kind, tower in _towers(model).items()
    }


def apply_freezing(model: torch.nn.Module, optim: OptimConfig) -> None:
    """Set requires_grad of every tower parameter from the config (and nothing else): the
    parameters in the first `frozen_prefix` layers are frozen."""
    prefix = frozen_prefix(model, optim)
    for kind, tower in _towers(model).items():
        layers, _ = tower.param_layers()
        for name, param in tower.named_parameters():
            param.requires_grad_(layers[name] >= prefix[kind])
    model.train(model.training)  # towers put BatchNorms with frozen parameters in eval mode


def lr_scales(model: torch.nn.Module, optim: OptimConfig) -> dict[str, float]:
    """The lr multiplier of every parameter of the model, by its full name."""
    scales = {name: 1.0 for name, _ in model.named_parameters()}
    for kind, tower in _towers(model).items():
        layers, n = tower.param_layers()
        for name, _ in tower.named_parameters():
            scales[f"{kind}.{name}"] = optim.tower_lr_scale * optim.layer_decay ** (n - layers[name])
    return scales


def parameter_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lr: float | None = None,
    optim: OptimConfig | None = None,
) -> list[dict]:
    """Freeze what `optim` freezes, then group the trainable parameters by (weight decay, lr).

    No weight decay on norms, biases, position embeddings, learned tokens, queries and logit
    scales: every tensor under two dimensions, plus the named exceptions. Groups come decayed
    first, then by falling lr; each carries `lr_scale` and, given `lr`, its own `lr` (which an
    `LambdaLR` schedule then scales). With the default `optim` that is exactly two groups."""
    optim = optim or OptimConfig()
    optim.validate()
    apply_freezing(model, optim)
    scales = lr_scales(model, optim)
    buckets: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or name.endswith(NO_DECAY_SUFFIXES) or "logit_scales" in name
        buckets.setdefault((exempt, scales[name]), []).append(param)
    if lr is None and any(scale != 1.0 for _, scale in buckets):
        raise ValueError("scaled learning rates need the base lr: parameter_groups(model, wd, lr=...)")
    groups = []
    for exempt, scale in sorted(buckets, key=lambda key: (key[0], -key[1])):
        group = {"params": buckets[(exempt, scale)], "weight_decay": 0.0 if exempt else weight_decay, "lr_scale": scale}
        if lr is not None:
            group["lr"] = lr * scale
        groups.append(group)
    return groups


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """The lr factor of a step: linear warm-up, then a cosine down to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `parameter_groups` of a TrainConfig's settings; fused where torch has the
    kernel for the device unless `config.fused_adamw` says otherwise."""
    groups = parameter_groups(model, config.weight_decay, config.lr, config.optim)
    fused = config.fused_adamw
    if fused is None:  # auto: fused where torch has a fused kernel for the device
        fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6, fused=bool(fused) or None)
