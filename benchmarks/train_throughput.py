"""Training throughput: an ECLIP step against open_clip's CLIP step, side by side in one run.

Same towers (open_clip's own ViT and text transformer inside ECLIP), same batch of images,
same precision, same optimiser (AdamW, gradient clipping at 1.0), same hardware. Rows:

- open_clip CLIP: `model(images, texts)` + `open_clip.loss.ClipLoss`, as open_clip_train steps;
- eclip, clip objective: our trainer's step (TrainStep) without the decoder: our overhead alone;
- eclip, K=1: the full ECLIP step (decoder + four objectives), one title per image, as many
  texts as open_clip encodes;
- eclip, K=2: the real P x K batch (two images per product, half as many titles).

    python benchmarks/train_throughput.py                      # CPU here: a small open_clip config
    python benchmarks/train_throughput.py --model ViT-B-16 --image-size 224 --precision bf16 --batch auto
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eclip.config import (
    DecoderConfig,
    LossConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
)
from eclip.data import Batch
from eclip.losses import ECLIPLoss
from eclip.model import ECLIP
from eclip.presets import objective_preset
from eclip_app.step import TrainStep

# A small open_clip config for CPU runs (registered with open_clip under this name).
SMALL_OPEN_CLIP = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s


@dataclass
class Result:
    name: str
    batch: int
    texts: int
    samples_per_s: float
    step_ms: float
    peak_mem_gib: float | None
    tflop_per_step: float | None
    mfu: float | None


def register_small_config() -> str:
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="eclip_bench_"))
    (folder / "eclip-bench-small.json").write_text(json.dumps(SMALL_OPEN_CLIP))
    open_clip.add_model_config(folder)
    return "eclip-bench-small"


def model_config(name: str, image_size: int, context: int, decoder: bool) -> ModelConfig:
    import open_clip

    cfg = open_clip.get_model_config(name)
    return ModelConfig(
        vision=VisionConfig(kind="open_clip", model_name=name, image_size=image_size),
        text=TextConfig(kind="open_clip", model_name=name, context_length=context),
        # the decoder of the `base` preset (16 queries, 6 layers), at the text width
        decoder=DecoderConfig(num_queries=16, depth=6, width=cfg["text_cfg"]["width"], heads=8) if decoder else None,
        embed_dim=cfg["embed_dim"],
    )


def synthetic_batch(batch: int, k: int, image_size: int, context: int, vocab: int, device) -> tuple[Batch, tuple]:
    g = torch.Generator().manual_seed(0)
    products = batch // k
    images = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
    ids = torch.randint(1, vocab - 1, (products, context), generator=g)
    ids[:, -1] = vocab - 1  # an end-of-text token where CLIP pools
    mask = torch.ones_like(ids, dtype=torch.bool)
    pids = torch.arange(products)
    data = Batch(images=images, image_pids=pids.repeat_interleave(k).to(device), titles=[""] * products, text_pids=pids.to(device))
    return data, (ids.to(device), mask.to(device))


def autocast(device: torch.device, precision: str):
    import contextlib

    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def make_open_clip_step(name: str, image_size: int, context: int, batch: int, device, precision: str):
    import open_clip
    from open_clip.loss import ClipLoss

    model = open_clip.create_model(name, force_image_size=image_size, force_context_length=context, device=device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    loss_fn = ClipLoss()
    data, (ids, _) = synthetic_batch(batch, 1, image_size, context, model.vocab_size, device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            image_features, text_features, scale = model(data.images, ids)[:3]
            loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step, batch


def make_eclip_step(name: str, image_size: int, context: int, batch: int, device, precision: str, objective: str, k: int):
    config = model_config(name, image_size, context, decoder=objective == "eclip")
    model = ECLIP(config).to(device)
    model.train()
    loss = ECLIPLoss(objective_preset(objective) if objective == "clip" else LossConfig())
    step_fn = TrainStep(model, loss, model, device, 1, precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    vocab = model.text.text.vocab_size
    data, tokens = synthetic_batch(batch, k, image_size, context, vocab, device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = step_fn(data, tokens)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if out.finite and torch.isfinite(grad_norm):
            optimizer.step()

    return step, batch // k


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(step) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        return float(counter.get_total_flops())
    except Exception:  # a kernel the counter cannot follow: report no MFU rather than guess
        return None


def build_all(rows: dict, batch: int, device) -> dict | None:
    """Every row's step at `batch`, each run twice (warm-up); None when memory runs out."""
    steps = {}
    try:
        for row, make in rows.items():
            steps[row] = make(batch)
            for _ in range(2):
                steps[row][0]()
        sync(device)
        return steps
    except torch.OutOfMemoryError:
        steps.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def measure(steps: dict, batch: int, device, rounds: int, per_round: int, peak: float | None) -> list[Result]:
    """Rows interleaved round by round (a slow moment of the machine hits every row alike);
    each row's time is its median round."""
    times: dict[str, list[float]] = {row: [] for row in steps}
    for _ in range(rounds):
        for row, (step, _) in steps.items():
            sync(device)
            begin = time.perf_counter()
            for _ in range(per_round):
                step()
            sync(device)
            times[row].append((time.perf_counter() - begin) / per_round)
    results = []
    for row, (step, texts) in steps.items():
        seconds = sorted(times[row])[len(times[row]) // 2]
        flops = count_flops(step) if peak else None
        mfu = flops / seconds / peak if (flops and peak) else None
        results.append(Result(row, batch, texts, batch / seconds, seconds * 1000, None, flops / 1e12 if flops else None, mfu))
    return results


def profile_row(make, row: str, batch: int, device, top: int = 25) -> None:
    """Where one row's step spends its time: the ops with the most self time on the device."""
    from torch.profiler import ProfilerActivity, profile

    step, _ = make(batch)
    for _ in range(2):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of '{row}' (2 steps, batch {batch}), by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))
    del step


