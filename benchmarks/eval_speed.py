"""Scene evaluation speed: the former two-pass scene evaluation (each scene encoded once for
retrieval, again for grounding) against `evaluate_scenes`' single pass, in images/s (scenes plus
gallery images over wall-clock seconds), side by side in one run, with the metrics both give.

    python benchmarks/eval_speed.py                        # tiny random model, synthetic scenes
    python benchmarks/eval_speed.py --preset eclip-lite --products 24 --scenes-per-product 4

The scenes are ShopSynth products composed by `eclip compose` at the model's input size; the
model is randomly initialised (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eclip.data import ShopSynthConfig, generate, load_catalog
from eclip.data.catalog import Product
from eclip.data.compose import ComposeConfig, compose_catalog
from eclip.data.dataset import ImageStore
from eclip.data.transforms import normalize
from eclip.evaluation import grounding_metrics, point_in_box, ranks_metrics
from eclip.model.eclip import ECLIP
from eclip.model.grounding import box_iou, peak_point
from eclip.presets import model_preset
from eclip.scene_eval import evaluate_scenes


@torch.no_grad()
def two_pass_evaluate_scenes(model: ECLIP, scene_products: list[Product], catalog_products: list[Product], batch_size: int = 128) -> dict[str, float]:
    """The scene evaluation as it was: `model.product_embedding` over the gallery and the scenes,
    then `model.ground` over the scenes (a second trip through the image tower). The reference
    the single pass must match."""
    model.eval()
    catalog_index = {p.product_id: i for i, p in enumerate(catalog_products)}
    gallery = [(p, i) for p, product in enumerate(catalog_products) for i in range(len(product.images))]
    scenes = [(p, i) for p, product in enumerate(scene_products) if product.product_id in catalog_index for i in range(len(product.images))]
    scene_pid = np.array([catalog_index[scene_products[p].product_id] for p, _ in scenes])
    gallery_pid = np.array([p for p, _ in gallery])

    def batches(store: ImageStore, slots: list[tuple[int, int]]):
        for start in range(0, len(slots), batch_size):
            chunk = slots[start : start + batch_size]
            yield chunk, normalize(torch.stack([store.get(p, i) for p, i in chunk]))

    def embed(store: ImageStore, slots: list[tuple[int, int]]) -> np.ndarray:
        return torch.cat([model.product_embedding(images).float().cpu() for _, images in batches(store, slots)]).numpy()

    scene_store = ImageStore(scene_products, model.image_size)
    gallery_emb = embed(ImageStore(catalog_products, model.image_size), gallery)
    scene_emb = embed(scene_store, scenes)
    m = ranks_metrics(scene_emb @ gallery_emb.T, scene_pid[:, None] == gallery_pid[None, :], ks=(1, 10))
    results = {"num_scenes": len(scenes), "scene_to_catalog_map10": m["map10"], "scene_to_catalog_r1": m["r1"], "scene_to_catalog_r10": m["r10"]}
    boxed = [(p, i) for p, i in scenes if scene_products[p].images[i].box is not None]
    ious, points = [], []
    for chunk, images in batches(scene_store, boxed):
        result = model.ground(images, [scene_products[p].title for p, _ in chunk])
        for (p, i), predicted, heatmap in zip(chunk, result.boxes, result.heatmaps.float().cpu().numpy()):
            box = scene_products[p].images[i].box
            ious.append(box_iou(predicted, box))
            points.append(point_in_box(peak_point(heatmap), box))
    return results | grounding_metrics(ious, points, [scene_products[p].images[i].box for p, i in boxed], "scene_grounding_")


def synthetic_scenes(root: Path, products: int, scenes_per_product: int, size: int) -> tuple[list[Product], list[Product]]:
    """(scene products, clean catalog products): ShopSynth photos composed into scenes."""
    paths = generate(root / "shopsynth", ShopSynthConfig(num_products=products, images_per_product=1, image_size=size, seed=0), progress=False)
    catalog, _ = load_catalog(paths["all"])
    compose_catalog(catalog, root / "scenes", ComposeConfig(scenes_per_product=scenes_per_product, size=size, seed=0), progress=False)
    scenes, _ = load_catalog(root / "scenes" / "catalog.jsonl")
    return scenes, catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="model preset (tiny, tiny-convnet, eclip-lite, ...)")
    parser.add_argument("--products", type=int, default=40)
    parser.add_argument("--scenes-per-product", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the fastest is reported")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ECLIP(model_preset(args.preset)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        scenes, catalog = synthetic_scenes(Path(tmp), args.products, args.scenes_per_product, model.image_size)
        num_scenes = sum(len(p.images) for p in scenes)
        images = num_scenes + sum(len(p.images) for p in catalog)
        runs = {
            "two passes (before)": lambda: two_pass_evaluate_scenes(model, scenes, catalog, args.batch_size),
            "one pass (after)": lambda: evaluate_scenes(model, scenes, catalog, args.batch_size, progress=False),
        }
        rows = []
        for name, run in tqdm(runs.items(), desc="timing", leave=False):
            run()  # warm-up: first-call allocations are not the evaluation's cost
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                results = run()
                seconds.append(time.perf_counter() - start)
            rows.append((name, min(seconds), results))

    print(f"preset {args.preset}, {images} images ({num_scenes} scenes + gallery), "
          f"batch {args.batch_size}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads\n")
    print("| evaluation | images encoded | seconds | images/s | map@10 | R@1 | Acc@0.5 | pointing |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, seconds, r), encoded in zip(rows, (images + num_scenes, images)):
        print(f"| {name} | {encoded} | {seconds:.2f} | {images / seconds:.1f} | {r['scene_to_catalog_map10']:.3f} | {r['scene_to_catalog_r1']:.3f} "
              f"| {r['scene_grounding_acc50']:.3f} | {r['scene_grounding_pointing']:.3f} |")
    print("\nThe one pass also computes the category-hinted retrieval and the grouped metrics in that time.")


if __name__ == "__main__":
    main()
