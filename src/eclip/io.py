"""Save and load a model with its config: `config.json` (with the eclip version that wrote it)
+ `model.safetensors` + a model card (`README.md`) in a folder, the layout of a Hugging Face
Hub model repository. Nothing here unpickles; every write lands atomically (a temporary folder,
then a rename)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_folder, atomic_write_text, recover_folder, replace_folder  # noqa: F401 (the io API)
from .config import ModelConfig, from_dict, to_dict
from .devices import resolve_device
from .hub import EVAL_NAME, resolve_model_folder, write_model_card
from .model.eclip import ECLIP
from .version import __version__

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VERSION_KEY = "eclip_version"  # in config.json beside the ModelConfig fields; absent in older folders


def write_model_files(model: ECLIP, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write config and weights into an existing folder (the caller makes it atomic). `state`:
    the full weights when the model's own are sharded (FSDP)."""
    state = model.state_dict() if state is None else state
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "library": "eclip"})
    config = {VERSION_KEY: __version__, **to_dict(model.config)}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")


def save_model(model: ECLIP, folder: str | Path, evaluation: dict | None = None) -> Path:
    """The model folder: config, weights and the model card (`eclip.hub.model_card`), with
    `evaluation` (metrics, as `eclip eval --json` prints them) as eval_results.json when given."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        write_model_files(model, tmp)
        if evaluation is not None:
            (tmp / EVAL_NAME).write_text(json.dumps(evaluation, indent=2), encoding="utf-8")
        # tmp sits beside `folder`: the card finds the same training run (../train_config.json)
        write_model_card(tmp, title=folder.name)
    return folder


def load_config(folder: str | Path) -> ModelConfig:
    recover_folder(folder)  # a replace killed half-way: finish it or put the old folder back
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an eclip model folder")
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop(VERSION_KEY, None)  # folders written before the field have none
    return from_dict(ModelConfig, data)


def load_model(
    name_or_path: str | Path, device: str | torch.device | None = None, cache_dir: str | Path | None = None
) -> ECLIP:
    """A saved model, in eval mode on `device` (None: CUDA when present, else the CPU), from a
    folder or `hf-hub:org/name` (huggingface_hub's cache; with HF_HUB_OFFLINE=1 only from it).
    The config rebuilds the towers without their pretrained weights: every weight comes from
    model.safetensors, loaded strictly (no silent gaps)."""
    folder = resolve_model_folder(name_or_path, cache_dir)
    device = resolve_device(device)
    model = ECLIP(load_config(folder), pretrained=False)
    weights = load_file(str(Path(folder) / WEIGHTS_NAME), device=str(device))
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"weights in {folder} do not fit its config.json: {error}") from error
    if missing or unexpected:
        raise ValueError(f"weights in {folder} do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()