def peak_memory(rows: dict, batch: int, device) -> dict[str, float]:
    """Each row's peak memory measured alone (the other rows' models freed)."""
    out = {}
    for row, make in rows.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step, _ = make(batch)
        step()
        sync(device)
        out[row] = torch.cuda.max_memory_allocated(device) / 2**30
        del step
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="open_clip model name, or 'small' (a CPU-sized config)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--context", type=int, default=None, help="tokens per text")
    parser.add_argument("--batch", default="64", help="images per step, or 'auto': the largest that fits with every row's model resident")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=3, help="steps per row per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each row's median round is reported")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--profile", action="append", default=[], metavar="ROW",
                        help="after measuring, profile this row's step (e.g. 'eclip, K=1') and print its costliest ops")
    args = parser.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = register_small_config() if args.model == "small" else args.model
    import open_clip

    cfg = open_clip.get_model_config(name)
    image_size = args.image_size or cfg["vision_cfg"]["image_size"]
    context = args.context or cfg["text_cfg"].get("context_length", 77)
    peak = None
    if device.type == "cuda" and args.precision == "bf16":
        card = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in card), None)

    rows = {
        "open_clip CLIP": lambda b: make_open_clip_step(name, image_size, context, b, device, args.precision),
        "eclip, clip objective": lambda b: make_eclip_step(name, image_size, context, b, device, args.precision, "clip", 1),
        "eclip, K=1": lambda b: make_eclip_step(name, image_size, context, b, device, args.precision, "eclip", 1),
        "eclip, K=2": lambda b: make_eclip_step(name, image_size, context, b, device, args.precision, "eclip", 2),
    }
    candidates = (512, 384, 256, 128, 64) if args.batch == "auto" else (int(args.batch),)
    results = None
    for batch in candidates:
        steps = build_all(rows, batch, device)
        if steps is not None:
            try:
                results = measure(steps, batch, device, args.rounds, args.steps, peak)
                break
            except torch.OutOfMemoryError:  # fitted while warming up, not while measuring
                steps = None
                torch.cuda.empty_cache()
        print(f"batch {batch}: out of memory with every row's model resident; trying smaller", flush=True)
    if results is None:
        raise SystemExit("no batch size fits")
    del steps
    if device.type == "cuda":
        for r, mem in zip(results, peak_memory(rows, batch, device).values()):
            r.peak_mem_gib = mem
    base = results[0].samples_per_s
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{card}, open_clip {name}, {image_size} px, {context} tokens, {args.precision}, batch {batch} images, torch {torch.__version__}\n")
    print("| step | images | texts | samples/s | ms/step | vs open_clip | peak GiB | TFLOP/step | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mem = f"{r.peak_mem_gib:.1f}" if r.peak_mem_gib is not None else "-"
        tf = f"{r.tflop_per_step:.2f}" if r.tflop_per_step is not None else "-"
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "-"
        print(f"| {r.name} | {r.batch} | {r.texts} | {r.samples_per_s:.1f} | {r.step_ms:.1f} | {r.samples_per_s / base:.2f} | {mem} | {tf} | {mfu} |")
    for row in args.profile:
        profile_row(rows[row], row, batch, device)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": card, "model": name, "batch": batch, "precision": args.precision,
                                               "rows": [r.__dict__ for r in results]}, indent=2))


if __name__ == "__main__":
    main()
