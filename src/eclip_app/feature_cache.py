"""A locked-tower feature cache (LiT, Zhai et al. 2022): when the first layers of a tower are
frozen, their output on an image that is never augmented, or on a title, never changes. It is
computed once (on first use, or up front by `eclip cache-features`), stored in fp16 (or fp32),
and each step runs only the trainable layers on top of it.

Rows are keyed by (product index, image index) for images and by product index for titles, in
memory or in memory-mapped `.npy` files under a folder with a manifest (the frozen weights'
fingerprint, image size, layer counts, dtype, the catalog's content hash); opening a folder
built for anything else is refused. A row's "filled" flag is written (atomically) only after
its data was flushed, so a fill cut short resumes where it stopped and never reads a half row.
Augmented views (the repeats of a product with fewer than K images) are fresh images every
step: their prefix runs live, without gradient.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eclip.atomic import atomic_write_text
from eclip.data import Batch, ImageStore, PKSampler, Product
from eclip.data.augmentation import product_batch
from eclip.data.transforms import normalize
from eclip.model import ECLIP

from .optim import apply_freezing, frozen_prefix
from .training.data import product_groups

logger = logging.getLogger("eclip.feature_cache")

DTYPES = {"fp16": np.float16, "fp32": np.float32}
FORMAT = 1
MANIFEST = "manifest.json"


class FeatureCacheError(ValueError):
    """A configuration the cache would make wrong, or a cache folder built for another one."""


# ----------------------------------------------------------------------------- what may be cached


def cache_refusal(config, model: ECLIP) -> str | None:
    """Why a training config cannot use the feature cache (one line), or None. `model` has had
    `apply_freezing(model, config.optim)`."""
    layers = frozen_prefix(model, config.optim)
    if not any(layers.values()):
        return ("nothing to cache: no tower has a frozen prefix; set optim.freeze_vision=true (and "
                "optim.unfreeze_last_vision_blocks=k) and/or optim.freeze_text=true (optim.unfreeze_last_text_blocks=k)")
    if config.shards:
        return "feature_cache needs a catalog: streamed shards (--shards) have no stable image keys"
    if config.fsdp:
        return "feature_cache does not run under fsdp (its towers are sharded; the cache needs the whole frozen prefix on each rank)"
    for kind, tower in (("vision", model.vision), ("text", model.text)):
        param_layers, _ = tower.param_layers()
        trainable = [name for name, p in tower.named_parameters() if p.requires_grad and param_layers[name] < layers[kind]]
        if trainable:
            return f"feature_cache: {kind} parameters inside the frozen prefix would get gradients ({trainable[0]}, ...)"
    decoder = config.model.decoder
    if decoder is not None and layers["vision"] > 0 and decoder.memory_level != -1 and decoder.memory_level < layers["vision"] - 1:
        return (f"feature_cache: decoder.memory_level={decoder.memory_level} reads a vision level inside the "
                f"cached prefix ({layers['vision']} layers); unfreeze more vision blocks or use a later level")
    return None


def frozen_weights_sha256(tower: torch.nn.Module, num_layers: int) -> str:
    """A hash of everything the first `num_layers` layers compute with: their parameters and
    the buffers (BatchNorm statistics) of the modules holding them."""
    param_layers, _ = tower.param_layers()
    names = sorted(name for name, layer in param_layers.items() if layer < num_layers)
    owners = {name.rsplit(".", 1)[0] for name in names}
    state = tower.state_dict(keep_vars=False)
    buffers = sorted(name for name, _ in tower.named_buffers() if name.rsplit(".", 1)[0] in owners and name in state)
    digest = hashlib.sha256()
    for name in names + buffers:
        digest.update(name.encode())
        digest.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def catalog_sha256(products: list[Product]) -> str:
    """What the cache keys point at: every product's title and image paths, in order."""
    content = [[p.title, [image.path for image in p.images]] for p in products]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


# ----------------------------------------------------------------------------- storage


