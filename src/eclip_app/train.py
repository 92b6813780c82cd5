"""The training loop, on one process or under `torchrun` (DDP or FSDP2): AdamW with parameter
groups, warm-up then cosine, gradient clipping, non-finite steps skipped, a checkpoint on a
schedule and on SIGTERM, a progress bar and a JSON Lines log. Its parts are in
`eclip_app.training` (config, checkpoints, batch sources, logs)."""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from eclip.atomic import atomic_write_text
from eclip.config import ModelConfig, to_dict
from eclip.data import ImageStore
from eclip.io import save_model
from eclip.losses import ECLIPLoss
from eclip.model import ECLIP

from .distributed import DistEnv, any_rank, barrier, init_distributed, parallelize
from .feature_cache import cached_source
from .optim import apply_freezing, build_optimizer, parameter_groups, warmup_cosine
from .step import TrainStep
from .training.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    clean_checkpoints,
    full_state,
    list_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
)
from .training.config import TrainConfig, load_train_config, make_train_config
from .training.data import make_data_source
from .training.logs import RunLogs, ThroughputWindow, wandb_module
from .training.validation import Validation, is_validation, validation_due

__all__ = [  # what callers import from here (some defined in .optim and .training)
    "CheckpointError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "list_checkpoints",
    "load_train_config",
    "make_train_config",
    "parameter_groups",
    "train",
    "warmup_cosine",
]

logger = logging.getLogger("eclip.train")


def unsharded(model: ECLIP, optimizer, config: ModelConfig, env: DistEnv) -> ECLIP:
    """A plain copy of an FSDP-sharded model on rank 0 (for saving and evaluation); the other
    ranks keep their shard. Collective."""
    state, _ = full_state(model, optimizer)
    if not env.is_main:
        return model
    plain = ECLIP(config, pretrained=False)  # every weight comes from `state`
    plain.load_state_dict(state)
    return plain


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    model: ECLIP
    history: list[dict]
    out_dir: Path
    seconds: float
    stopped_by_signal: bool = False
    skipped_steps: int = 0  # steps whose loss or gradient was not finite
    step: int = 0  # the step the run ended at (its last checkpoint)
    model_dir: Path | None = None  # OUT/model, when the run reached config.steps and wrote it
    signal: int | None = None  # the signal that stopped the run early
    validation: list[dict] = field(default_factory=list)  # the validation records ("val/..." keys)


class NonFiniteLossError(RuntimeError):
    pass


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
    config.validate()  # each field was checked as it was set; this checks them together
    env = init_distributed(config.device)
    out = Path(config.out_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clean_checkpoints(out)  # what a run killed while writing left behind
    barrier()
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    if not config.catalog and not config.shards:
        raise ValueError("no training data: set catalog (JSON Lines) or shards (eclip shard)")
    # rank 0 evaluates (the others wait): a bad val catalog or reporter stops the run here, before any model is built
    validation = Validation.from_config(config) if env.is_main else None
    if env.is_main:
        wandb_module(config.report_to)
    resuming = resume and bool(list_checkpoints(out))
    # a resumed run takes every weight from its checkpoint: no pretrained weights to load (or fetch)
    model = ECLIP(config.model, pretrained=not resuming)
    apply_freezing(model, config.optim)  # before DDP / FSDP wrap the model: they take the trainable set
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(env.device)
    criterion = ECLIPLoss(config.loss, config.model.selection, config.model.selection_temperature)
    source = make_data_source(config, model.image_size, env, store)
    # an objective switched off leaves its logit scale without a gradient (DDP must be told)
    unused = config.model.decoder is not None and not all(
        (config.loss.inter_weight, config.loss.intra_weight, config.loss.productness_weight)
    )
    forward = parallelize(model, env, fsdp=config.fsdp, find_unused=unused)
    if config.compile:
        forward = torch.compile(forward, backend=config.compile_backend)
    optimizer = build_optimizer(model, config, env.device)  # after sharding: FSDP's parameters
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.steps, config.min_lr_ratio))

    start = 0
    metrics_path = out / "metrics.jsonl"
    history: list[dict] = []
    if resuming:
        start, latest = load_latest_checkpoint(out, model, optimizer, scheduler, source)
        logger.info("resumed from %s at step %d", latest, start)
        if metrics_path.exists():  # drop log lines past the checkpoint: they will be redone
            lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            history = [r for r in lines if r["step"] <= start]
    cache = None
    if config.feature_cache:  # after the checkpoint: the cache fingerprints the weights the run has
        source, cache = cached_source(config, model, source, env)
    frozen_layers = {"vision": cache.vision_layers, "text": cache.text_layers} if cache else None
    step_fn = TrainStep(model, criterion, forward, env.device, config.accum_steps, config.precision, frozen_layers)
    logs = RunLogs(out, history, enabled=env.is_main, tensorboard=config.tensorboard, report_to=config.report_to, run_config=to_dict(config))
    if validation is not None:
        validation.decode(model.image_size, progress and env.is_main)  # once: every evaluation reuses it
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
            tokens = cache.text_inputs(batch.text_pids, batch.titles) if cache else model.tokenizer(batch.titles)
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
            # before the checkpoint, so that a resume from it redoes only later validations; a run
            # stopped by a signal goes straight to its checkpoint
            if validation_due(config, step) and not stopping:
                window.exclude(validate(validation, model, optimizer, config, env, logs, step))
            if step % config.checkpoint_every == 0 or step == end or stopping:
                save_checkpoint(out, model, optimizer, scheduler, source, step, config.keep_checkpoints, write=env.is_main)
                barrier()
            if stopping:
                break
    bar.close()
    final = unsharded(model, optimizer, config.model, env) if config.fsdp else model
    final.eval()
    model_dir = out / "model" if step == config.steps else None
    if env.is_main and model_dir is not None:
        save_model(final, model_dir)
    barrier()
    return TrainResult(model=final, history=[r for r in logs.history if not is_validation(r)], out_dir=out,
                       seconds=time.time() - begin, stopped_by_signal=stop.received is not None, skipped_steps=skipped,
                       step=step, model_dir=model_dir, signal=stop.received,
                       validation=[r for r in logs.history if is_validation(r)])


def validate(validation: Validation | None, model: ECLIP, optimizer, config: TrainConfig, env: DistEnv, logs: RunLogs, step: int) -> float:
    """Rank 0 evaluates the validation set and logs a record; the other ranks wait (every rank
    calls this). Under FSDP the shards are first gathered into a plain copy (collective).
    Returns the seconds it took."""
    begin = time.perf_counter()
    evaluated = unsharded(model, optimizer, config.model, env) if config.fsdp else model
    if env.is_main:
        logs.write({"step": step, **validation.run(evaluated.to(env.device))})
    barrier()
    return time.perf_counter() - begin

