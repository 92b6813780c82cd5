"""What people would rather look at: the comparison table, loss curves, grounding grids."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from eclip.data.catalog import Product  # noqa: E402
from eclip.data.dataset import ImageStore  # noqa: E402
from eclip.data.transforms import normalize  # noqa: E402
from eclip.model.eclip import ECLIP  # noqa: E402

TABLE_ROWS = [
    ("classification_top1", "zero-shot classification top-1"),
    ("classification_macro_f1", "zero-shot classification macro-F1"),
    ("linear_probe_category_top1", "category linear probe top-1"),
    ("attribute_colour_top1", "zero-shot colour top-1"),
    ("attribute_pattern_top1", "zero-shot pattern top-1"),
    ("text_to_product_r1", "text-to-product R@1"),
    ("text_to_product_r10", "text-to-product R@10"),
    ("same_product_map_r", "same-product mAP@R"),
    ("same_product_r1", "same-product R@1"),
    ("grounding_acc50", "grounding Acc@IoU0.5"),
    ("grounding_pointing", "grounding pointing game"),
    ("grounding_mean_iou", "grounding mean IoU"),
    ("grounding_acc50_random_box", "grounding Acc@IoU0.5, random box"),
    ("grounding_mean_iou_random_box", "grounding mean IoU, random box"),
    ("grounding_pointing_random", "pointing game, random point"),
]


def comparison_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table, one column per model, plus ECLIP - CLIP where both are there."""
    names = list(results)
    header = "| metric | " + " | ".join(names) + (" | ECLIP - CLIP |" if {"eclip", "clip"} <= set(names) else " |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for key, label in TABLE_ROWS:
        if not any(key in results[n] for n in names):
            continue
        values = [results[n].get(key) for n in names]
        cells = ["" if v is None else f"{v:.3f}" for v in values]
        row = f"| {label} | " + " | ".join(cells) + " |"
        if {"eclip", "clip"} <= set(names) and key in results["eclip"] and key in results["clip"]:
            row += f" {results['eclip'][key] - results['clip'][key]:+.3f} |"
        lines.append(row)
    return "\n".join(lines)


def plot_losses(histories: dict[str, list[dict]], path: Path) -> None:
    keys = sorted({k for h in histories.values() for r in h for k in r if k.startswith("loss_")})
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, history in histories.items():
            rows = [r for r in history if key in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name)
        ax.set_title(key.removeprefix("loss_"))
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def grounding_grid(models: dict[str, ECLIP], products: list[Product], path: Path, count: int = 6) -> None:
    """Rows of held-out listing images; per model, the heat map of the selected query (or the
    baseline's token similarity) with the predicted box (red) and the true box (green)."""
    slots = [(p, 0) for p in range(min(count, len(products)))]
    fig, axes = plt.subplots(len(slots), 1 + len(models), figsize=(2.6 * (1 + len(models)), 2.7 * len(slots)), squeeze=False)
    for col, (name, model) in enumerate(models.items(), start=1):
        store = ImageStore(products, model.image_size)
        images = normalize(torch.stack([store.get(p, i) for p, i in slots]))
        result = model.ground(images, [products[p].title for p, _ in slots])
        for row, (p, i) in enumerate(slots):
            picture = images[row].permute(1, 2, 0).numpy() * 0.5 + 0.5
            if col == 1:
                _show(axes[row][0], picture, products[p].images[i].box, None, products[p].title)
            _show(axes[row][col], picture, products[p].images[i].box, result.boxes[row], name, result.heatmaps[row].cpu().numpy())
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _show(ax, picture, true_box, predicted_box, title, heatmap=None) -> None:
    size = picture.shape[0]
    ax.imshow(picture)
    if heatmap is not None:
        ax.imshow(heatmap, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    for box, colour in ((true_box, "lime"), (predicted_box, "red")):
        if box is not None:
            x0, y0, x1, y1 = (np.array(box) * size).tolist()
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2))
    ax.set_title(title if len(title) < 40 else title[:37] + "...", fontsize=7)
    ax.axis("off")