class Rows:
    """`n` rows of one shape and dtype, each marked filled or not: a numpy array in memory, or
    `NAME.npy` memory-mapped in a folder with its flags in `NAME.filled.npy`."""

    def __init__(self, name: str, n: int, shape: tuple[int, ...], dtype, folder: Path | None):
        self.name, self.folder = name, folder
        if folder is None:
            self.data = np.empty((n, *shape), dtype=dtype)
            self.filled = np.zeros(n, dtype=bool)
            return
        path, flags = folder / f"{name}.npy", folder / f"{name}.filled.npy"
        if path.exists():
            self.data = np.load(path, mmap_mode="r+")
            if self.data.shape != (n, *shape) or self.data.dtype != dtype:
                raise FeatureCacheError(f"{path}: shape {self.data.shape} {self.data.dtype}, expected {(n, *shape)} {np.dtype(dtype)}")
            self.filled = np.load(flags) if flags.exists() else np.zeros(n, dtype=bool)
        else:
            self.data = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, *shape))
            self.filled = np.zeros(n, dtype=bool)

    def missing(self, rows: list[int]) -> list[int]:
        return sorted({r for r in rows if not self.filled[r]})

    def read(self, rows: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.data[np.asarray(rows, dtype=np.int64)]))

    def write(self, rows: list[int], values: torch.Tensor) -> None:
        array = values.detach().cpu().numpy().astype(self.data.dtype)
        if not np.isfinite(array).all():
            raise FeatureCacheError(f"{self.name} features overflow {self.data.dtype}: use feature_cache_dtype=fp32")
        self.data[np.asarray(rows, dtype=np.int64)] = array
        self.filled[rows] = True

    def flush(self) -> None:
        """Data first, then the flags (written whole): a flag never claims an unwritten row."""
        if self.folder is None:
            return
        self.data.flush()
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{self.name}.filled.", suffix=".npy")
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, self.filled)
        os.replace(tmp, self.folder / f"{self.name}.filled.npy")

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())


