"""Single-process training: AdamW with parameter groups, warm-up then cosine, gradient clipping,
atomic checkpoints with everything a resume needs, a progress bar and a JSON Lines log."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from eclip.config import (
    LossConfig,
    ModelConfig,
    override,
    to_dict,
)
from eclip.data import Batch, ImageStore, collate, load_catalog
from eclip.data.shards import make_batch_source
from eclip.io import atomic_write_text, replace_folder, save_model, write_model_files
from eclip.losses import ECLIPLoss
from eclip.model import ECLIP
from eclip.model.towers import pretrained_weights
from eclip.presets import model_preset, objective_preset

from .distributed import DistEnv, any_rank, barrier, init_distributed
from .optim import OptimConfig, apply_freezing, parameter_groups
from .step import TrainStep

logger = logging.getLogger("eclip.train")

STATE_NAME = "train_state.pt"


@dataclass
class TrainConfig:
    catalog: str = ""  # a catalog (JSON Lines), read map-style; or:
    shards: str = ""  # WebDataset shards (`eclip shard`): a folder, a shards.json, a brace pattern or any fsspec URL
    data_workers: int = 0  # shard-reading worker processes per rank (0: in the training process)
    shuffle_buffer: int = 1000  # products held for shuffling by each shard reader
    out_dir: str = "runs/train"
    model_preset: str = "tiny"
    objective: str = "eclip"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # freezing / tower lr / layer-wise decay of pretrained towers (eclip_app.optim)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    products_per_batch: int = 32  # P
    images_per_product: int = 3  # K
    lr: float = 2e-3  # 3e-3 diverged on ShopSynth with the tiny preset; 1e-3 learned slower
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off (the norm is still logged)
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    # --- scale and efficiency (all off by default: the CPU demo needs none of them)
    device: str = "auto"  # auto: cuda:LOCAL_RANK when a GPU is there, else cpu
    precision: str = "fp32"  # or "bf16": autocast of the towers and decoder; losses in fp32
    accum_steps: int = 1  # micro-batches per step; the losses still see the whole batch
    grad_checkpointing: bool = False  # recompute tower blocks in backward: less memory
    compile: bool = False  # torch.compile the forward
    compile_backend: str = "inductor"
    fused_adamw: bool | None = None  # None: fused where torch has the kernel
    max_bad_steps: int = 5  # non-finite steps in a row before the run stops
    tensorboard: bool = True  # event files in OUT/tensorboard when tensorboard is installed
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP, for towers too big for one device


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


# parameter_groups (weight decay, freezing, tower lr, layer decay) lives in eclip_app.optim


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


def full_state(model, optimizer) -> tuple[dict, dict]:
    """Whole (unsharded) model and optimiser state, optimiser keyed by parameter name: the same
    checkpoint resumes on one process, under DDP or under FSDP, on any number of ranks. A
    collective under FSDP (every rank calls it; rank 0 receives the tensors, on the CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(out_dir, model, optimizer, scheduler, source, step: int, keep: int, write: bool = True) -> Path:
    """Weights (safetensors), optimiser, scheduler and the data position (`source`: the P x K
    sampler, or the shard stream); written to a temporary
    folder and renamed, so a kill mid-write leaves the previous checkpoint intact. Every rank
    calls it (gathering sharded state is collective); only the one with `write` writes."""
    model_state, optimizer_state = full_state(model, optimizer)
    folder = checkpoint_dir(out_dir)
    target = folder / f"step_{step:08d}"
    if not write:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp_step_"))
    write_model_files(model, tmp, model_state)
    torch.save(
        {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "sampler": source.state_dict()},
        tmp / STATE_NAME,
    )
    replace_folder(tmp, target)
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, model, optimizer, scheduler, source) -> int:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(path / STATE_NAME, weights_only=True)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=load_file(str(path / "model.safetensors")),
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True, strict=True),
    )
    scheduler.load_state_dict(state["scheduler"])
    source.load_state_dict(state["sampler"])
    return int(state["step"])


def unsharded(model: ECLIP, optimizer, config: ModelConfig, env: DistEnv) -> ECLIP:
    """A plain copy of an FSDP-sharded model on rank 0 (for saving and evaluation); the other
    ranks keep their shard. Collective."""
    state, _ = full_state(model, optimizer)
    if not env.is_main:
        return model
    with pretrained_weights(False):  # every weight comes from `state`
        plain = ECLIP(config)
    plain.load_state_dict(state)
    return plain


def shard_model(model: ECLIP) -> None:
    """FSDP2: every block of every stack (the elements of each `nn.ModuleList`: tower blocks,
    decoder layers) is its own unit, gathered for its forward and backward only; the rest
    (embeddings, heads, queries, logit scales) forms the root unit. In place."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block)
    fully_shard(model)


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    model: ECLIP
    history: list[dict]
    out_dir: Path
    seconds: float
    stopped_by_signal: bool = False
    skipped_steps: int = 0  # steps whose loss or gradient was not finite


class NonFiniteLossError(RuntimeError):
    pass


def augmentation_generator(seed: int, step: int, slot: int = 0) -> torch.Generator:
    """Augmentation randomness is a function of (seed, step, position in the global batch): a
    resumed run, or the same run on another number of ranks, draws the same views."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7_919 + slot)


