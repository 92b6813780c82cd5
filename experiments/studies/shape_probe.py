"""Can a vision tower learn the product's category at all in a few hundred steps?

With the ViT (`tiny`, the demo's tower until 2026-11-27) neither ECLIP nor the CLIP baseline
learned the ShopSynth category (the drawn shape): zero-shot and linear-probe category accuracy
stayed near chance (0.10 for 10 classes) after 900 contrastive steps. This tool removes the contrastive objective from the question: it trains
a vision tower with a linear classifier on the category label directly (cross-entropy, AdamW,
30 warm-up steps, batch 96 listing images) on part of a catalog's products and prints the
accuracy on the other products as it goes. If even direct supervision needs hundreds of steps
to leave chance, a title-driven objective in which the category is one word among many
(colour, pattern, brand, promo words) cannot be expected to teach it in 900.

    .venv/bin/python experiments/studies/shape_probe.py --catalog runs/demo/data/train.jsonl --steps 600 --lr 1e-3
    .venv/bin/python experiments/studies/shape_probe.py --catalog runs/demo/data/train.jsonl --lr 2e-3 --set vision.kind=convnet

Only training products are used (the last `--val-products` of the catalog are the probe's
validation set), so the demo's held-out split stays unread.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

from eclip.config import override
from eclip.data import ImageStore, load_catalog
from eclip.data.transforms import normalize
from eclip.model.towers import build_vision_tower
from eclip.presets import model_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", required=True, help="a ShopSynth training catalog (JSON Lines with categories)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="model config override, e.g. vision.patch_size=16")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--val-products", type=int, default=600)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the accuracy curve here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    products, _ = load_catalog(args.catalog)
    fit_products, val_products = products[: -args.val_products], products[-args.val_products :]
    categories = sorted({p.category for p in products})
    config = override(model_preset(args.preset, "clip"), args.set)
    tower = build_vision_tower(config.vision, pretrained=True)

    def features(images: torch.Tensor) -> torch.Tensor:
        return tower.forward_features(images).pooled
    head = nn.Linear(tower.width, len(categories))
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 30))
    size = config.vision.image_size
    fit_store, val_store = ImageStore(fit_products, size), ImageStore(val_products, size)
    slots = [(p, i) for p, product in enumerate(fit_products) for i in range(len(product.images))]
    rng = np.random.default_rng(args.seed)

    @torch.no_grad()
    def validation_accuracy() -> float:
        tower.eval()
        correct = 0
        for start in range(0, len(val_products), 120):
            chunk = range(start, min(start + 120, len(val_products)))
            images = normalize(torch.stack([val_store.get(p, 0) for p in chunk]))
            truth = torch.tensor([categories.index(val_products[p].category) for p in chunk])
            correct += int((head(features(images)).argmax(dim=1) == truth).sum())
        tower.train()
        return correct / len(val_products)

    curve, begin = [], time.time()
    print(f"{len(fit_products)} products to fit, {len(val_products)} to validate, {len(categories)} categories (chance {1 / len(categories):.3f})")
    for step in range(args.steps + 1):
        if step % args.every == 0:
            accuracy = validation_accuracy()
            curve.append({"step": step, "val_accuracy": accuracy})
            print(f"step {step:5d}  validation accuracy {accuracy:.3f}  ({time.time() - begin:.0f} s)", flush=True)
        if step == args.steps:
            break
        picks = rng.choice(len(slots), args.batch, replace=False)
        images = normalize(torch.stack([fit_store.get(*slots[j]) for j in picks]))
        truth = torch.tensor([categories.index(fit_products[slots[j][0]].category) for j in picks])
        loss = nn.functional.cross_entropy(head(features(images)), truth)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "curve": curve}, f, indent=2)


if __name__ == "__main__":
    main()
