"""The inference API for photos and strings (`preprocess`, `encode_images`, `encode_texts`,
`ground(photo, text)`, `load_model`, `create_model`), and the README's Python snippets run as
written against a tiny model folder."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import eclip
from eclip.data.transforms import normalize, to_uint8_tensor
from eclip.model import ECLIP
from tests.conftest import micro_config

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return ECLIP(micro_config()).eval()


def photo(width: int = 90, height: int = 60, colour=(200, 30, 30)) -> Image.Image:
    image = Image.new("RGB", (width, height), (235, 235, 235))
    ImageDraw.Draw(image).rectangle((10, 8, width // 2, height - 10), fill=colour)
    return image


def test_preprocess_is_the_evaluation_transform_for_every_kind_of_photo(model, tmp_path):
    image = photo()
    expected = normalize(to_uint8_tensor(image, model.image_size))
    image.save(tmp_path / "p.png")
    array = np.array(image)
    for given in (image, tmp_path / "p.png", str(tmp_path / "p.png"), array, array / 255.0,
                  torch.from_numpy(array).permute(2, 0, 1), np.dstack([array, np.full(array.shape[:2], 255, np.uint8)])):
        torch.testing.assert_close(model.preprocess(given), expected, msg=lambda m, g=given: f"{type(g)}: {m}")
    assert model.preprocess(array[..., 0]).shape == (3, 32, 32)  # greyscale


@pytest.mark.parametrize("bad, error, words", [
    (3, TypeError, "not int"),
    (b"bytes", TypeError, "not bytes"),
    (np.zeros((4, 4, 2), np.uint8), ValueError, "(4, 4, 2)"),
    (np.zeros((4, 4, 3), np.int32), ValueError, "int32"),
    (torch.zeros(3, 8, 8), ValueError, "uint8"),
])
def test_anything_else_is_refused_naming_what_was_given(model, bad, error, words):
    with pytest.raises(error, match=re.escape(words)):
        model.preprocess(bad)
    with pytest.raises(error, match=re.escape("images[1]")):
        model.encode_images([photo(), bad])


def test_encode_images_batches_any_input_and_returns_numpy(model, tmp_path):
    images = [photo(colour=c) for c in [(200, 30, 30), (30, 60, 200), (40, 160, 60), (230, 210, 40), (20, 20, 20)]]
    images[1].save(tmp_path / "b.png")
    batch = torch.stack([model.preprocess(im) for im in images])
    with torch.no_grad():
        expected = model.product_embedding(batch).numpy()
    mixed = [images[0], tmp_path / "b.png", np.asarray(images[2]), batch[3], torch.from_numpy(np.array(images[4])).permute(2, 0, 1)]
    got = model.encode_images(mixed, batch_size=2)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (5, 16)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(model.encode_images(batch, batch_size=3), expected, atol=1e-5)  # a (B, 3, S, S) batch
    single = model.encode_images(images[0])
    assert single.shape == (16,)
    np.testing.assert_allclose(single, expected[0], atol=1e-5)
    as_torch = model.encode_images(images, convert_to_numpy=False, readout="global")
    assert isinstance(as_torch, torch.Tensor) and not as_torch.requires_grad and as_torch.shape == (5, 16)
    with torch.no_grad():
        torch.testing.assert_close(as_torch, model.encode_image(batch).global_embedding)
    assert model.encode_images([]).shape == (0, 16)
    with pytest.raises(ValueError, match=r"images\[0\].*\(3, 32, 32\)"):
        model.encode_images([torch.zeros(3, 16, 16)])  # a float tensor is an input, at the model's size


def test_encode_texts_matches_encode_text_and_names_bad_items(model):
    texts = [f"red tee number {i}" for i in range(7)]
    with torch.no_grad():
        expected = model.encode_text(texts).numpy()
    got = model.encode_texts(texts, batch_size=3)
    assert got.shape == (7, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert model.encode_texts("red tee").shape == (16,)
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        model.encode_texts(["ok", 5])
    with pytest.raises(TypeError, match="not dict"):
        model.encode_texts({"a": 1})


def test_the_photo_calls_run_in_eval_mode_without_autograd():
    torch.manual_seed(2)
    fresh = ECLIP(micro_config())  # built in training mode
    assert fresh.training
    vectors = fresh.encode_images([photo()], convert_to_numpy=False)
    assert not fresh.training and not vectors.requires_grad


def test_ground_a_raw_photo_gives_its_own_pixels(model, tmp_path):
    image = photo(120, 80)
    got = model.ground(image, "red tee")
    batch = model.preprocess(image)[None]
    on_square = model.ground(batch, ["red tee"])  # the same map, boxed on the model's input square
    assert got.box == pytest.approx(on_square.boxes[0])
    x0, y0, x1, y1 = got.box
    assert got.box_pixels == (round(x0 * 120), round(y0 * 80), round(x1 * 120), round(y1 * 80))
    assert got.heatmap.shape == (80, 120) and got.heatmap.min() >= 0.0 and got.heatmap.max() <= 1.0
    assert got.query_index == int(on_square.query_index[0])
    image.save(tmp_path / "p.jpg")
    assert model.ground(tmp_path / "p.jpg", "red tee").heatmap.shape == (80, 120)
    with pytest.raises(TypeError, match="one text as a str"):
        model.ground(image, ["red tee"])


def test_load_model_and_create_model_put_the_model_on_a_device(model, tmp_path):
    eclip.save_model(model, tmp_path / "m")
    loaded = eclip.load_model(tmp_path / "m")  # None: CUDA when present, else the CPU
    assert loaded.device.type == ("cuda" if torch.cuda.is_available() else "cpu") and not loaded.training
    assert eclip.load_model(tmp_path / "m", device="cpu").device == torch.device("cpu")
    built = eclip.create_model("tiny", pretrained=False, overrides=["embed_dim=32"])
    assert built.device == torch.device("cpu") and built.config.embed_dim == 32
    with pytest.raises(FileNotFoundError, match="not an eclip model folder"):
        eclip.load_model(tmp_path / "missing")


def readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_python_snippets_run_as_written(model, tmp_path, monkeypatch):
    """Every ```python block of the README, in order, in one namespace, in a folder holding
    what they name: the demo's model folder and the photos."""
    snippets = readme_snippets()
    assert len(snippets) >= 2
    source = "\n".join(snippets)
    for folder in set(re.findall(r'"(runs/[^"]+/model)"', source)):
        eclip.save_model(model, tmp_path / folder)
    for i, path in enumerate(sorted(set(re.findall(r'"([\w/.-]+\.(?:jpg|png))"', source)))):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        photo(100 + 10 * i, 70).save(tmp_path / path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["vectors"].shape == (2, 16)
    width, height = Image.open(tmp_path / "photos/tee.jpg").size
    assert namespace["found"].heatmap.shape == (height, width)