def rank_slice(slots: list, world_size: int, rank: int) -> tuple[list, int]:
    """This rank's contiguous share of the global batch's products (whole products, so a
    product's images and title stay together), and the share's first slot index."""
    products = list(dict.fromkeys(slot.product for slot in slots))
    if len(products) % world_size:
        raise ValueError(f"products_per_batch={len(products)} is not divisible by {world_size} ranks")
    share = len(products) // world_size
    mine = set(products[rank * share : (rank + 1) * share])
    first = next(i for i, slot in enumerate(slots) if slot.product in mine)
    return [slot for slot in slots if slot.product in mine], first


def make_batch(store: ImageStore, slots: list, seed: int, step: int, env: DistEnv) -> Batch:
    """This rank's part of the global batch drawn at `step`; augmented views are drawn per
    product with a generator of its position, so they do not depend on the number of ranks."""
    mine, first = rank_slice(slots, env.world_size, env.rank)
    by_product: dict[int, list] = {}
    for slot in mine:
        by_product.setdefault(slot.product, []).append(slot)
    parts, offset = [], first
    for group in by_product.values():
        parts.append(collate(store, group, augmentation_generator(seed, step, offset)))
        offset += len(group)
    return Batch(
        images=torch.cat([b.images for b in parts]),
        image_pids=torch.cat([b.image_pids for b in parts]),
        titles=[t for b in parts for t in b.titles],
        text_pids=torch.cat([b.text_pids for b in parts]),
    )


def make_data_source(config: TrainConfig, image_size: int, env: DistEnv, store: ImageStore | None = None):
    """Where the loop's batches come from (`source.next_batch(step)`, with a state for the
    checkpoint): the shard stream when `config.shards` is set, else the catalog read map-style
    with the seeded P x K sampler. Both give this rank its share of the global P x K batch."""
    if config.shards:
        return make_batch_source(
            config.shards, config.products_per_batch, config.images_per_product, image_size, config.seed,
            rank=env.rank, world_size=env.world_size, num_workers=config.data_workers, shuffle_buffer=config.shuffle_buffer,
        )
    products, _ = load_catalog(config.catalog)  # logs its own summary
    if store is None or store.image_size != image_size:
        store = ImageStore(products, image_size)
    return make_batch_source(
        None, config.products_per_batch, config.images_per_product, image_size, config.seed, store=store,
        batch_for_slots=lambda slots, step: make_batch(store, slots, config.seed, step, env),
    )


