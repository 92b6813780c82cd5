"""What same-product retrieval can reach from visible attributes alone.

An embedding that knew only some of a ShopSynth product's visible attributes (colour, pattern,
secondary colour, category) would rank every image that agrees on them first, in no particular
order. This prints the same-product mAP@R and R@1 of such "attribute oracles" on a catalog, with
the demo's protocol (`eclip.evaluation.ranks_metrics`: each image against all other images),
ties broken at random. It reads no model, so it places the trained models' numbers: which
attributes their embeddings must hold to score what they score.

    .venv/bin/python experiments/studies/attribute_ceiling.py --catalog runs/demo/data/heldout.jsonl
"""

from __future__ import annotations

import argparse

import numpy as np

from eclip.data import load_catalog
from eclip.evaluation import ranks_metrics

ORACLES = [
    ["colour"],
    ["colour", "pattern"],
    ["colour", "pattern", "secondary"],
    ["category", "colour", "pattern"],
    ["category", "colour", "pattern", "secondary"],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    products, _ = load_catalog(args.catalog)
    image_pid = np.array([p for p, product in enumerate(products) for _ in product.images])
    same = image_pid[:, None] == image_pid[None, :]
    np.fill_diagonal(same, False)
    rng = np.random.default_rng(args.seed)

    def visible(p: int, keys: list[str]) -> tuple:
        values = {"category": products[p].category, **products[p].attributes}
        if values.get("pattern") == "solid":  # a solid product shows no secondary colour
            values["secondary"] = None
        return tuple(values.get(k) for k in keys)

    print("| embedding knows | distinct values | same-product mAP@R | R@1 |\n|---|---|---|---|")
    for keys in ORACLES:
        codes = {}
        code = np.array([codes.setdefault(visible(p, keys), len(codes)) for p in image_pid])
        scores = (code[:, None] == code[None, :]).astype(float) + 0.01 * rng.random(same.shape)
        np.fill_diagonal(scores, -np.inf)
        metrics = ranks_metrics(scores, same)
        print(f"| {' + '.join(keys)} | {len(codes)} | {metrics['map_r']:.3f} | {metrics['r1']:.3f} |")


if __name__ == "__main__":
    main()
