"""TrainConfig: every setting of a training run, from presets, a TOML or JSON file and
KEY=VALUE overrides."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from eclip.config import (
    Checked,
    LossConfig,
    ModelConfig,
    override,
    ranged,
)
from eclip.presets import model_preset, objective_preset

from ..optim import OptimConfig


class SettingError(ValueError):
    """Settings of a TrainConfig that cannot run as given (found before training starts)."""


@dataclass
class TrainConfig(Checked):
    """Every field is checked against its type and range when the config is built or
    overridden (`eclip.config.check_fields`); `validate` adds the checks across fields."""

    catalog: str = ""  # a catalog (JSON Lines), read map-style; or:
    shards: str = ""  # WebDataset shards (`eclip shard`): a folder, a shards.json, a brace pattern or any fsspec URL
    data_workers: int = ranged(0, ge=0)  # shard-reading worker processes per rank (0: in the training process)
    shuffle_buffer: int = ranged(1000, ge=1)  # products held for shuffling by each shard reader
    out_dir: str = "runs/train"
    model_preset: str = "tiny"
    objective: str = "eclip"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # freezing / tower lr / layer-wise decay of pretrained towers (eclip_app.optim)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = ranged(1000, ge=1)
    products_per_batch: int = ranged(32, ge=1)  # P
    images_per_product: int = ranged(3, ge=1)  # K
    lr: float = ranged(2e-3, gt=0)  # 3e-3 diverged on ShopSynth with the tiny preset; 1e-3 learned slower
    weight_decay: float = ranged(0.1, ge=0)
    warmup_steps: int = ranged(50, ge=0)
    min_lr_ratio: float = ranged(0.05, ge=0, le=1)
    grad_clip: float = ranged(1.0, ge=0)  # max global gradient norm; 0 turns clipping off (the norm is still logged)
    checkpoint_every: int = ranged(250, ge=1)
    keep_checkpoints: int = ranged(2, ge=0)  # 0 keeps all
    log_every: int = ranged(10, ge=1)
    seed: int = 0
    # --- scale and efficiency (all off by default: the CPU demo needs none of them)
    device: str = "auto"  # auto: cuda:LOCAL_RANK when a GPU is there, else cpu
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast of the towers and decoder; losses in fp32
    accum_steps: int = ranged(1, ge=1)  # micro-batches per step; the losses still see the whole batch
    grad_checkpointing: bool = False  # recompute tower blocks in backward: less memory
    compile: bool = False  # torch.compile the forward
    compile_backend: str = "inductor"
    fused_adamw: bool | None = None  # None: fused where torch has the kernel
    max_bad_steps: int = ranged(5, ge=1)  # non-finite steps in a row before the run stops
    tensorboard: bool = True  # event files in OUT/tensorboard when tensorboard is installed
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP, for towers too big for one device
    # locked-tower feature cache: the frozen prefix of each tower (optim.freeze_*) computed once
    # per image and title, only the trainable layers run per step (eclip_app.feature_cache)
    feature_cache: bool = False
    feature_cache_dir: str = ""  # memory-mapped files here (eclip cache-features fills it); "": in memory
    feature_cache_dtype: Literal["fp16", "fp32"] = "fp16"
    # --- validation during training (eclip_app.training.validation): off without val_catalog
    val_catalog: str = ""  # held-out catalog (JSON Lines): zero-shot, retrieval and grounding metrics
    val_scene_catalog: str = ""  # scenes of val_catalog's products (eclip compose): scene retrieval and grounding
    val_every: int = 0  # evaluate every N steps and after the last (0: after the last only)
    val_batch: int = 128  # images per evaluation batch
    val_max_products: int = 0  # the first N products of val_catalog (0: all)
    report_to: list[str] = field(default_factory=list)  # ["wandb"]: every record to Weights & Biases too

    def validate(self) -> None:
        """The checks across fields (each field alone is checked as it is set)."""
        self.optim.validate()


def make_train_config(model_preset_name: str = "tiny", objective: str = "eclip", **fields) -> TrainConfig:
    """A TrainConfig whose model and loss come from the named presets."""
    return TrainConfig(
        model_preset=model_preset_name,
        objective=objective,
        model=model_preset(model_preset_name, objective),
        loss=objective_preset(objective),
        **fields,
    )


def load_train_config(path: str | None, assignments: list[str] | None = None) -> TrainConfig:
    """From a TOML or JSON file (presets first, then the file's fields), then overrides."""
    data: dict = {}
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
            if path.endswith(".toml"):
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python 3.10
                    import tomli as tomllib
                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as error:  # TOML and JSON errors are ValueErrors
            raise ValueError(f"config file {path}: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path}: must hold a table of TrainConfig fields, not {type(data).__name__}")
    assignments = list(assignments or [])
    # preset names may come from the file or the command line; they decide the base config
    presets = {"model_preset": data.pop("model_preset", "tiny"), "objective": data.pop("objective", "eclip")}
    for a in list(assignments):
        key = a.split("=", 1)[0].strip()
        if key in presets:
            presets[key] = a.split("=", 1)[1].strip()
            assignments.remove(a)
    config = make_train_config(presets["model_preset"], presets["objective"])
    config = override(config, [f"{k}={json.dumps(v)}" for k, v in _flatten(data)])
    config = override(config, assignments)
    config.validate()
    return config


def _flatten(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