class StopSignal:
    """SIGTERM (a scheduler's pre-emption, `kill`) or SIGINT sets a flag; the loop finishes
    its step, writes a checkpoint and returns, so `--resume` continues where it stopped."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("received signal %d: finishing the step and writing a checkpoint", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay, config.lr, config.optim)
    fused = config.fused_adamw
    if fused is None:  # auto: fused where torch has a fused kernel for the device
        fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6, fused=bool(fused) or None)


def train(
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    store: ImageStore | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Train to `config.steps` (the schedule's length), or stop early after `stop_at` steps with
    a checkpoint, as a run cut short by its time limit would; `resume` continues it.

    Under `torchrun` every rank runs this function; rank 0 alone logs and writes files."""
    env = init_distributed(config.device)
    out = Path(config.out_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    if not config.catalog and not config.shards:
        raise ValueError("no training data: set catalog (JSON Lines) or shards (eclip shard)")
    resuming = resume and bool(list_checkpoints(out))
    # a resumed run takes every weight from its checkpoint: no pretrained weights to load (or fetch)
    with pretrained_weights(not resuming):
        model = ECLIP(config.model)
    apply_freezing(model, config.optim)  # before DDP / FSDP wrap the model: they take the trainable set
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(env.device)
    criterion = ECLIPLoss(config.loss, config.model.selection, config.model.selection_temperature)
    source = make_data_source(config, model.image_size, env, store)
    forward: torch.nn.Module = model
    if config.fsdp:
        if not env.distributed:
            raise ValueError("fsdp=true needs several processes (launch with torchrun)")
        shard_model(model)
    elif env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # an objective switched off leaves its logit scale without a gradient
        unused = config.model.decoder is not None and not all(
            (config.loss.inter_weight, config.loss.intra_weight, config.loss.productness_weight)
        )
        forward = DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None, find_unused_parameters=unused
        )
    if config.compile:
        forward = torch.compile(forward, backend=config.compile_backend)
    optimizer = build_optimizer(model, config, env.device)  # after sharding: FSDP's parameters
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.steps, config.min_lr_ratio))
    step_fn = TrainStep(model, criterion, forward, env.device, config.accum_steps, config.precision)

    start = 0
    metrics_path = out / "metrics.jsonl"
    history: list[dict] = []
    if resuming:
        latest = list_checkpoints(out)[-1]
        start = load_checkpoint(latest, model, optimizer, scheduler, source)
        logger.info("resumed from %s at step %d", latest, start)
        if metrics_path.exists():  # drop log lines past the checkpoint: they will be redone
            lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            history = [r for r in lines if r["step"] <= start]
    logs = RunLogs(out, history, enabled=env.is_main, tensorboard=config.tensorboard)
    if env.is_main:
        atomic_write_text(out / "train_config.json", json.dumps(to_dict(config), indent=2))

    model.train()
    begin = time.time()
    bar = tqdm(total=config.steps, initial=start, desc=f"train {config.objective}", unit="step", disable=not (progress and env.is_main), dynamic_ncols=True)
    window = ThroughputWindow()
    skipped = bad_in_a_row = 0
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    step = start
    with StopSignal() as stop, logs:
        while step < end:
            data_start = time.perf_counter()
            batch = source.next_batch(step)
            tokens = model.tokenizer(batch.titles)
            data_time = time.perf_counter() - data_start
            optimizer.zero_grad(set_to_none=True)
            criterion.set_step(step + 1)
            result = step_fn(batch, tokens)
            max_norm = config.grad_clip if config.grad_clip > 0 else math.inf  # inf: measure, do not clip
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) if result.finite else torch.tensor(float("nan"))
            grad_norm_value = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP: a DTensor
            finite = result.finite and math.isfinite(grad_norm_value)
            if finite:
                optimizer.step()
                bad_in_a_row = 0
            else:  # a NaN/inf loss or gradient: skip the update, keep the schedule moving
                skipped += 1
                bad_in_a_row += 1
                logger.warning("step %d: non-finite loss or gradient (%s); update skipped", step + 1, result.losses)
                if bad_in_a_row >= config.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{bad_in_a_row} steps in a row with a non-finite loss or gradient (last at step {step + 1}); "
                        f"lower the learning rate or check the data. The last good checkpoint is in {checkpoint_dir(out)}"
                    )
            with warnings.catch_warnings():  # a skipped first update is deliberate: keep the schedule moving
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                scheduler.step()
            step += 1
            window.add(len(batch.images) * env.world_size, data_time)
            bar.update(1)
            stopping = stop.received is not None or (env.distributed and any_rank(stop.received is not None, env.device))
            if step % config.log_every == 0 or step == end or stopping:
                record = {
                    "step": step,
                    **{f"loss_{k}": round(v, 5) for k, v in result.losses.items()},
                    "lr": scheduler.get_last_lr()[0],
                    **({"instance_ramp": criterion.instance_ramp} if config.loss.instance_warmup_steps > 0 else {}),
                    **{f"lr_group{i}": lr for i, lr in enumerate(scheduler.get_last_lr())},
                    "grad_norm": round(grad_norm_value, 4),
                    **window.read(env.world_size),
                    "skipped_steps": skipped,
                    **({"skipped_samples": sum(source.skipped.values())} if hasattr(source, "skipped") else {}),
                    **{f"logit_scale_{k}": round(v, 3) for k, v in result.scales.items()},
                }
                logs.write(record)
                bar.set_postfix(loss=f"{record['loss_total']:.3f}", sps=f"{record['samples_per_s']:.0f}")
            if step % config.checkpoint_every == 0 or step == end or stopping:
                save_checkpoint(out, model, optimizer, scheduler, source, step, config.keep_checkpoints, write=env.is_main)
                barrier()
            if stopping:
                break
    bar.close()
    final = unsharded(model, optimizer, config.model, env) if config.fsdp else model
    final.eval()
    if env.is_main and step == config.steps:
        save_model(final, out / "model")
    barrier()
    return TrainResult(model=final, history=logs.history, out_dir=out, seconds=time.time() - begin,
                       stopped_by_signal=stop.received is not None, skipped_steps=skipped)


class ThroughputWindow:
    """Samples/s and the fraction of wall time spent waiting for data since the last read."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.samples, self.data_time = time.perf_counter(), 0, 0.0

    def add(self, samples: int, data_time: float) -> None:
        self.samples += samples
        self.data_time += data_time

    def read(self, world_size: int) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {
            "samples_per_s": round(self.samples / elapsed, 2),
            "samples_per_s_per_device": round(self.samples / elapsed / world_size, 2),
            "data_wait_fraction": round(min(1.0, self.data_time / elapsed), 4),
        }
        self.reset()
        return out


class RunLogs:
    """metrics.jsonl (always) and TensorBoard event files (when installed and enabled), written
    by rank 0 only."""

    def __init__(self, out: Path, history: list[dict], enabled: bool, tensorboard: bool):
        self.history = history
        self.enabled = enabled
        self.file = None
        self.writer = None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))
        self.file = path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the `scale` extra is not installed
                logger.warning("tensorboard is not installed; logging to metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=history[-1]["step"] + 1 if history else None)

    def write(self, record: dict) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    tag = key.replace("loss_", "loss/", 1).replace("lr_", "lr/", 1)
                    self.writer.add_scalar(tag, value, record["step"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