class FeatureCache:
    """The frozen-prefix outputs of `model`'s towers over a catalog's images and titles.

    `vision_layers` / `text_layers`: the frozen prefix length of each tower (0: that tower is
    not cached and runs whole). Rows are computed with the model as it is (its frozen layers in
    eval mode, as `_TunableTower.train` keeps them), in fp32, and stored as `dtype`."""

    def __init__(
        self,
        model: ECLIP,
        products: list[Product],
        vision_layers: int,
        text_layers: int,
        dtype: str = "fp16",
        folder: str | Path | None = None,
        store: ImageStore | None = None,
        batch_size: int = 64,
    ):
        if dtype not in DTYPES:
            raise FeatureCacheError(f"feature_cache_dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        if not (vision_layers or text_layers):
            raise FeatureCacheError("nothing to cache: neither tower has a frozen prefix")
        self.model, self.products = model, products
        self.vision_layers, self.text_layers = vision_layers, text_layers
        self.store = store or ImageStore(products, model.image_size)
        self.batch_size = batch_size
        self.folder = Path(folder) if folder else None
        self.offsets = np.concatenate([[0], np.cumsum([len(p.images) for p in products])]).astype(np.int64)
        self.device = next(model.parameters()).device
        shapes = self._probe_shapes()
        self.manifest = self._manifest(dtype, shapes)
        if self.folder is not None:
            self._open_folder()
        np_dtype = DTYPES[dtype]
        self.images = Rows("vision", int(self.offsets[-1]), shapes["vision"], np_dtype, self.folder) if vision_layers else None
        self.titles = Rows("text", len(products), shapes["text"], np_dtype, self.folder) if text_layers else None
        self.masks = Rows("text_mask", len(products), shapes["text"][:1], bool, self.folder) if text_layers else None

    # -- set-up

    def _probe_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of one row of each tower's prefix output (a split forward the tower does
        not support fails here, before any training)."""
        shapes = {"vision": (), "text": ()}
        size = self.model.image_size
        with torch.inference_mode():
            if self.vision_layers:
                probe = torch.zeros(1, 3, size, size, device=self.device)
                shapes["vision"] = tuple(self._run_vision(probe).shape[1:])
            if self.text_layers:
                ids, mask = self.model.tokenizer([""])
                shapes["text"] = tuple(self._run_text(ids.to(self.device), mask.to(self.device)).shape[1:])
        return shapes

    def _manifest(self, dtype: str, shapes: dict) -> dict:
        config = self.model.config

        def tower(kind: str, tower_config, module, layers: int, **extra) -> dict | None:
            if not layers:
                return None
            return {"kind": tower_config.kind, "model_name": tower_config.model_name, "frozen_layers": layers,
                    "weights_sha256": frozen_weights_sha256(module, layers), "row_shape": list(shapes[kind]), **extra}

        return {
            "format": FORMAT,
            "dtype": dtype,
            "vision": tower("vision", config.vision, self.model.vision, self.vision_layers, image_size=self.model.image_size),
            "text": tower("text", config.text, self.model.text, self.text_layers, context_length=config.text.context_length),
            "catalog": {"products": len(self.products), "images": int(self.offsets[-1]), "sha256": catalog_sha256(self.products)},
        }

    def _open_folder(self) -> None:
        path = self.folder / MANIFEST
        if path.exists():
            saved = json.loads(path.read_text(encoding="utf-8"))
            diff = sorted(describe_diff(saved, self.manifest))
            if diff:
                raise FeatureCacheError(
                    f"feature cache {self.folder} was built for another setting ({'; '.join(diff[:4])}): "
                    "delete it or choose another feature_cache_dir"
                )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(self.manifest, indent=2))

    # -- the frozen prefixes

    def _run_vision(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.vision.forward_frozen_chunked(images, self.vision_layers)

    def _run_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.text.forward_frozen(ids, mask, self.text_layers)

    def _image_key(self, product: int, image: int) -> int:
        return int(self.offsets[product]) + image

    def _fill_images(self, rows: list[int]) -> None:
        keys = {int(r): (int(np.searchsorted(self.offsets, r, side="right") - 1)) for r in rows}
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            pixels = []
            for row in chunk:
                product = keys[row]
                image = row - int(self.offsets[product])
                decoded = (product, image) in self.store.cache
                pixels.append(self.store.get(product, image))
                if not decoded:  # a fill over a large catalog keeps only the features
                    self.store.cache.pop((product, image), None)
            with torch.inference_mode():
                out = self._run_vision(normalize(torch.stack(pixels)).to(self.device))
            self.images.write(chunk, out.float())
        self.images.flush()

    def _fill_titles(self, rows: list[int]) -> None:
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            ids, mask = self.model.tokenizer([self.products[p].title for p in chunk])
            with torch.inference_mode():
                out = self._run_text(ids.to(self.device), mask.to(self.device))
            self.titles.write(chunk, out.float())
            self.masks.write(chunk, mask)
        self.titles.flush()
        self.masks.flush()

    def fill(self, progress: bool = True) -> int:
        """Compute every missing row (images, then titles), in batches; returns how many.
        Resumable: what an earlier fill flushed is kept."""
        todo = 0
        parts = []
        if self.images is not None:
            parts.append(("images", np.flatnonzero(~self.images.filled).tolist(), self._fill_images))
        if self.titles is not None:
            parts.append(("titles", np.flatnonzero(~self.titles.filled).tolist(), self._fill_titles))
        for what, rows, fill in parts:
            step = self.batch_size * 8  # flush (and so make resumable) every few batches
            with tqdm(total=len(rows), desc=f"caching {what}", unit=what[:-1], disable=not progress, dynamic_ncols=True) as bar:
                for start in range(0, len(rows), step):
                    fill(rows[start : start + step])
                    bar.update(len(rows[start : start + step]))
            todo += len(rows)
        return todo

    @property
    def complete(self) -> bool:
        return all(rows.complete for rows in (self.images, self.titles, self.masks) if rows is not None)

    @property
    def nbytes(self) -> int:
        return sum(rows.data.nbytes for rows in (self.images, self.titles, self.masks) if rows is not None)

    # -- what a step reads

    def image_prefix(self, keys: list[tuple[int, int]]) -> torch.Tensor:
        """(B, ...) float32 on the model's device: the vision prefix of (product, image) keys,
        computed and stored first where missing."""
        rows = [self._image_key(p, i) for p, i in keys]
        missing = self.images.missing(rows)
        if missing:
            self._fill_images(missing)
        return self.images.read(rows).to(self.device, non_blocking=True).float()

    def live_image_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The vision prefix of views that are not cached (augmented), without gradient."""
        with torch.no_grad():
            return self._run_vision(images.to(self.device)).float()

    def text_inputs(self, pids: list[int] | torch.Tensor, titles: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """What the model's text input is under the cache: (prefix hidden (T, L, C), mask) of
        the products' titles, or, when the text tower is not cached, the tokens."""
        if not self.text_layers:
            return self.model.tokenizer(titles)
        rows = [int(p) for p in pids]
        missing = self.titles.missing(rows)
        if missing:
            self._fill_titles(missing)
        # the full padded length, as the tokenizer gives it: trimming the padding would change
        # the shapes the trainable blocks draw their dropout masks over
        hidden = self.titles.read(rows).to(self.device, non_blocking=True).float()
        return hidden, self.masks.read(rows).to(self.device)


def describe_diff(saved: dict, wanted: dict, prefix: str = ""):
    """'key: saved -> wanted' for every leaf that differs."""
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from describe_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            short = lambda v: v[:12] if isinstance(v, str) and len(v) == 64 else v  # noqa: E731
            yield f"{prefix}{key}: {short(a)} -> {short(b)}"


# ----------------------------------------------------------------------------- the training source


class CachedBatchSource:
    """The map-style source with the frozen vision prefix in place of pixels: a Batch whose
    `images` are (B, ...) prefix outputs (cached for plain images, run live for augmented
    views drawn exactly as `make_batch` draws them). Same sampler, same state."""

    def __init__(self, cache: FeatureCache, sampler: PKSampler, seed: int, rank: int = 0, world_size: int = 1):
        self.cache, self.sampler = cache, sampler
        self.seed, self.rank, self.world_size = seed, rank, world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def next_batch(self, step: int) -> Batch:
        groups = product_groups(self.sampler.batch(step), self.world_size, self.rank)
        self.sampler.step = step + 1
        store = self.cache.store
        slots = [s for _, group, _ in groups for s in group]
        plain = [j for j, s in enumerate(slots) if not s.augment]
        parts: list[torch.Tensor | None] = [None] * len(slots)
        if plain:
            cached = self.cache.image_prefix([(slots[j].product, slots[j].image) for j in plain])
            for j, row in zip(plain, cached):
                parts[j] = row
        j = 0
        for product, group, first in groups:
            if any(s.augment for s in group):  # the product's views, drawn as make_batch draws them
                views = product_batch([([store.get(s.product, s.image) for s in group], [s.augment for s in group], product, "")],
                                      self.seed, step, first).images
                rows = [k for k, s in enumerate(group) if s.augment]
                for k, row in zip(rows, self.cache.live_image_prefix(views[rows])):
                    parts[j + k] = row
            j += len(group)
        return Batch(
            images=torch.stack(parts),
            image_pids=torch.tensor([s.product for s in slots], dtype=torch.long),
            titles=[store.products[p].title for p, _, _ in groups],
            text_pids=torch.tensor([p for p, _, _ in groups], dtype=torch.long),
        )

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def cached_source(config, model: ECLIP, source, env, progress: bool = True) -> tuple[CachedBatchSource, FeatureCache]:
    """The training loop's source and cache for `TrainConfig.feature_cache` (after the model
    has its weights: a resumed run's come from the checkpoint). Raises FeatureCacheError on a
    config the cache would make wrong."""
    cache = cache_for_config(config, model, source.store.products, config.feature_cache_dir or None, store=source.store)
    layers = {"vision": cache.vision_layers, "text": cache.text_layers}
    if env.distributed and cache.folder is not None and not cache.complete:
        raise FeatureCacheError(f"feature cache {cache.folder} is not complete: under torchrun fill it first "
                                "(eclip cache-features), or leave feature_cache_dir empty for a cache in each rank's memory")
    logger.info("feature cache: vision prefix %d layers, text prefix %d layers, %s, %.2f GiB %s", layers["vision"], layers["text"],
                config.feature_cache_dtype, cache.nbytes / 2**30,
                f"memory-mapped in {cache.folder}" if cache.folder else "in memory (feature_cache_dir: a memory-mapped file)")
    return CachedBatchSource(cache, source.sampler, config.seed, env.rank, env.world_size), cache


def build_cache_for_config(config, products: list[Product], folder: str | Path, device: str = "cpu") -> FeatureCache:
    """The cache `train(config)` would use, for `eclip cache-features`: the model built as
    `train` builds it (same seed, pretrained weights, freezing)."""
    torch.manual_seed(config.seed)
    model = ECLIP(config.model).to(device)
    apply_freezing(model, config.optim)
    return cache_for_config(config, model, products, folder)


def cache_for_config(config, model: ECLIP, products: list[Product], folder, store=None) -> FeatureCache:
    """The cache of `model`'s frozen prefixes as `config` freezes them; FeatureCacheError on a
    config the cache would make wrong."""
    refusal = cache_refusal(config, model)
    if refusal:
        raise FeatureCacheError(refusal)
    layers = frozen_prefix(model, config.optim)
    return FeatureCache(model, products, layers["vision"], layers["text"], config.feature_cache_dtype, folder, store=store)
