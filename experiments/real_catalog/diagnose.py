"""Train-split diagnostics for `experiments/real_catalog/real_catalog.py`: which ECLIP embedding carries the product?

Reads the models that `experiments/real_catalog/real_catalog.py` trained (WORK/clip/model, WORK/eclip/model) and the
training products' scenes (WORK/train_scenes); never the held-out split. For the first N training
products, each scene queries the clean photos of those N products (scene-to-catalog mAP@10, R@1)
with several image embeddings of the same model:

- `product`: the productness-weighted instances (what `product_embedding` indexes; the benchmark's
  number);
- `global`: the global head (trained by the global image-text objective in both arms);
- `title-selected`: the instance that the product's own title selects (an oracle: it reads the
  title, so it is not a fair retrieval number, but it says whether the instances hold the
  product at all);
- `productness-argmax`: the single query with the highest productness.

Also: how often productness picks the query the title selects, the productness distribution's
entropy, and the pointing game of the title-selected query's attention against the true box.

    python experiments/real_catalog/diagnose.py --work runs/bench_myntra --products 300
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from eclip.data import ImageStore, load_catalog  # noqa: E402
from eclip.data.transforms import normalize  # noqa: E402
from eclip.evaluation import ranks_metrics  # noqa: E402
from eclip.io import load_model  # noqa: E402
from eclip.model.grounding import peak_point, upsample_heatmap  # noqa: E402


@torch.no_grad()
def encode(model, products, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Every embedding variant of every image of `products`, plus the titles' selections."""
    store = ImageStore(products, model.image_size)
    slots = [(p, i) for p, product in enumerate(products) for i in range(len(product.images))]
    titles = model.encode_text([p.title for p in products])
    out: dict[str, list] = {"pid": [], "global": [], "product": [], "title": [], "argmax": [], "agree": [], "entropy": [], "pointing": [], "chosen": []}
    for start in range(0, len(slots), batch_size):
        chunk = slots[start : start + batch_size]
        images = normalize(torch.stack([store.get(p, i) for p, i in chunk]))
        enc = model.encode_image(images)
        pids = torch.tensor([p for p, _ in chunk])
        out["pid"].append(pids.numpy())
        out["global"].append(enc.global_embedding.numpy())
        out["product"].append(model.product_embedding_from(enc).numpy())
        if enc.instances is None:
            continue
        own = titles[pids]  # (B, D)
        sims = torch.einsum("bmd,bd->bm", enc.instances, own)
        chosen = sims.argmax(dim=1)
        picked = enc.productness.argmax(dim=1)
        rows = torch.arange(len(chunk))
        out["title"].append(enc.instances[rows, chosen].numpy())
        out["argmax"].append(enc.instances[rows, picked].numpy())
        out["agree"].append((chosen == picked).numpy())
        out["chosen"].append(chosen.numpy())
        prob = enc.productness.softmax(dim=1)
        out["entropy"].append((-(prob * prob.clamp_min(1e-12).log()).sum(dim=1)).numpy())
        maps = upsample_heatmap(enc.attention[rows, chosen], (images.shape[-2], images.shape[-1])).numpy()
        for (p, i), heatmap in zip(chunk, maps):
            box = products[p].images[i].box
            if box is not None:
                x, y = peak_point(heatmap)
                out["pointing"].append(np.array([box[0] <= x <= box[2] and box[1] <= y <= box[3]]))
    return {k: np.concatenate(v) for k, v in out.items() if v}


def retrieval(query: np.ndarray, qpid: np.ndarray, gallery: np.ndarray, gpid: np.ndarray) -> dict[str, float]:
    q = F.normalize(torch.from_numpy(query), dim=-1).numpy()
    g = F.normalize(torch.from_numpy(gallery), dim=-1).numpy()
    m = ranks_metrics(q @ g.T, qpid[:, None] == gpid[None, :], ks=(1, 10))
    return {"map10": round(m["map10"], 3), "r1": round(m["r1"], 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/bench_myntra")
    p.add_argument("--products", type=int, default=300)
    p.add_argument("--scenes-per-product", type=int, default=3)
    args = p.parse_args()
    work = Path(args.work)
    train_products, _ = load_catalog(work / "train_scenes" / "catalog.jsonl")
    chosen = train_products[: args.products]
    scenes = [replace(x, images=x.images[: args.scenes_per_product]) for x in chosen]
    clean = [replace(x, images=x.images[-1:]) for x in chosen]  # keep_clean: the clean photo is last
    report = {}
    for arm in ("clip", "eclip"):
        folder = work / arm / "model"
        if not folder.is_dir():
            continue
        model = load_model(folder).eval()
        s, c = encode(model, scenes), encode(model, clean)
        row = {name: retrieval(s[name], s["pid"], c[name], c["pid"]) for name in ("product", "global", "title", "argmax") if name in s}
        if "agree" in s:
            row["productness_picks_title_query"] = round(float(s["agree"].mean()), 3)
            row["productness_entropy_nats"] = round(float(s["entropy"].mean()), 3)
            row["productness_entropy_uniform"] = round(float(np.log(model.config.decoder.num_queries)), 3)
            row["title_query_pointing"] = round(float(s["pointing"].mean()), 3)
            counts = np.bincount(s["chosen"], minlength=model.config.decoder.num_queries)
            row["title_query_share_of_most_used"] = round(float(counts.max() / counts.sum()), 3)
            row["title_queries_used"] = int((counts > 0).sum())
        report[arm] = row
        print(arm, json.dumps(row))
    (work / "train_diagnostics.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
