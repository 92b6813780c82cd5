"""Every library path moves its inputs to the model's device and brings its results back to the
CPU itself. No GPU here, so the model runs on a stand-in accelerator: its tensors keep their data
in CPU memory but report the device `meta`, and, as on CUDA, an operation that mixes them with
CPU tensors (other than 0-d scalars and index tensors) raises, and `.numpy()` on them raises
until `.cpu()` brings them back. Each path's results must equal the plain CPU run's."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from eclip.data import load_catalog
from eclip.evaluation import evaluate
from eclip.model import ECLIP
from eclip.retrieval import image_text_query
from eclip.scene_eval import evaluate_scenes
from eclip_app.report import grounding_grid
from eclip_app.search.searcher import Searcher
from eclip_app.search.serve import SearchService
from tests.conftest import micro_config
from tests.search_helpers import make_service

STAND_IN = torch.device("meta")  # the accelerator's name; the data stays in CPU memory
# real CUDA accepts CPU index tensors here
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_select}


class OnAccelerator(torch.Tensor):
    """A CPU tensor that plays one on the stand-in accelerator (see `FakeAccelerator`)."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # the mode below does the work

    @property
    def device(self) -> torch.device:
        return STAND_IN


def _as_device(value) -> torch.device | None:
    """A device argument (torch.device or a string that names one), else None."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:  # an einsum equation, a mode name, ...
            return None
    return None


def _is_stand_in(value) -> bool:
    device = _as_device(value)
    return device is not None and device.type == STAND_IN.type


class FakeAccelerator(TorchFunctionMode):
    """Tensors moved to `STAND_IN` become `OnAccelerator`; the results of any operation on them
    too, unless it is `.cpu()` or `.to("cpu")`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on = any(isinstance(t, OnAccelerator) for t in tensors)
        name = getattr(func, "__name__", repr(func))
        if on and func in (torch.Tensor.numpy, torch.Tensor.__array__):
            raise TypeError("can't convert a tensor on the accelerator to numpy: use Tensor.cpu() first")
        moves = func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.copy_)
        if on and not moves and func not in INDEXING:
            behind = [t for t in tensors if not isinstance(t, OnAccelerator) and t.dim() > 0]
            if behind:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found {STAND_IN} and cpu "
                                   f"({name}, a CPU tensor of shape {tuple(behind[0].shape)})")
        devices = [d for d in map(_as_device, flat) if d is not None]
        to_stand_in = any(d.type == STAND_IN.type for d in devices) or (
            func is torch.Tensor.to and any(isinstance(t, OnAccelerator) for t in tensors[1:])
        )
        to_cpu = func is torch.Tensor.cpu or (func is torch.Tensor.to and any(d.type == "cpu" for d in devices))
        cpu_args = tree_map(lambda x: torch.device("cpu") if _is_stand_in(x) else x, (args, kwargs))
        result = func(*cpu_args[0], **cpu_args[1])
        if to_cpu or not (on or to_stand_in):
            return tree_map(lambda x: x.as_subclass(torch.Tensor) if isinstance(x, OnAccelerator) else x, result)
        return tree_map(lambda x: x.as_subclass(OnAccelerator) if type(x) is torch.Tensor else x, result)


