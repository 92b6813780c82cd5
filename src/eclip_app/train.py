"""Single-process training: AdamW with parameter groups, warm-up then cosine, gradient clipping,
atomic checkpoints with everything a resume needs, a progress bar and a JSON Lines log."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from eclip.config import (
    LossConfig,
    ModelConfig,
    model_preset,
    objective_preset,
    override,
    to_dict,
)
from eclip.data import ImageStore, PKSampler, collate, load_catalog
from eclip.io import atomic_write_text, replace_folder, save_model, write_model_files
from eclip.losses import ECLIPLoss
from eclip.model import ECLIP

logger = logging.getLogger("eclip.train")

STATE_NAME = "train_state.pt"


@dataclass
class TrainConfig:
    catalog: str = ""
    out_dir: str = "runs/train"
    model_preset: str = "tiny"
    objective: str = "eclip"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    steps: int = 1000
    products_per_batch: int = 32  # P
    images_per_product: int = 3  # K
    lr: float = 2e-3  # 3e-3 diverged on ShopSynth with the tiny preset; 1e-3 learned slower
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0


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
        text = Path(path).read_text(encoding="utf-8")
        if path.endswith(".toml"):
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
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
    return override(config, assignments)


def _flatten(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# ----------------------------------------------------------------------------- optimisation


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, embeddings of position, queries and logit scales:
    every tensor under two dimensions, plus the named exceptions."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or name.endswith(("queries", "pos_embed", "registers")) or "logit_scales" in name
        (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(out_dir, model, optimizer, scheduler, sampler, step: int, keep: int) -> Path:
    """Weights (safetensors), optimiser, scheduler and sampler state; written to a temporary
    folder and renamed, so a kill mid-write leaves the previous checkpoint intact."""
    folder = checkpoint_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp_step_"))
    write_model_files(model, tmp)
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict()},
        tmp / STATE_NAME,
    )
    target = folder / f"step_{step:08d}"
    replace_folder(tmp, target)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, model, optimizer, scheduler, sampler) -> int:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors")))
    state = torch.load(path / STATE_NAME, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    return int(state["step"])


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    model: ECLIP
    history: list[dict]
    out_dir: Path
    seconds: float


def augmentation_generator(seed: int, step: int) -> torch.Generator:
    """Augmentation randomness is a function of (seed, step): a resumed run draws the same views."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def train(
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    store: ImageStore | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Train to `config.steps` (the schedule's length), or stop early after `stop_at` steps with
    a checkpoint, as a run cut short by its time limit would; `resume` continues it."""
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    products, report = load_catalog(config.catalog)
    logger.info(report.summary())
    model = ECLIP(config.model)
    criterion = ECLIPLoss(config.loss)
    if store is None or store.image_size != model.image_size:
        store = ImageStore(products, model.image_size)
    sampler = PKSampler([len(p.images) for p in products], config.products_per_batch, config.images_per_product, config.seed)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.steps, config.min_lr_ratio))

    start = 0
    metrics_path = out / "metrics.jsonl"
    history: list[dict] = []
    if resume and list_checkpoints(out):
        latest = list_checkpoints(out)[-1]
        start = load_checkpoint(latest, model, optimizer, scheduler, sampler)
        logger.info("resumed from %s at step %d", latest, start)
        if metrics_path.exists():  # drop log lines past the checkpoint: they will be redone
            lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            history = [r for r in lines if r["step"] <= start]
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    atomic_write_text(out / "train_config.json", json.dumps(to_dict(config), indent=2))

    model.train()
    begin = time.time()
    bar = tqdm(total=config.steps, initial=start, desc=f"train {config.objective}", unit="step", disable=not progress, dynamic_ncols=True)
    window_start, window_samples = time.time(), 0
    with metrics_path.open("a", encoding="utf-8") as log:
        end = config.steps if stop_at is None else min(stop_at, config.steps)
        for step in range(start, end):
            batch = collate(store, sampler.batch(step), augmentation_generator(config.seed, step))
            sampler.step = step + 1
            encoding = model.encode_image(batch.images)
            texts = model.encode_text(batch.titles)
            losses = criterion(model, encoding, texts, batch.image_pids, batch.text_pids)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()

            window_samples += len(batch.images)
            bar.update(1)
            if (step + 1) % config.log_every == 0 or step + 1 == end:
                elapsed = time.time() - window_start
                record = {
                    "step": step + 1,
                    **{f"loss_{k}": round(v.item(), 5) for k, v in losses.items()},
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": round(float(grad_norm), 4),
                    "samples_per_s": round(window_samples / max(elapsed, 1e-9), 2),
                    **{f"logit_scale_{k}": round(s().item(), 3) for k, s in model.logit_scales.items()},
                }
                history.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{record['loss_total']:.3f}", sps=f"{record['samples_per_s']:.0f}")
                window_start, window_samples = time.time(), 0
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == end:
                save_checkpoint(out, model, optimizer, scheduler, sampler, step + 1, config.keep_checkpoints)
    bar.close()
    model.eval()
    save_model(model, out / "model")
    return TrainResult(model=model, history=history, out_dir=out, seconds=time.time() - begin)
