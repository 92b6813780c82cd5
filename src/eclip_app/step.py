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
from eclip.model import ECLIP, ImageEncoding

from .distributed import any_rank, gather_no_grad, gather_with_grad


@dataclass
class Features:
    """What the objectives read: per image (B, ...) and per title (T, D)."""

    global_embedding: torch.Tensor  # (B, D)
    instances: torch.Tensor | None  # (B, M, D)
    productness: torch.Tensor | None  # (B, M)
    texts: torch.Tensor  # (T, D)

    def map(self, fn) -> Features:
        return Features(*(None if t is None else fn(t) for t in self.astuple()))

    def astuple(self) -> tuple:
        return (self.global_embedding, self.instances, self.productness, self.texts)

    @staticmethod
    def cat(parts: list[Features]) -> Features:
        columns = list(zip(*(p.astuple() for p in parts)))
        return Features(*(None if c[0] is None else torch.cat(c, dim=0) for c in columns))


class FeatureForward(nn.Module):
    """The model's forward as the objectives need it, as one module call, so that DDP (which
    hooks `forward`) and `torch.compile` can wrap it."""

    def __init__(self, model: ECLIP):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor):
        encoding = self.model.encode_image(images)
        texts = self.model.encode_text((token_ids, mask))
        return encoding.global_embedding, encoding.instances, encoding.productness, texts


@dataclass
class StepOutput:
    losses: dict[str, float]
    finite: bool  # False: the loss was NaN or inf on some rank and no gradient was kept


class TrainStep:
    """Computes the losses of a batch and leaves the gradients in `.grad` (already averaged
    over ranks when `forward` is DDP-wrapped)."""

    def __init__(
        self,
        model: ECLIP,
        criterion: ECLIPLoss,
        forward: nn.Module,  # FeatureForward, possibly wrapped by DDP or torch.compile
        device: torch.device,
        accum_steps: int = 1,
        precision: str = "fp32",
    ):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {precision!r} (fp32 or bf16)")
        self.model, self.criterion, self.forward = model, criterion, forward
        self.device = device
        self.accum_steps = accum_steps
        self.precision = precision

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def features(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> Features:
        with self.autocast():
            out = self.forward(images, ids, mask)
        # the objectives run in float32 whatever the towers ran in
        return Features(*out).map(lambda t: t.float())

    def loss(self, local: Features, image_pids: torch.Tensor, text_pids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses over the global batch: gather every rank's features (with gradients)."""
        full = local.map(gather_with_grad)
        encoding = ImageEncoding(full.global_embedding, full.instances, full.productness, None, None, (0, 0))
        return self.criterion(self.model, encoding, full.texts, gather_no_grad(image_pids), gather_no_grad(text_pids))

    def __call__(self, batch: Batch, tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepOutput:
        """`tokens`: the titles already tokenised (the loop does it with the data, off the
        accelerator's critical path); tokenised here when not given."""
        ids, mask = tokens if tokens is not None else self.model.tokenizer(batch.titles)
        images = batch.images.to(self.device, non_blocking=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        image_pids, text_pids = batch.image_pids.to(self.device), batch.text_pids.to(self.device)
        if self.accum_steps == 1:
            losses = self.loss(self.features(images, ids, mask), image_pids, text_pids)
            values, finite = self._read(losses)
            if finite:
                losses["total"].backward()
            return StepOutput(values, finite)
        return self._accumulated(images, ids, mask, image_pids, text_pids)

    def _read(self, losses: dict[str, torch.Tensor]) -> tuple[dict[str, float], bool]:
        """The losses as floats with one device sync (not one per loss), and whether the total
        is finite on every rank."""
        values = dict(zip(losses, torch.stack([v.detach().float() for v in losses.values()]).tolist()))
        return values, not any_rank(not math.isfinite(values["total"]), self.device)

    def _accumulated(self, images, ids, mask, image_pids, text_pids) -> StepOutput:
        chunks = micro_batches(image_pids, text_pids, self.accum_steps)
        # the concatenated micro-batches' order (the same as the batch's when its images are
        # grouped by product, as collate makes them; reordered here in case they are not)
        image_pids = torch.cat([image_pids[i] for i, _ in chunks])
        text_pids = torch.cat([text_pids[t] for _, t in chunks])
        with torch.no_grad():  # pass 1: every micro-batch's features, no graph kept
            cached = [self.features(images[i], ids[t], mask[t]) for i, t in chunks]
            losses = self.loss(Features.cat(cached), image_pids, text_pids)
        values, finite = self._read(losses)
        if not finite:
            return StepOutput(values, False)
        for j, (i, t) in enumerate(chunks):  # pass 2: one micro-batch live at a time
            live = self.features(images[i], ids[t], mask[t])
            parts = cached[:j] + [live] + cached[j + 1 :]
            sync = j == len(chunks) - 1
            no_sync = getattr(self.forward, "no_sync", None)
            with contextlib.nullcontext() if sync or no_sync is None else no_sync():
                self.loss(Features.cat(parts), image_pids, text_pids)["total"].backward()
        # a logit scale enters every pass's loss directly, not through a micro-batch's
        # features: it collected its gradient once per pass
        for param in self.model.logit_scales.parameters():
            if param.grad is not None:
                param.grad /= len(chunks)
        return StepOutput(values, True)


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
