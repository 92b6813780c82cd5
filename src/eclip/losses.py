"""The pretext objectives: global and instance (inter) image-text contrast, intra-product
instance contrast and productness.

Every objective takes the whole batch (already gathered across ranks where training is
distributed) and product ids, so that two images of one product, or an image and its product's
title, are always positives and never negatives. The criterion reads the features `ECLIP.forward`
returns, never the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import LossConfig, Selection, check_fields
from .model.inference import select_instances


def multi_positive_infonce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row against a uniform target over its positives.

    logits (R, C); positives (R, C) bool. Rows with no positive are left out; entries equal to
    -inf (masked) take no part. Returns the mean over the remaining rows.
    """
    has_positive = positives.any(dim=1)
    if not has_positive.any():
        # a zero that keeps the graph; masked -inf entries must not make it 0 * inf = nan
        return torch.where(torch.isfinite(logits), logits, 0.0).sum() * 0.0
    logits, positives = logits[has_positive], positives[has_positive]
    target = positives.to(logits.dtype)
    target = target / target.sum(dim=1, keepdim=True)
    log_prob = logits.log_softmax(dim=1)
    # masked (-inf) entries have zero target; avoid 0 * -inf = nan
    log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob))
    return -(target * log_prob).sum(dim=1).mean()


def symmetric_infonce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Image-to-text and text-to-image multi-positive InfoNCE, averaged."""
    return 0.5 * (multi_positive_infonce(logits, positives) + multi_positive_infonce(logits.T, positives.T))


def own_text_index(image_pids: torch.Tensor, text_pids: torch.Tensor) -> torch.Tensor:
    """For each image, the column of its product's title, (B,). Every image needs one."""
    match = image_pids[:, None] == text_pids[None, :]
    if not match.any(dim=1).all():
        raise ValueError("every image in the batch needs its product's title among the texts")
    return match.float().argmax(dim=1)


class ECLIPLoss(nn.Module):
    """The weighted objectives of one batch. `selection` and `selection_temperature` are the
    model's (`ModelConfig`): the inter objective scores with the selection inference uses."""

    def __init__(self, config: LossConfig, selection: Selection = "softmax", selection_temperature: float = 0.1):
        super().__init__()
        check_fields(config)  # a config mutated after it was built is caught here
        self.config = config
        self.selection, self.selection_temperature = selection, selection_temperature
        self.instance_ramp = 1.0  # set per step by `set_step` (LossConfig.instance_warmup_steps)

    def set_step(self, step: int) -> None:
        """The training step (1-based) about to be taken: a pure function of it, so a resumed
        run ramps exactly as a straight one."""
        self.instance_ramp = self.config.instance_ramp(step)

    def forward(
        self,
        features: Mapping[str, torch.Tensor | None],  # what `ECLIP.forward` returns, B = P x K images
        image_pids: torch.Tensor,  # (B,) product id of each image (integers)
        text_pids: torch.Tensor,  # (T,) product id of each title, one per product in the batch
        scales: Mapping[str, torch.Tensor] | None = None,  # by name; None: features' scale_* entries
    ) -> dict[str, torch.Tensor]:
        """`features`: global_embedding (B, D), instances (B, M, D) and productness (B, M), None
        for the baseline, texts (T, D), optionally intra_instances (B, M, D), the instances
        the intra objective contrasts; and scale_global, scale_inter, scale_intra unless
        `scales` is given. Returns each objective's loss and their weighted "total"."""
        cfg = self.config
        global_embedding, instances, productness, texts = (
            features["global_embedding"], features.get("instances"), features.get("productness"), features["texts"]
        )
        positives = image_pids[:, None] == text_pids[None, :]  # (B, T)
        if scales is None:
            scales = {k.removeprefix("scale_"): v for k, v in features.items() if k.startswith("scale_")}
        losses: dict[str, torch.Tensor] = {}

        if cfg.global_weight:
            logits = scales["global"] * global_embedding @ texts.T
            losses["global"] = symmetric_infonce(logits, positives)

        needs_decoder = cfg.inter_weight or cfg.intra_weight or cfg.productness_weight
        if needs_decoder:
            if instances is None:
                raise ValueError("the ECLIP objectives need a model with an instance decoder")
            scores, weights = select_instances(instances, texts, self.selection, self.selection_temperature)  # (B, T), (B, T, M)
            own = own_text_index(image_pids, text_pids)
            own_weights = weights[torch.arange(len(own)), own]  # (B, M) selection by own title

            if cfg.inter_weight:
                losses["inter"] = symmetric_infonce(scales["inter"] * scores, positives)
            if cfg.intra_weight:
                selection = own_weights.detach() if cfg.intra_detach_selection else own_weights
                # a model with an intra head (DecoderConfig.intra_head) contrasts its projections
                intra_instances = features.get("intra_instances")
                intra_instances = instances if intra_instances is None else intra_instances
                losses["intra"] = self.intra_product(intra_instances, selection, image_pids, scales["intra"])
            if cfg.productness_weight:
                target = own_weights.detach()
                log_pred = productness.log_softmax(dim=-1)
                losses["productness"] = F.kl_div(log_pred, target, reduction="batchmean")

        ramp = self.instance_ramp
        weights_by_name = {
            "global": cfg.global_weight,
            "inter": cfg.inter_weight * ramp,
            "intra": cfg.intra_weight * ramp,
            "productness": cfg.productness_weight * ramp,
        }
        losses["total"] = sum(weights_by_name[name] * value for name, value in losses.items())
        return losses

    def intra_product(
        self,
        instances: torch.Tensor,  # (B, M, D)
        own_weights: torch.Tensor,  # (B, M)
        image_pids: torch.Tensor,  # (B,)
        scale: torch.Tensor,
    ) -> torch.Tensor:
        b = instances.shape[0]
        eye = torch.eye(b, dtype=torch.bool, device=instances.device)
        same = (image_pids[:, None] == image_pids[None, :]) & ~eye  # other images of the product
        selected = F.normalize(torch.einsum("bm,bmd->bd", own_weights, instances), dim=-1)
        if self.config.intra_mode == "cross_image":
            logits = scale * selected @ selected.T
            logits = logits.masked_fill(eye, float("-inf"))
            return multi_positive_infonce(logits, same)
        # within_image: the selected instance of image i must find, among the queries of a
        # same-product image k, the one that k's title selects.
        sims = scale * torch.einsum("id,kmd->ikm", selected, instances)  # (B, B, M)
        target = own_weights.detach().argmax(dim=-1)  # (B,) selected query of each image
        log_prob = sims.log_softmax(dim=-1)
        picked = log_prob.gather(2, target[None, :, None].expand(b, b, 1)).squeeze(-1)  # (B, B)
        if not same.any():
            return instances.sum() * 0.0
        return -picked[same].mean()
