"""The Hugging Face Hub, offline: a model folder with its card and version, the same folder
loaded from a pre-filled hub cache under HF_HUB_OFFLINE=1, and pushing to a local stand-in of
`HfApi`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

import eclip
from eclip.config import to_dict
from eclip.hub import EVAL_NAME, HubError, push_folder
from eclip.model import ECLIP
from eclip_app.cli import main
from eclip_app.train import make_train_config
from tests.conftest import micro_config

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    return ECLIP(micro_config()).eval()


def same_model(a: ECLIP, b: ECLIP) -> None:
    assert a.config == b.config
    with torch.no_grad():
        torch.testing.assert_close(a.product_embedding(IMAGES), b.product_embedding(IMAGES))
        torch.testing.assert_close(a.encode_text(["a red tee"]), b.encode_text(["a red tee"]))


def test_save_pretrained_writes_config_with_version_weights_and_card(model, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    train = make_train_config("tiny", "eclip", catalog="shop/train.jsonl", steps=321, seed=7)
    (run / "train_config.json").write_text(json.dumps(to_dict(train)))
    folder = model.save_pretrained(run / "model", evaluation={"classification_top1": 0.4321, "num_products": 12})
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", EVAL_NAME, "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["eclip_version"] == eclip.__version__
    card = (folder / "README.md").read_text()
    for expected in ("arXiv:2304.02853", "CVPR 2023", "`vit`", "4 queries", "`shop/train.jsonl`", "321 steps of 96 images",
                     "seed 7", "| classification_top1 | 0.432 |", "| num_products | 12 |", "## Licence", "license: mit",
                     f"eclip {eclip.__version__}"):
        assert expected in card, expected
    same_model(ECLIP.from_pretrained(folder, device="cpu"), model)


def test_a_card_says_what_the_folder_lacks_and_the_baseline_has_no_decoder(tmp_path):
    folder = ECLIP(micro_config(decoder=False)).save_pretrained(tmp_path / "m")
    card = (folder / "README.md").read_text()
    assert "none (the CLIP baseline" in card
    assert "Not recorded in this folder" in card and "No evaluation in this folder" in card


def test_folders_written_before_the_version_field_still_load(model, tmp_path):
    folder = model.save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    del config["eclip_version"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "README.md").unlink()  # older folders had no card either
    same_model(eclip.load_model(folder, device="cpu"), model)


def hub_cache(root: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """huggingface_hub's documented cache layout: models--org--name/{refs/main, snapshots/COMMIT/...}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return root


def test_hf_hub_names_load_from_the_cache_offline(model, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = hub_cache(tmp_path / "hub", "shop/eclip-tiny", model.save_pretrained(tmp_path / "m"))
    same_model(eclip.load_model("hf-hub:shop/eclip-tiny", device="cpu", cache_dir=cache), model)
    with pytest.raises(FileNotFoundError, match=r"hf-hub:shop/other: not in the hub cache \(HF_HUB_OFFLINE"):
        eclip.load_model("hf-hub:shop/other", cache_dir=cache)


class StandInHub:
    """What `push_folder` asks of `HfApi`, recorded; the upload copies the allowed files."""

    def __init__(self, root: Path, token=None):
        self.root, self.token, self.calls = root, token, []

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message, repo_type):
        self.calls.append(("upload_folder", repo_id, commit_message))
        target = self.root / repo_id
        target.mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            if (Path(folder_path) / name).is_file():
                shutil.copy(Path(folder_path) / name, target / name)
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_push_uploads_the_folder_with_a_card_for_the_repository(model, tmp_path, online):
    folder = model.save_pretrained(tmp_path / "m", evaluation={"grounding_acc50": 0.5})
    (folder / "notes.txt").write_text("not for the hub")
    hub = StandInHub(tmp_path / "remote")
    url = push_folder(folder, "shop/eclip-tiny", private=True, api=hub)
    assert url == "https://huggingface.co/shop/eclip-tiny/commit/abc"
    assert hub.calls[0] == ("create_repo", "shop/eclip-tiny", True, True)
    pushed = tmp_path / "remote" / "shop" / "eclip-tiny"
    assert sorted(p.name for p in pushed.iterdir()) == ["README.md", "config.json", EVAL_NAME, "model.safetensors"]
    assert 'eclip.load_model("hf-hub:shop/eclip-tiny")' in (pushed / "README.md").read_text()
    # what was pushed is a model folder: it loads as one from a hub cache
    same_model(eclip.load_model("hf-hub:shop/eclip-tiny", device="cpu", cache_dir=hub_cache(tmp_path / "hub", "shop/eclip-tiny", pushed)), model)


def test_model_push_to_hub_and_eclip_push(model, tmp_path, online, monkeypatch, capsys):
    hubs: list[StandInHub] = []
    monkeypatch.setattr("huggingface_hub.HfApi", lambda token=None: hubs.append(StandInHub(tmp_path / "remote", token)) or hubs[-1])
    model.push_to_hub("shop/from-model", token="t0k")
    assert hubs[-1].token == "t0k" and (tmp_path / "remote" / "shop" / "from-model" / "model.safetensors").is_file()
    folder = model.save_pretrained(tmp_path / "m")
    assert main(["push", str(folder), "shop/from-cli", "--message", "first"]) == 0
    assert "shop/from-cli" in capsys.readouterr().out and hubs[-1].calls[-1] == ("upload_folder", "shop/from-cli", "first")


def test_push_offline_or_refused_says_so(model, tmp_path, monkeypatch, capsys):
    folder = model.save_pretrained(tmp_path / "m")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set: cannot push"):
        push_folder(folder, "shop/x", api=StandInHub(tmp_path))
    assert main(["push", str(folder), "shop/x"]) == 1
    assert "eclip push: HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "nothing"), "shop/x"]) == 1
    assert "not a model folder" in capsys.readouterr().err

    class Refusing(StandInHub):
        def create_repo(self, *args, **kwargs):
            raise ConnectionError("no route to huggingface.co")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubError, match="pushing .* to shop/x failed: no route"):
        push_folder(folder, "shop/x", api=Refusing(tmp_path))


def test_eclip_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"eclip {eclip.__version__}"
