"""The vision tower without gradient on the CPU: the previous path (the whole batch at once, in
PyTorch's default NCHW layout) against the current one (channels-last, a few images at a time:
`eclip.model.towers.base.inference_chunk`), side by side in one run.

eclip-lite's EfficientNet-Lite0 (ImageNet weights from the installed package), random images.
Two workloads: the frozen prefix a feature cache stores (the stem and the first 5 blocks, what
`small_products.py`'s recipe freezes) and the whole tower (evaluation, embedding a catalog).
The ways take turns, `--rounds` times, so a shared machine's load falls on all alike; printed:
images/s (the median round), the ratio to the previous path and the largest difference of the
outputs.

    python benchmarks/cpu_inference.py                   # 320 px, batch 64, 2 threads
    python benchmarks/cpu_inference.py --image-size 224
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the towers come from installed packages

import torch  # noqa: E402

from eclip.model.towers import base, build_vision_tower  # noqa: E402
from eclip.model.towers.timm import TimmVision  # noqa: E402
from eclip.presets import model_preset  # noqa: E402

PREFIX_LAYERS = 6  # the stem and blocks 0-4: eclip-lite with its last 2 stages unfrozen


def previous_prefix(tower: TimmVision, images: torch.Tensor) -> torch.Tensor:
    """The prefix as it ran before: the whole batch, NCHW."""
    m = tower.model
    x = m.bn1(m.conv_stem(tower.renorm(images)))
    for block in m.blocks[: PREFIX_LAYERS - 1]:
        x = block(x)
    return x


def current_prefix(tower: TimmVision, images: torch.Tensor) -> torch.Tensor:
    """The prefix as the feature cache runs it now."""
    return tower.forward_frozen_chunked(images, PREFIX_LAYERS)


def previous_tower(tower: TimmVision, images: torch.Tensor) -> torch.Tensor:
    return tower.model.forward_features(tower.renorm(images))  # timm's own forward: whole batch, NCHW


def current_tower(tower: TimmVision, images: torch.Tensor) -> torch.Tensor:
    features = tower.forward_features_chunked(images)
    h, w = features.grid
    return features.tokens.transpose(1, 2).unflatten(2, (h, w))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = model_preset("eclip-lite")
    config.vision.image_size = args.image_size
    tower = build_vision_tower(config.vision, pretrained=True).eval()
    assert isinstance(tower, TimmVision), type(tower)
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ways = {
        "frozen prefix (feature cache fill)": (previous_prefix, current_prefix),
        "whole tower (evaluation)": (previous_tower, current_tower),
    }
    load_before = os.getloadavg()
    rows = []
    with torch.inference_mode():
        for name, (previous, current) in ways.items():
            difference = (previous(tower, images) - current(tower, images)).abs().max().item()  # also warms up
            seconds: dict[str, list[float]] = {"previous": [], "current": []}
            for _ in range(args.rounds):
                for label, fn in (("previous", previous), ("current", current)):
                    t = time.perf_counter()
                    fn(tower, images)
                    seconds[label].append(time.perf_counter() - t)
            rate = {label: args.batch / statistics.median(s) for label, s in seconds.items()}
            rows.append((name, rate["previous"], rate["current"], difference))
    load_after = os.getloadavg()
    print(f"\n### Vision tower without gradient on the CPU: EfficientNet-Lite0 at {args.image_size} px, batch {args.batch}\n")
    print(f"chunks of {base.inference_chunk(images)} images; torch {torch.__version__}, {args.threads} threads, nproc {os.cpu_count()}; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
          f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}\n")
    print("| workload | previous: whole batch, NCHW (images/s) | current: chunks, channels-last (images/s) | x previous | max abs difference |")
    print("|---|---:|---:|---:|---:|")
    for name, previous, current, difference in rows:
        print(f"| {name} | {previous:.1f} | {current:.1f} | {current / previous:.2f} | {difference:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
