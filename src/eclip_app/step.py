"""One optimisation step's forward and backward, for one process or many.

The contrastive objectives need the whole global batch: every rank gathers the features of
every other rank with their gradients (`distributed.gather_with_grad`), computes the same loss,
and back-propagates into its own slice. Gradient accumulation keeps that property, as
open_clip's `--accum-freq` does (after GradCache, Gao et al. 2021): a first pass without
gradients caches every micro-batch's features, then each micro-batch is run again with
gradients, its cached features swapped for live ones, and the loss over the whole batch
back-propagated. Memory is that of one micro-batch; the loss is that of the full batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from eclip.data import Batch
from eclip.losses import ECLIPLoss
from eclip.model import ECLIP

from .distributed import any_rank, gather_no_grad, gather_with_grad

# the per-image and per-title features of `ECLIP.forward`, in `Features`' field order
ROWS = ("global_embedding", "instances", "productness", "texts", "intra_instances")


@dataclass
class Features:
    """What the objectives read: per image (B, ...), per title (T, D), and the logit scales
    (read in the forward pass: under FSDP the parameters exist whole only there)."""

    global_embedding: torch.Tensor  # (B, D)
    instances: torch.Tensor | None  # (B, M, D)
    productness: torch.Tensor | None  # (B, M)
    texts: torch.Tensor  # (T, D)
    intra_instances: torch.Tensor | None  # (B, M, D): through the intra head, or None
    scales: dict[str, torch.Tensor]

    @staticmethod
    def from_forward(out: dict) -> Features:
        scales = {k.removeprefix("scale_"): v.float() for k, v in out.items() if k.startswith("scale_")}
        rows = [None if out[k] is None else out[k].float() for k in ROWS]
        return Features(*rows, scales=scales)  # the objectives run in float32

    def rows(self) -> tuple:
        return tuple(getattr(self, name) for name in ROWS)

    def gathered(self) -> Features:
        return Features(*(None if t is None else gather_with_grad(t) for t in self.rows()), scales=self.scales)

    @staticmethod
    def cat(parts: list[Features], scales: dict[str, torch.Tensor]) -> Features:
        columns = list(zip(*(p.rows() for p in parts)))
        return Features(*(None if c[0] is None else torch.cat(c, dim=0) for c in columns), scales=scales)


@dataclass
class StepOutput:
    losses: dict[str, float]
    finite: bool  # False: the loss was NaN or inf on some rank and no gradient was kept
    scales: dict[str, float]  # the logit scales this step used


class TrainStep:
    """Computes the losses of a batch and leaves the gradients in `.grad` (already averaged
    over ranks when `forward` is DDP-wrapped)."""

    def __init__(
        self,
        model: ECLIP,
        criterion: ECLIPLoss,
        forward: nn.Module,  # the model, or the model wrapped by DDP / torch.compile
        device: torch.device,
        accum_steps: int = 1,
        precision: str = "fp32",
        frozen_layers: dict[str, int] | None = None,
    ):
        """`frozen_layers`: with a feature cache, {"vision": k, "text": m}: the batch's images
        and the text input are already those towers' outputs after k and m frozen layers."""
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {precision!r} (fp32 or bf16)")
        self.model, self.criterion, self.forward = model, criterion, forward
        self.device = device
        self.accum_steps = accum_steps
        self.precision = precision
        layers = frozen_layers or {}
        self.split = {f"{kind}_frozen_layers": layers[kind] for kind in ("vision", "text") if layers.get(kind)}

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def features(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> Features:
        with self.autocast():
            return Features.from_forward(self.forward(images, ids, mask, **self.split))

    def loss(self, local: Features, image_pids: torch.Tensor, text_pids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses over the global batch: gather every rank's features (with gradients)."""
        full = local.gathered()
        rows = dict(zip(ROWS, full.rows()))
        return self.criterion(rows, gather_no_grad(image_pids), gather_no_grad(text_pids), full.scales)

    def __call__(self, batch: Batch, tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepOutput:
        """`tokens`: the titles already tokenised (the loop does it with the data, off the
        accelerator's critical path); tokenised here when not given."""
        ids, mask = tokens if tokens is not None else self.model.tokenizer(batch.titles)
        images = batch.images.to(self.device, non_blocking=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        image_pids, text_pids = batch.image_pids.to(self.device), batch.text_pids.to(self.device)
        if self.accum_steps == 1:
            features = self.features(images, ids, mask)
            losses = self.loss(features, image_pids, text_pids)
            out = self._read(losses, features.scales)
            if out.finite:
                losses["total"].backward()
            return out
        return self._accumulated(images, ids, mask, image_pids, text_pids)

    def _read(self, losses: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> StepOutput:
        """Losses and scales as floats with one device sync (not one per value), and whether
        the total is finite on every rank."""
        names = [*losses, *(f"scale_{k}" for k in scales)]
        tensors = [*losses.values(), *scales.values()]
        values = dict(zip(names, torch.stack([v.detach().float().reshape(()) for v in tensors]).tolist()))
        finite = not any_rank(not math.isfinite(values["total"]), self.device)
        return StepOutput(
            {k: v for k, v in values.items() if not k.startswith("scale_")},
            finite,
            {k.removeprefix("scale_"): v for k, v in values.items() if k.startswith("scale_")},
        )

    def _accumulated(self, images, ids, mask, image_pids, text_pids) -> StepOutput:
        chunks = micro_batches(image_pids, text_pids, self.accum_steps)
        # the concatenated micro-batches' order (the same as the batch's when its images are
        # grouped by product, as collate makes them; reordered here in case they are not)
        image_pids = torch.cat([image_pids[i] for i, _ in chunks])
        text_pids = torch.cat([text_pids[t] for _, t in chunks])
        with torch.no_grad():  # pass 1: every micro-batch's features, no graph kept
            cached = [self.features(images[i], ids[t], mask[t]) for i, t in chunks]
            losses = self.loss(Features.cat(cached, cached[0].scales), image_pids, text_pids)
        out = self._read(losses, cached[0].scales)
        if not out.finite:
            return out
        for j, (i, t) in enumerate(chunks):  # pass 2: one micro-batch live at a time
            live = self.features(images[i], ids[t], mask[t])
            parts = cached[:j] + [live] + cached[j + 1 :]
            sync = j == len(chunks) - 1
            no_sync = getattr(self.forward, "no_sync", None)
            with contextlib.nullcontext() if sync or no_sync is None else no_sync():
                self.loss(Features.cat(parts, live.scales), image_pids, text_pids)["total"].backward()
        # a logit scale enters every pass's loss directly, not through a micro-batch's
        # features: it collected its gradient once per pass
        for param in self.model.logit_scales.parameters():
            if param.grad is not None:
                param.grad /= len(chunks)
        return out


def micro_batches(image_pids: torch.Tensor, text_pids: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a batch into `n` micro-batches of whole products: (image rows, text rows) each.
    Whole products keep every image next to its title, so the cached and live features of one
    micro-batch always belong together."""
    if n > len(text_pids):
        raise ValueError(f"accum_steps={n} exceeds the {len(text_pids)} products of a rank's batch")
    groups = torch.arange(len(text_pids)).chunk(n)
    out = []
    for g in groups:
        pids = text_pids[g]
        rows = torch.nonzero(torch.isin(image_pids, pids)).squeeze(1)
        out.append((rows, g.to(text_pids.device)))
    return out
