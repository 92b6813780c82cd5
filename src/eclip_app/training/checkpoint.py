"""Checkpoints: weights (safetensors), optimiser, scheduler and the data position in
`OUT/checkpoints/step_N/`, each written whole or not at all; the same checkpoint resumes on one
process, under DDP or under FSDP, on any number of ranks."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from eclip.atomic import atomic_folder
from eclip.io import write_model_files

STATE_NAME = "train_state.pt"


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
