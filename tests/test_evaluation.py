import numpy as np
import pytest

from eclip.evaluation import linear_probe, macro_f1, random_box_baseline, ranks_metrics


def test_ranks_metrics_by_hand():
    # query 0: relevant items 0 and 2, ranked 1st and 3rd -> AP@R (R=2) = (1/1 + 0)/2 = 0.5
    # query 1: relevant item 1, ranked 2nd -> R@1 = 0, AP@R (R=1) = 0, map10 = 1/2
    scores = np.array([[0.9, 0.8, 0.7], [0.9, 0.5, 0.1]])
    relevant = np.array([[True, False, True], [False, True, False]])
    m = ranks_metrics(scores, relevant, ks=(1, 2))
    assert m["r1"] == pytest.approx(0.5)
    assert m["r2"] == pytest.approx(1.0)
    assert m["map_r"] == pytest.approx((0.5 + 0.0) / 2)
    # map@10 of query 0: (1/1 + 2/3) / 2; of query 1: (1/2) / 1
    assert m["map10"] == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)


def test_perfect_and_reversed_rankings():
    relevant = np.eye(4, dtype=bool)
    assert ranks_metrics(np.eye(4), relevant)["map_r"] == 1.0
    assert ranks_metrics(-np.eye(4), relevant)["r1"] == 0.0


def test_macro_f1():
    truth = np.array([0, 0, 1, 1, 2])
    assert macro_f1(truth, truth, 3) == 1.0
    predicted = np.array([0, 1, 1, 1, 2])  # class 0: f1 2/3, class 1: f1 0.8, class 2: 1
    assert macro_f1(predicted, truth, 3) == pytest.approx((2 / 3 + 0.8 + 1) / 3)


def test_random_box_accuracy_grows_with_the_box():
    small, small_iou = random_box_baseline([(0.4, 0.4, 0.5, 0.5)] * 10)
    large, large_iou = random_box_baseline([(0.2, 0.2, 0.8, 0.8)] * 10)
    assert small < 0.02 < large
    assert 0 < small_iou < large_iou < 1


class _ColourModel:
    """A stand-in model that sees an image's mean colour and a text's colour word: zero-shot
    colour classification is then exactly the colour of the image."""

    image_size = 8
    colours = ("red", "green", "blue")

    def eval(self):
        return self

    def encode_text(self, texts):
        import torch

        rows = [[float(c in t.split()) for c in self.colours] + [float(not any(c in t.split() for c in self.colours))] for t in texts]
        return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)

    def encode_image(self, images):
        import torch

        rgb = (images.mean(dim=(2, 3)) + 1) / 2  # back to [0, 1]
        return torch.nn.functional.normalize(torch.cat([rgb, torch.zeros(len(rgb), 1)], dim=1), dim=-1)

    def image_text_scores(self, encoding, texts, readout=None):
        return encoding @ texts.T

    def product_embedding_from(self, encoding, readout=None):
        return encoding

    def heatmaps_from(self, encoding, texts, grounding_map=None):
        import torch

        return torch.ones(len(encoding), 2, 2), None

    def box_from_heatmap(self, heatmap, grounding_map=None):
        from eclip.model.grounding import box_from_heatmap

        return box_from_heatmap(heatmap)


def test_attribute_classification_top1_and_macro_f1(tmp_path):
    from PIL import Image

    from eclip.data import Product, ProductImage
    from eclip.evaluation import evaluate

    rgb = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    seen = ["red", "red", "green", "green", "blue", "blue"]  # what the photos show
    labelled = ["red", "green", "green", "green", "blue", "blue"]  # product 1 is labelled wrong
    products = []
    for i, (colour, label) in enumerate(zip(seen, labelled)):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), rgb[colour]).save(path)
        products.append(Product(f"p{i}", f"item number {i}", [ProductImage(str(path))], attributes={"colour": label, "size": "m"}))
    results = evaluate(_ColourModel(), products, progress=False)
    assert results["attribute_colour_top1"] == pytest.approx(5 / 6)
    # labels sorted: blue (f1 1), green (tp 2, fn 1: 0.8), red (tp 1, fp 1: 2/3)
    assert results["attribute_colour_macro_f1"] == pytest.approx((1 + 0.8 + 2 / 3) / 3)
    assert "attribute_size_top1" not in results  # one value: no classification to make


def _probe_data(num_products: int = 120, images: int = 3, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, num_products)
    groups = np.repeat(np.arange(num_products), images)
    return labels, groups, np.repeat(labels, images), rng


def test_linear_probe_reads_a_label_the_features_hold():
    import torch

    product_labels, groups, labels, rng = _probe_data()
    centres = rng.normal(size=(4, 16)) * 3
    features = torch.from_numpy(centres[labels] + rng.normal(size=(len(labels), 16)))
    assert linear_probe(features, labels, groups) > 0.95
    noise = torch.from_numpy(rng.normal(size=(len(labels), 16)))
    assert linear_probe(noise, labels, groups) < 0.45  # 4 classes: chance is 0.25


def test_linear_probe_fits_under_inference_mode():
    """evaluate may run under torch.inference_mode (validation during training): the probe
    still fits with autograd, to the same accuracy."""
    import torch

    product_labels, groups, labels, rng = _probe_data()
    centres = rng.normal(size=(4, 16)) * 3
    features = torch.from_numpy(centres[labels] + rng.normal(size=(len(labels), 16)))
    plain = linear_probe(features, labels, groups)
    with torch.inference_mode():
        assert linear_probe(features.clone(), labels, groups) == plain > 0.95


def test_linear_probe_splits_by_product():
    """Features that identify the product but not its class: a split by image would let the
    probe memorise each product's label from its other images; split by product it cannot."""
    import torch

    product_labels, groups, labels, rng = _probe_data(num_products=60)
    features = torch.from_numpy(np.eye(60)[groups] + 0.01 * rng.normal(size=(len(groups), 60)))
    assert linear_probe(features, labels, groups) < 0.45
