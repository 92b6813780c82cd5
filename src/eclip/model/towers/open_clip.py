"""open_clip towers (vision and text) behind the tower interface.

They take images normalised the eclip way and convert them to the mean and std the weights
were trained with (`Renormalize`); load weights only when built with `pretrained=True`, so
that `io.load_model` rebuilds the architecture from config.json offline and fills it from
model.safetensors; and check that the weights asked for really loaded. open_clip is imported
when a tower is built: the built-in towers work without it.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import TextConfig, VisionConfig
from .base import (
    Renormalize,
    TextTower,
    VisionFeatures,
    VisionTower,
    check_file,
    layers_by_prefix,
    run_block,
    wants_pretrained,
)


def _import_open_clip():
    try:
        import open_clip
    except ImportError as error:
        raise ImportError("open_clip towers need `pip install open_clip_torch` (or eclip[towers])") from error
    return open_clip


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


def create_open_clip(model_name: str, pretrained: str, checkpoint: str, load: bool, **force):
    """An open_clip model; with `load`, CLIP weights from `checkpoint` (a local file: works
    offline) or else the `pretrained` tag (open_clip downloads it)."""
    open_clip = _import_open_clip()

    if not model_name:
        raise ValueError("an open_clip tower needs model_name (e.g. 'ViT-B-16')")
    if wants_pretrained(pretrained) and (isinstance(pretrained, bool) or pretrained.lower() in ("true", "1", "yes")):
        raise ValueError(
            f"open_clip `pretrained` is a tag, one of {open_clip.list_pretrained_tags_by_model(model_name)}"
        )
    tag = open_clip.get_pretrained_cfg(model_name, pretrained) if wants_pretrained(pretrained) else {}
    if tag.get("quick_gelu"):  # e.g. the OpenAI weights: decided by the tag, so reloads match
        force["force_quick_gelu"] = True
    source = None
    if load and checkpoint:
        source = str(check_file(checkpoint, "open_clip"))
    elif load and wants_pretrained(pretrained):
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
    open_clip's projection is kept as `head_init` (C, D), for a head that wants to start from it.

    It runs open_clip's blocks one by one (for the split forward) between two private methods
    of open_clip's VisionTransformer, `_embeds` and `_pool`: open_clip has no public call for
    the input embedding alone or for the pooling of block outputs (its public `forward` and
    `forward_intermediates` run all blocks in between). tests/test_towers.py pins both."""

    def __init__(self, config: VisionConfig, pretrained: bool = True):
        super().__init__()
        open_clip, clip = create_open_clip(
            config.model_name, config.pretrained, config.checkpoint, pretrained, force_image_size=config.image_size
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

    def forward_layer(self, index: int, x: torch.Tensor) -> torch.Tensor:  # (B, 1 + N, C)
        if index == 0:
            return self.visual._embeds(self.renorm(x))  # class token first, after ln_pre
        return run_block(self.visual.transformer.resblocks[index - 1], x, self.grad_checkpointing)

    def level_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:]  # the class token dropped

    def finish(self, x: torch.Tensor, levels: list[torch.Tensor | None] | None) -> VisionFeatures:
        pooled, tokens = self.visual._pool(x)  # (B, C), (B, N, C) after ln_post
        levels[-1] = tokens  # the last level is the final normalised output
        return VisionFeatures(pooled=pooled, tokens=tokens, grid=self.grid, levels=levels)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.visual.set_grad_checkpointing(enable)

    def param_layers(self) -> tuple[dict[str, int], int]:
        n = len(self.visual.transformer.resblocks)
        stem = ("visual.conv1", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre")
        return layers_by_prefix(self, stem, "visual.transformer.resblocks.", n), n


class OpenCLIPTokenizer:
    """open_clip's tokenizer behind the (ids, mask) interface; mask = ids != pad."""

    def __init__(self, model_name: str, context_length: int, pad_id: int = 0):
        open_clip = _import_open_clip()

        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length)
        self.context_length = context_length
        self.pad_id = pad_id

    def __call__(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer([texts] if isinstance(texts, str) else list(texts)).long()  # (T, L)
        return ids, ids != self.pad_id


class OpenCLIPText(TextTower):
    """open_clip's text transformer; pooled = its pooled token (the end-of-text token for CLIP)
    after `ln_final`, before its projection (kept as `head_init`). CLIP's text attention is
    causal and pools at the end-of-text token, so the padding mask changes nothing there.

    The whole forward is open_clip's public `forward`. The split forward runs the blocks one by
    one after the private `_embeds` (no public call gives the input embedding alone; pinned in
    tests/test_towers.py) and pools at the last real token of the mask, which is where open_clip's
    tokenizer puts the end-of-text token; it supports CLIP's own text transformer (causal mask,
    no padding mask, no class token)."""

    def __init__(self, config: TextConfig, pretrained: bool = True):
        super().__init__()
        open_clip, clip = create_open_clip(
            config.model_name,
            config.pretrained,
            config.checkpoint,
            pretrained,
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
        self.splittable = text.cls_emb is None and not text.use_pad_mask and text.pool_type in ("argmax", "eos", "last")
        del clip

    def forward_features_from(self, hidden: torch.Tensor, mask: torch.Tensor, num_frozen_layers: int) -> torch.Tensor:
        if self._check_split(num_frozen_layers) == 0:
            return self.text(hidden)  # (B, C): open_clip's own forward
        return super().forward_features_from(hidden, mask, num_frozen_layers)

    def forward_layer(self, index: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.splittable:
            raise NotImplementedError("the split forward supports CLIP's plain causal text transformer only")
        if index == 0:
            return self.text._embeds(x)[0]  # (B, T, C); its mask is the causal `attn_mask`
        attn_mask = self.text.attn_mask
        attn_mask = None if attn_mask is None else attn_mask[: x.shape[1], : x.shape[1]]
        return run_block(self.text.transformer.resblocks[index - 1], x, self.grad_checkpointing, attn_mask=attn_mask)

    def finish(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.text.ln_final(x)
        if self.text.pool_type == "last":
            return x[:, -1]
        last = mask.shape[1] - 1 - mask.flip(-1).int().argmax(dim=-1)  # (B,) the last real token
        return x[torch.arange(x.shape[0], device=x.device), last]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.text.set_grad_checkpointing(enable)

    def param_layers(self) -> tuple[dict[str, int], int]:
        n = len(self.text.transformer.resblocks)
        stem = ("text.token_embedding", "text.positional_embedding", "text.cls_emb")
        return layers_by_prefix(self, stem, "text.transformer.resblocks.", n), n
