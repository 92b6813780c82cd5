"""Validation during training, as open_clip's --val-frequency / --zeroshot-frequency: a held-out
catalog (and, optionally, composed scenes of its products) read and decoded once, then evaluated
every `val_every` steps and after the last with the library's own evaluation
(`eclip.evaluation.evaluate`: zero-shot classification, retrieval, grounding;
`eclip.scene_eval.evaluate_scenes`: scene-to-catalog retrieval and grounding in scenes)."""

from __future__ import annotations

import logging
import random
import time

import numpy as np
import torch

from eclip.data import CatalogError, ImageStore, Product, load_catalog
from eclip.evaluation import HEADLINE_METRICS, evaluate
from eclip.model import ECLIP
from eclip.scene_eval import evaluate_scenes

from .config import SettingError, TrainConfig

logger = logging.getLogger("eclip.train")

PREFIX = "val/"  # the keys of a validation record in metrics.jsonl and TensorBoard


def validation_due(config: TrainConfig, step: int) -> bool:
    """Whether the run evaluates after `step`: every val_every steps, and after the schedule's
    last step (config.steps), when there is a val_catalog."""
    return bool(config.val_catalog) and (step == config.steps or (config.val_every > 0 and step % config.val_every == 0))


def is_validation(record: dict) -> bool:
    """Whether a metrics.jsonl record is a validation record (its keys start with "val/")."""
    return any(key.startswith(PREFIX) for key in record)


class Validation:
    """The validation set of a TrainConfig (`validation_due` says when to evaluate it). Built
    before the model, so that a bad catalog stops the run before anything trains; `decode` then
    decodes every image once at the model's size and keeps it."""

    def __init__(self, config: TrainConfig):
        if config.val_every < 0:
            raise SettingError(f"val_every must be >= 0 (0: after the last step only), not {config.val_every}")
        if config.val_batch < 1:
            raise SettingError(f"val_batch must be >= 1, not {config.val_batch}")
        self.batch_size = config.val_batch
        self.products = _catalog(config.val_catalog, "val_catalog")
        if config.val_max_products > 0:
            self.products = self.products[: config.val_max_products]
        self.scene_products: list[Product] = []
        if config.val_scene_catalog:
            ids = {p.product_id for p in self.products}
            self.scene_products = [p for p in _catalog(config.val_scene_catalog, "val_scene_catalog") if p.product_id in ids]
            if not self.scene_products:
                raise ValidationCatalogError(f"val_scene_catalog {config.val_scene_catalog}: no scene shows a product of val_catalog "
                                   f"{config.val_catalog} (products are matched by product_id)")
        self.store: ImageStore | None = None
        self.scene_store: ImageStore | None = None

    @classmethod
    def from_config(cls, config: TrainConfig) -> Validation | None:
        """None when the config asks for no validation."""
        if not config.val_catalog:
            if config.val_every or config.val_scene_catalog:
                raise SettingError("val_every and val_scene_catalog need val_catalog (the held-out catalog to evaluate)")
            return None
        return cls(config)

    def decode(self, image_size: int, progress: bool = False) -> None:
        self.store = ImageStore(self.products, image_size)
        self.store.preload(progress)
        if self.scene_products:
            self.scene_store = ImageStore(self.scene_products, image_size)
            self.scene_store.preload(progress)

    def run(self, model: ECLIP) -> dict[str, float]:
        """The metrics, keys prefixed "val/", and the seconds it took. The model is evaluated in
        eval mode under inference mode and left in the mode it was in; the random number
        generators (torch on the CPU and the model's device, numpy, random) are left as they
        were, so that a run with validation trains exactly as one without."""
        if self.store is None or self.store.image_size != model.image_size:
            self.decode(model.image_size)
        begin = time.perf_counter()
        was_training = model.training
        device = next(model.parameters()).device
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
                model.eval()
                metrics = evaluate(model, self.products, self.batch_size, store=self.store, progress=False)
                if self.scene_products:
                    metrics |= evaluate_scenes(model, self.scene_products, self.products, self.batch_size, progress=False,
                                               group_by=(), scene_store=self.scene_store, catalog_store=self.store)
        finally:
            model.train(was_training)
            random.setstate(py_state)
            np.random.set_state(np_state)
        seconds = time.perf_counter() - begin
        logger.info("validation: %s (%.1f s)", ", ".join(f"{k} {metrics[k]:.3f}" for k in HEADLINE_METRICS if k in metrics), seconds)
        return {f"{PREFIX}{key}": value for key, value in metrics.items()} | {f"{PREFIX}seconds": round(seconds, 3)}


class ValidationCatalogError(CatalogError, SettingError):
    """A validation catalog that cannot be used: a catalog error (the file) and a setting error
    (the run is refused before it starts, `eclip train` exits 2)."""


def _catalog(path: str, field: str) -> list[Product]:
    try:
        products, _ = load_catalog(path)
    except CatalogError as error:  # say which setting named the file
        raise ValidationCatalogError(f"{field}: {error}") from None
    return products
