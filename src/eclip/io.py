"""Save and load a model with its config: `config.json` + `model.safetensors` in a folder.
Nothing here unpickles; every write lands atomically (a temporary folder, then a rename)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_folder, atomic_write_text, recover_folder, replace_folder  # noqa: F401 (the io API)
from .config import ModelConfig, from_dict, to_dict
from .model.eclip import ECLIP

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def write_model_files(model: ECLIP, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write config and weights into an existing folder (the caller makes it atomic). `state`:
    the full weights when the model's own are sharded (FSDP)."""
    state = model.state_dict() if state is None else state
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "library": "eclip"})
    (folder / CONFIG_NAME).write_text(json.dumps(to_dict(model.config), indent=2), encoding="utf-8")


def save_model(model: ECLIP, folder: str | Path) -> Path:
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        write_model_files(model, tmp)
    return folder


def load_config(folder: str | Path) -> ModelConfig:
    recover_folder(folder)  # a replace killed half-way: finish it or put the old folder back
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an eclip model folder")
    return from_dict(ModelConfig, json.loads(path.read_text(encoding="utf-8")))


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> ECLIP:
    """Rebuild the model from its config and load the weights (strictly: no silent gaps). The
    towers are built without their pretrained weights: nothing is downloaded, and every weight
    comes from model.safetensors."""
    model = ECLIP(load_config(folder), pretrained=False)
    weights = load_file(str(Path(folder) / WEIGHTS_NAME), device=str(device))
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"weights in {folder} do not fit its config.json: {error}") from error
    if missing or unexpected:
        raise ValueError(f"weights in {folder} do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()
