"""Checkpoints: weights (safetensors), optimiser, scheduler and the data position in
`OUT/checkpoints/step_N/`, each written whole or not at all; the same checkpoint resumes on one
process, under DDP or under FSDP, on any number of ranks. A resume takes the newest checkpoint
that reads whole, with a warning for each one it passes over."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch

from eclip.atomic import atomic_folder, recover_leftovers
from eclip.io import write_model_files

STATE_NAME = "train_state.pt"
STATE_KEYS = ("step", "optimizer", "scheduler", "sampler")

logger = logging.getLogger("eclip.train")


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be read."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def full_state(model, optimizer) -> tuple[dict, dict]:
    """Whole (unsharded) model and optimiser state, optimiser keyed by parameter name. A
    collective under FSDP (every rank calls it; rank 0 receives the tensors, on the CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(out_dir, model, optimizer, scheduler, source, step: int, keep: int, write: bool = True) -> Path:
    """Weights, optimiser, scheduler and the data position (`source`: the P x K sampler, or the
    shard stream); a kill mid-write leaves the previous checkpoint intact. Every rank calls it
    (gathering sharded state is collective); only the one with `write` writes."""
    model_state, optimizer_state = full_state(model, optimizer)
    target = checkpoint_dir(out_dir) / f"step_{step:08d}"
    if not write:
        return target
    with atomic_folder(target) as tmp:
        write_model_files(model, tmp, model_state)
        torch.save(
            {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "sampler": source.state_dict()},
            tmp / STATE_NAME,
        )
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def clean_checkpoints(out_dir: str | Path) -> None:
    """Resolve what a run killed while writing left in OUT/checkpoints and OUT (an unfinished
    `.step_N.tmp*`, a half-swapped folder: `eclip.atomic.recover_leftovers`), and remove the
    `.tmp_step_*` folders of earlier versions. Call at the start of a run, on one rank."""
    recover_leftovers(out_dir)
    folder = checkpoint_dir(out_dir)
    recover_leftovers(folder)
    for stale in folder.glob(".tmp_step_*") if folder.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
        logger.warning("removed %s, left by a run that did not finish writing it", stale)


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(weights, train state) of a checkpoint, read whole; raises on a truncated or foreign one."""
    from safetensors.torch import load_file

    state = torch.load(path / STATE_NAME, weights_only=True)
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        raise ValueError(f"{STATE_NAME} lacks {[k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]}")
    return load_file(str(path / "model.safetensors")), state


def load_checkpoint(path: Path, model, optimizer, scheduler, source, weights: dict | None = None, state: dict | None = None) -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if weights is None or state is None:
        weights, state = read_checkpoint(path)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True, strict=True),
    )
    scheduler.load_state_dict(state["scheduler"])
    source.load_state_dict(state["sampler"])
    return int(state["step"])


def load_latest_checkpoint(out_dir: str | Path, model, optimizer, scheduler, source) -> tuple[int, Path]:
    """Resume from the newest checkpoint that reads whole; a truncated or damaged newer one is
    passed over with a warning. Returns (step, checkpoint). CheckpointError if none reads."""
    problems = []
    for path in reversed(list_checkpoints(out_dir)):
        try:
            weights, state = read_checkpoint(path)
        except Exception as error:  # torch, safetensors and the OS raise many types for a damaged file
            problems.append(f"{path.name}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            logger.warning("checkpoint %s does not read whole (%s); trying the one before it", path, problems[-1])
            continue
        return load_checkpoint(path, model, optimizer, scheduler, source, weights, state), path
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(out_dir)} reads whole ({'; '.join(problems) or 'none found'}); "
                          "start again without --resume")
