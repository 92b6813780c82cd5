"""The Hugging Face Hub: load a model folder as `hf-hub:org/name` (through huggingface_hub's
cache, so offline from it with HF_HUB_OFFLINE=1), push a folder to a repository, and the model
card (README.md) that goes with it.

A hub repository holds exactly a model folder: config.json, model.safetensors, README.md (and
eval_results.json when the folder has one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import atomic_write_text

HUB_PREFIX = "hf-hub:"
CARD_NAME = "README.md"
EVAL_NAME = "eval_results.json"  # the metrics of `eclip eval --json` (the demo writes it)
TRAIN_CONFIG_NAME = "train_config.json"  # beside the model folder, in the training run's folder
REPO_FILES = ["config.json", "model.safetensors", CARD_NAME, EVAL_NAME]
PAPER = (
    "Jin, Li, Yuan, Mu. *Learning Instance-Level Representation for Large-Scale Multi-Modal "
    "Pretraining in E-commerce.* CVPR 2023. [arXiv:2304.02853](https://arxiv.org/abs/2304.02853)"
)


class HubError(RuntimeError):
    """A hub operation that cannot be done here (offline, not logged in, no such repository)."""


def offline() -> bool:
    """HF_HUB_OFFLINE set, at import time of huggingface_hub or since."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model_folder(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, revision: str | None = None) -> Path:
    """A local model folder as it is; `hf-hub:org/name` as the snapshot folder in the hub cache
    (downloaded there first unless offline)."""
    name = os.fspath(name_or_path)
    if not name.startswith(HUB_PREFIX):
        return Path(name)
    repo_id = name[len(HUB_PREFIX) :]
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=REPO_FILES,
                                      local_files_only=offline(), library_name="eclip"))
    except FileNotFoundError as error:  # huggingface_hub's LocalEntryNotFoundError: not in the cache
        raise FileNotFoundError(
            f"{name}: not in the hub cache{' (HF_HUB_OFFLINE is set: nothing is downloaded)' if offline() else ''}: {error}"
        ) from error


def _cell(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _towers(config: dict) -> list[str]:
    vision, text, decoder = config.get("vision", {}), config.get("text", {}), config.get("decoder")
    rows = [
        f"| vision tower | `{vision.get('kind', 'vit')}`{' ' + vision['model_name'] if vision.get('model_name') else ''}, "
        f"{vision.get('image_size', '?')} px input |",
        f"| text tower | `{text.get('kind', 'builtin')}`{' ' + text['model_name'] if text.get('model_name') else ''}, "
        f"{text.get('context_length', '?')} tokens |",
    ]
    if decoder:
        rows.append(f"| instance decoder | {decoder.get('num_queries')} queries, {decoder.get('depth')} layers, "
                    f"instances from `{decoder.get('instance_features', 'decoder')}` |")
    else:
        rows.append("| instance decoder | none (the CLIP baseline: global embedding only) |")
    rows.append(f"| embedding | {config.get('embed_dim')}-d, readout `{config.get('readout', 'instance')}`, "
                f"grounding map `{config.get('grounding_map', 'attention')}` |")
    return ["| part | what |", "|---|---|", *rows]


def _training(folder: Path) -> list[str]:
    path = folder.parent / TRAIN_CONFIG_NAME
    if not path.is_file():
        return ["Not recorded in this folder (it is written when `eclip train` saves the model inside its run folder)."]
    run = json.loads(path.read_text(encoding="utf-8"))
    data = run.get("catalog") or run.get("shards") or "?"
    batch = run.get("products_per_batch", 0) * run.get("images_per_product", 0)
    return [
        f"- data: `{data}`",
        f"- preset `{run.get('model_preset')}`, objective `{run.get('objective')}`",
        f"- {run.get('steps')} steps of {batch} images ({run.get('products_per_batch')} products x "
        f"{run.get('images_per_product')}), learning rate {run.get('lr')}, {run.get('precision', 'fp32')}, seed {run.get('seed')}",
    ]


def _evaluation(folder: Path) -> list[str]:
    path = folder / EVAL_NAME
    if not path.is_file():
        return [f"No evaluation in this folder (`eclip eval --model DIR --catalog C --json > DIR/{EVAL_NAME}` adds one)."]
    results = json.loads(path.read_text(encoding="utf-8"))
    rows = [f"| {key} | {_cell(value)} |" for key, value in results.items() if isinstance(value, (int, float))]
    return ["| metric | value |", "|---|---|", *rows]


def model_card(folder: str | os.PathLike, repo_id: str | None = None, title: str | None = None) -> str:
    """The README.md of a model folder, from its config.json, the training run around it
    (../train_config.json) and its eval_results.json, where they exist. `title`: the heading
    (default: `repo_id`, else the folder's name)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    source = f"hf-hub:{repo_id}" if repo_id else "path/to/this/folder"
    lines = [
        "---",
        "library_name: eclip",
        "license: mit",
        "tags: [eclip, e-commerce, image-text, product-search, zero-shot, grounding]",
        "---",
        "",
        f"# {title or repo_id or folder.name}",
        "",
        f"An ECLIP model, written by eclip {config.get('eclip_version', '(a version before 0.1.0 recorded it)')}. ECLIP: {PAPER}",
        "",
        "## Towers",
        "",
        *_towers(config),
        "",
        "## Training",
        "",
        *_training(folder),
        "",
        "## Evaluation",
        "",
        *_evaluation(folder),
        "",
        "## Use",
        "",
        "```python",
        "import eclip",
        f'model = eclip.load_model("{source}")',
        'vectors = model.encode_images(["photo.jpg"])          # (1, D) numpy',
        'box = model.ground("photo.jpg", "red striped tee").box_pixels',
        "```",
        "",
        "## Licence",
        "",
        "The eclip code is MIT-licensed. These weights are offered under the licence in the header above;",
        "pretrained towers (open_clip, timm, Hugging Face) and the training data carry their own terms.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str | os.PathLike, repo_id: str | None = None, title: str | None = None) -> Path:
    path = Path(folder) / CARD_NAME
    atomic_write_text(path, model_card(folder, repo_id, title))
    return path


def push_folder(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload eclip model", api=None) -> str:
    """Upload a model folder (its card regenerated for `repo_id`) to a hub model repository,
    created if missing; returns the commit's URL. HubError when offline or when the hub
    refuses."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (config.json and model.safetensors)")
    if offline():
        raise HubError(f"HF_HUB_OFFLINE is set: cannot push {folder} to {repo_id}. Unset it on a machine that "
                       "reaches huggingface.co and run `huggingface-cli login` (or pass a token)")
    from huggingface_hub import HfApi

    write_model_card(folder, repo_id)
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=REPO_FILES,
                                 commit_message=commit_message, repo_type="model")
    except OSError as error:  # requests' and httpx's connection errors are OSErrors; HfHubHTTPError too
        raise HubError(f"pushing {folder} to {repo_id} failed: {error}") from error
    return str(getattr(info, "commit_url", info))
