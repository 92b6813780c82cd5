"""The main job: ShopSynth catalog -> ECLIP and the CLIP baseline trained alike -> zero-shot
evaluation on held-out products -> comparison table and a report folder."""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eclip.config import override
from eclip.data import ImageStore, ShopSynthConfig, generate, load_catalog
from eclip.evaluation import evaluate
from eclip.hub import EVAL_NAME, write_model_card
from eclip.io import atomic_write_text

from .report import comparison_table, grounding_grid, plot_losses
from .train import make_train_config, train

logger = logging.getLogger("eclip.demo")


@dataclass
class DemoSize:
    products: int
    steps: int
    warmup: int


# The demo's towers: the ConvNeXt-style vision tower learns a ShopSynth product's shape sooner
# than the ViT and trains faster on a CPU (docs/results.md, "How the demo got here").
DEMO_PRESET = "tiny-convnet"
SIZES = {
    "full": DemoSize(products=4000, steps=1800, warmup=60),
    "quick": DemoSize(products=1200, steps=200, warmup=20),
}


def peak_memory_gib() -> float | None:
    """The process's peak resident memory; None where the platform does not say (Windows)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def run_demo(
    out_dir: str | Path,
    quick: bool = False,
    seed: int = 0,
    steps: int | None = None,
    products: int | None = None,
    progress: bool = True,
    synth: list[str] | None = None,
    preset: str = DEMO_PRESET,
    device: str = "auto",
) -> dict:
    """`synth`: ShopSynthConfig overrides ("product_scale=[0.3,0.5]"), for a harder or easier
    catalog than the default; `preset`: the model preset both arms start from. The report
    records both. `device`: where both arms train and are evaluated ("auto": CUDA when
    present)."""
    out = Path(out_dir)
    default_size = SIZES["quick" if quick else "full"]
    steps = steps or default_size.steps
    size = DemoSize(products=products or default_size.products, steps=steps, warmup=min(default_size.warmup, max(1, steps // 10)))
    begin = time.time()

    data_dir = out / "data"
    logger.info("generating ShopSynth: %d products x 3 images in %s", size.products, data_dir)
    synth_config = override(ShopSynthConfig(num_products=size.products, images_per_product=3, seed=seed), list(synth or []))
    paths = generate(data_dir, synth_config, progress=progress)

    train_products, _ = load_catalog(paths["train"])
    heldout, _ = load_catalog(paths["heldout"])
    runs, histories, results = {}, {}, {}
    store = None  # decoded once, shared by both runs
    for objective in ("eclip", "clip"):
        config = make_train_config(
            preset, objective, catalog=str(paths["train"]), out_dir=str(out / objective),
            steps=steps, warmup_steps=size.warmup, seed=seed, checkpoint_every=max(steps // 2, 1), device=device,
        )
        store = store or ImageStore(train_products, config.model.vision.image_size)
        result = train(config, progress=progress, store=store)
        runs[objective], histories[objective] = result.model, result.history
        logger.info("%s: %d steps in %.0f s", objective, steps, result.seconds)
        results[objective] = evaluate(result.model, heldout, progress=progress)
        results[objective]["train_seconds"] = round(result.seconds, 1)
        results[objective]["final_loss"] = result.history[-1]["loss_total"]
        # beside the weights: the model card's evaluation table (eclip.hub)
        atomic_write_text(result.out_dir / "model" / EVAL_NAME, json.dumps(results[objective], indent=2))
        write_model_card(result.out_dir / "model")

    table = comparison_table(results)
    plot_losses(histories, out / "loss_curves.png")
    grounding_grid(runs, heldout, out / "grounding.png")
    peak = peak_memory_gib()
    meta = {
        "quick": quick, "seed": seed, "steps": steps, "products": size.products, "synth": list(synth or []), "preset": preset,
        "heldout_products": len(heldout), "seconds": round(time.time() - begin, 1),
        "peak_memory_gib": None if peak is None else round(peak, 2), "device": str(runs["eclip"].device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    memory = "unknown" if peak is None else f"{meta['peak_memory_gib']} GiB"
    atomic_write_text(out / "results.json", json.dumps({**results, "meta": meta}, indent=2))
    eclip_readout = runs["eclip"].config.readout
    synth_note = f", ShopSynth overrides {' '.join(synth)}" if synth else ""
    report = f"""# eclip demo

ShopSynth catalog of {size.products} products x 3 listing images (seed {seed}{synth_note}); {len(heldout)} held-out
products never seen in training. ECLIP and the CLIP baseline (same `{preset}` towers, no decoder,
global contrastive objective only) trained with the same data, {steps} steps and seed.

{table}

ECLIP serves its product embedding and text scores by its readout (`{eclip_readout}`: "mix" sums
the productness-weighted instance and the global embedding) and grounds with the selected
query's cross-attention; the baseline uses its global embedding and grounds with the
similarity of the text to each projected visual token (MaskCLIP-style). Boxes: each map's rule
(`ModelConfig.box_rule()`, chosen on the train split): ECLIP keeps the pixels above the map's
mean and boxes the largest connected region; the baseline keeps the top fifth of its map's range
and boxes all of it.

![loss curves](loss_curves.png)

![grounding](grounding.png)

Green: true box. Red: predicted box. Ran in {meta['seconds']} s on {meta['device']}, peak memory {memory}.
"""
    atomic_write_text(out / "report.md", report)
    print(table)
    print(f"\nreport: {out / 'report.md'}  ({meta['seconds']} s on {meta['device']}, peak memory {memory})")
    return {**results, "meta": meta}