def on_stand_in(model: ECLIP) -> ECLIP:
    """A copy of the model with every weight on the stand-in accelerator."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        for group in (module._parameters, module._buffers):
            for key, tensor in group.items():
                if tensor is not None:
                    group[key] = tensor.detach().as_subclass(OnAccelerator)
    return model


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = ECLIP(micro_config()).eval()
    return model, on_stand_in(model)


def test_the_stand_in_catches_a_path_that_leaves_inputs_behind(models):
    """The harness itself: CPU images into the accelerator's weights, and numpy of a result left
    on the accelerator, both raise, as on CUDA; moved inputs and `.cpu()` results pass."""
    _, fake = models
    with FakeAccelerator():
        assert fake.device == STAND_IN
        with pytest.raises(RuntimeError, match="same device"):
            fake.vision.forward_features(torch.randn(1, 3, 32, 32))  # the tower alone does not move inputs
        with torch.no_grad():
            text = fake.encode_text(["red tee"])
        assert isinstance(text, OnAccelerator)
        with pytest.raises(TypeError, match="numpy"):
            text.numpy()
        assert text.cpu().numpy().shape == (1, 16)


def test_evaluate_on_the_accelerator_equals_the_cpu(models, synth_catalog):
    model, fake = models
    products, _ = load_catalog(synth_catalog["heldout"])
    expected = evaluate(model, products[:12], batch_size=8, progress=False)
    with FakeAccelerator():
        got = evaluate(fake, products[:12], batch_size=8, progress=False)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key


def test_evaluate_scenes_on_the_accelerator_equals_the_cpu(models, scenes, clean_catalog):
    model, fake = models
    scene_products, _ = load_catalog(scenes)
    catalog, _ = load_catalog(clean_catalog)
    expected = evaluate_scenes(model, scene_products, catalog, batch_size=4, progress=False)
    with FakeAccelerator():
        got = evaluate_scenes(fake, scene_products, catalog, batch_size=4, progress=False)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-5, nan_ok=True), key


def test_report_grid_and_grounding_on_the_accelerator(models, synth_catalog, tmp_path):
    model, fake = models
    products, _ = load_catalog(synth_catalog["heldout"])
    with FakeAccelerator():
        grounding_grid({"eclip": fake}, products, tmp_path / "grid.png", count=2)
        batch = torch.stack([fake.preprocess(products[0].images[0].path)] * 2)
        got = fake.ground(batch, ["red tee", "blue mug"])
        photo = fake.ground(products[0].images[0].path, "red tee")
    assert (tmp_path / "grid.png").stat().st_size > 0
    expected = model.ground(batch, ["red tee", "blue mug"])
    assert got.boxes == expected.boxes and not isinstance(got.heatmaps, OnAccelerator)
    torch.testing.assert_close(got.heatmaps, expected.heatmaps)
    assert photo.box_pixels == model.ground(products[0].images[0].path, "red tee").box_pixels


def test_encode_and_retrieval_on_the_accelerator(models, synth_catalog):
    model, fake = models
    paths = [product.images[0].path for product in load_catalog(synth_catalog["heldout"])[0][:5]]
    with FakeAccelerator():
        images, texts = fake.encode_images(paths, batch_size=2), fake.encode_texts(["red tee", "blue mug"])
        torch_images = fake.encode_images(paths, convert_to_numpy=False)
        with torch.no_grad():
            batch = torch.stack([fake.preprocess(p) for p in paths[:2]])
            query = image_text_query(fake, fake.encode_image(batch), fake.encode_text(["red tee", "blue mug"])).cpu()
    np.testing.assert_allclose(images, model.encode_images(paths), atol=1e-5)
    np.testing.assert_allclose(texts, model.encode_texts(["red tee", "blue mug"]), atol=1e-5)
    assert type(torch_images) is torch.Tensor and torch_images.device.type == "cpu"
    with torch.no_grad():
        expected = image_text_query(model, model.encode_image(batch), model.encode_text(["red tee", "blue mug"]))
    torch.testing.assert_close(query, expected)


def test_search_service_on_the_accelerator(models, tmp_path):
    model, fake = models
    service = make_service(model, tmp_path / "catalog")
    on_device = SearchService(Searcher(fake, service.index))
    image = Image.open(sorted((tmp_path / "catalog").glob("*.png"))[0]).convert("RGB")
    with FakeAccelerator():
        got = (on_device.embed_texts(["red shirt"]), on_device.embed_images([image]),
               on_device.ground_many([image], ["red shirt"]), on_device.classify(image, ["shirt", "bag"], ["a {}"]),
               on_device.search("red shirt", image, 3), on_device.searcher.ground(image, "red shirt").box_pixels)
    expected = (service.embed_texts(["red shirt"]), service.embed_images([image]),
                service.ground_many([image], ["red shirt"]), service.classify(image, ["shirt", "bag"], ["a {}"]),
                service.search("red shirt", image, 3), service.searcher.ground(image, "red shirt").box_pixels)
    np.testing.assert_allclose(got[0], expected[0], atol=1e-5)
    np.testing.assert_allclose(got[1], expected[1], atol=1e-5)
    assert json.dumps(got[2][0]["box"]) == json.dumps(expected[2][0]["box"])
    assert [r["label"] for r in got[3]] == [r["label"] for r in expected[3]]
    assert [r["product_id"] for r in got[4]] == [r["product_id"] for r in expected[4]]
    assert got[5] == expected[5]
