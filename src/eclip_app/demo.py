"""The main job: ShopSynth catalog -> ECLIP and the CLIP baseline trained alike -> zero-shot
evaluation on held-out products -> comparison table and a report folder."""

from __future__ import annotations

import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
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
# The whole demo's time budget by default (minutes): on a machine too slow to train the default
# steps in it, both arms train fewer steps, never fewer than MIN_STEP_SHARE of the default.
TIME_BUDGET_MINUTES = 15.0
MIN_STEP_SHARE = 0.5
PROBE_STEPS = 25  # steps each arm trains at start to time its step (in a scratch folder)
PROBE_LOG_EVERY = 5  # the probe's throughput windows; the first (model warm-up) is left out
PROBE_EVAL_PRODUCTS = 100  # held-out products evaluated at start to time the evaluation
REPORT_SECONDS = 15.0  # figures and report after the last evaluation


@dataclass
class TimePlan:
    """How the demo sized its training to its time budget, from what it measured at start."""

    budget_seconds: float
    spent_seconds: float  # before training (the catalog, the probe)
    step_seconds: dict[str, float]  # one training step of each arm
    eval_seconds: float  # one arm's evaluation on the held-out products
    default_steps: int
    steps: int  # what each arm trains
    expected_seconds: float  # the whole demo's, at `steps`

    @property
    def fits(self) -> bool:
        return self.expected_seconds <= self.budget_seconds

    def step_times(self) -> str:
        """"eclip 0.292 s, clip 0.244 s": each arm's step as measured (the log and the report)."""
        return ", ".join(f"{arm} {seconds:.3f} s" for arm, seconds in self.step_seconds.items())


def plan_steps(
    budget_seconds: float, spent_seconds: float, step_seconds: dict[str, float], eval_seconds: float,
    default_steps: int, min_steps: int,
) -> TimePlan:
    """The most steps (at most `default_steps`, at least `min_steps`) both arms can train with
    every arm's evaluation and the report inside the budget."""
    per_step = sum(step_seconds.values())
    fixed = spent_seconds + len(step_seconds) * eval_seconds + REPORT_SECONDS
    affordable = math.floor((budget_seconds - fixed) / per_step) if per_step > 0 else default_steps
    steps = max(min_steps, min(default_steps, affordable))
    return TimePlan(budget_seconds, spent_seconds, step_seconds, eval_seconds, default_steps, steps, fixed + steps * per_step)


def measure_step_seconds(config, store: ImageStore, scratch: Path) -> tuple[float, object]:
    """Seconds per training step of `config`, timed over PROBE_STEPS steps trained in `scratch`
    (the run itself starts afresh: `train` seeds everything it draws). Returns the probe's model
    too, to time the evaluation with."""
    probe = override(config, [f"out_dir={json.dumps(str(scratch))}", f"log_every={PROBE_LOG_EVERY}", "keep_checkpoints=1"])
    result = train(probe, progress=False, store=store, stop_at=min(PROBE_STEPS, config.steps))
    windows = [r["samples_per_s"] for r in result.history[1:] if r.get("samples_per_s")]
    if not windows:  # too few steps for a window past the first: the whole probe
        return result.seconds / max(result.step, 1), result.model
    samples = config.products_per_batch * config.images_per_product
    return samples / statistics.median(windows), result.model


