from .catalog import CatalogError, CatalogReport, Product, ProductImage, load_catalog
from .dataset import Batch, ImageStore, collate
from .sampler import PKSampler, Slot
from .shopsynth import ShopSynthConfig, generate

__all__ = [
    "Batch",
    "CatalogError",
    "CatalogReport",
    "ImageStore",
    "PKSampler",
    "Product",
    "ProductImage",
    "ShopSynthConfig",
    "Slot",
    "collate",
    "generate",
    "load_catalog",
]