def measure_eval_seconds(model, heldout: list) -> float:
    """One arm's evaluation time on all of `heldout`, from the evaluation of its first
    PROBE_EVAL_PRODUCTS products (it grows with the number of images)."""
    part = heldout[:PROBE_EVAL_PRODUCTS]
    begin = time.time()
    evaluate(model, part, progress=False)
    return (time.time() - begin) * len(heldout) / max(len(part), 1)


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
    time_budget_minutes: float | None = TIME_BUDGET_MINUTES,
) -> dict:
    """`synth`: ShopSynthConfig overrides ("product_scale=[0.3,0.5]"), for a harder or easier
    catalog than the default; `preset`: the model preset both arms start from. The report
    records both. `device`: where both arms train and are evaluated ("auto": CUDA when
    present). `time_budget_minutes`: the whole run's budget; at start each arm trains a few
    steps and the held-out evaluation is timed on a part, and when the default steps would not
    fit, both arms train fewer (at least half; `TimePlan` in the results says what was measured).
    None or 0, or `steps` given: the steps as given."""
    if time_budget_minutes is not None and not (math.isfinite(time_budget_minutes) and time_budget_minutes >= 0):
        raise ValueError(f"time budget {time_budget_minutes} min: give a number of minutes >= 0 (0: no budget)")
    out = Path(out_dir)
    default_size = SIZES["quick" if quick else "full"]
    sized = not steps and bool(time_budget_minutes)
    steps = steps or default_size.steps
    products = products or default_size.products
    begin = time.time()

    data_dir = out / "data"
    logger.info("generating ShopSynth: %d products x 3 images in %s", products, data_dir)
    synth_config = override(ShopSynthConfig(num_products=products, images_per_product=3, seed=seed), list(synth or []))
    paths = generate(data_dir, synth_config, progress=progress)

    train_products, _ = load_catalog(paths["train"])
    heldout, _ = load_catalog(paths["heldout"])
    objectives = ("eclip", "clip")

    def arm_config(objective: str, steps: int):
        return make_train_config(
            preset, objective, catalog=str(paths["train"]), out_dir=str(out / objective), steps=steps,
            warmup_steps=min(default_size.warmup, max(1, steps // 10)), seed=seed, checkpoint_every=max(steps // 2, 1), device=device,
        )

    store = ImageStore(train_products, arm_config("eclip", steps).model.vision.image_size)  # decoded once, shared by both runs
    plan = None
    if sized:
        # decoded now rather than during the probe's steps, which would time the decoding
        # that the run does once as if every step did it
        store.preload(progress)
        step_seconds, eval_seconds = {}, 0.0
        with tempfile.TemporaryDirectory(prefix="eclip-demo-probe-") as scratch:
            for objective in objectives:
                step_seconds[objective], probe_model = measure_step_seconds(arm_config(objective, steps), store, Path(scratch) / objective)
                eval_seconds = max(eval_seconds, measure_eval_seconds(probe_model, heldout))
        plan = plan_steps(time_budget_minutes * 60, time.time() - begin, step_seconds, eval_seconds, steps, math.ceil(MIN_STEP_SHARE * steps))
        logger.info("time budget %g min: a step takes %s, an evaluation %.0f s: %d steps per arm, about %.1f min in all",
                    time_budget_minutes, plan.step_times(), eval_seconds, plan.steps, plan.expected_seconds / 60)
        if not plan.fits:
            logger.warning("this machine needs about %.1f min for the shortest demo that shows the comparison (%d steps per arm), "
                           "over the %g min budget", plan.expected_seconds / 60, plan.steps, time_budget_minutes)
        steps = plan.steps

    runs, histories, results = {}, {}, {}
    for objective in objectives:
        config = arm_config(objective, steps)
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
        "quick": quick, "seed": seed, "steps": steps, "products": products, "synth": list(synth or []), "preset": preset,
        "heldout_products": len(heldout), "seconds": round(time.time() - begin, 1),
        "peak_memory_gib": None if peak is None else round(peak, 2), "device": str(runs["eclip"].device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "time_plan": None if plan is None else {**asdict(plan), "fits": plan.fits},
    }
    memory = "unknown" if peak is None else f"{meta['peak_memory_gib']} GiB"
    atomic_write_text(out / "results.json", json.dumps({**results, "meta": meta}, indent=2))
    eclip_readout = runs["eclip"].config.readout
    synth_note = f", ShopSynth overrides {' '.join(synth)}" if synth else ""
    budget_note = "" if plan is None else (
        f" Steps fitted to a {time_budget_minutes:g}-minute budget from a step timed at start"
        f" ({plan.step_times()}; default {plan.default_steps})."
    )
    report = f"""# eclip demo

ShopSynth catalog of {products} products x 3 listing images (seed {seed}{synth_note}); {len(heldout)} held-out
products never seen in training. ECLIP and the CLIP baseline (same `{preset}` towers, no decoder,
global contrastive objective only) trained with the same data, {steps} steps and seed.{budget_note}

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
