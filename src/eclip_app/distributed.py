"""Process-group plumbing for `torchrun`: who am I, which device, and gathers that keep the
autograd graph, so that every rank's contrastive losses see the whole global batch.

One process (no `WORLD_SIZE` in the environment) is the degenerate case: every function here
then does nothing, and the trainer needs no branch of its own.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from eclip.devices import resolve_device


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`resolve_device`, with a bare "cuda" meaning this rank's GPU."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Joins the process group that `torchrun` describes in the environment (NCCL on GPUs,
    gloo on CPUs); a plain `python` run stays a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        if target.type == "cuda":
            torch.cuda.set_device(target)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def shutdown_distributed() -> None:
    global _FEATURE_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _FEATURE_GROUP = None


_FEATURE_GROUP: dist.ProcessGroup | None = None


def _feature_group() -> dist.ProcessGroup:
    """A process group of its own for the feature gathers. DDP's gradient all-reduce runs
    asynchronously during the backward pass; on a shared gloo group it could interleave with a
    gather's backward and pair the wrong messages. NCCL orders both on streams, but a second
    communicator costs little."""
    global _FEATURE_GROUP
    if _FEATURE_GROUP is None:
        _FEATURE_GROUP = dist.new_group(backend=dist.get_backend())
    return _FEATURE_GROUP


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # (b, ...) -> (world * b, ...)
        group = _feature_group()
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # every rank holds a gradient for every slice: sum them, keep this rank's slice
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, in rank order, differentiably.

    The backward pass sums the gradients that every rank computed for each slice: since every
    rank computes the same loss over the same gathered batch, a rank's own slice receives
    world_size times its true gradient, which DDP's mean over ranks divides back.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """As `gather_with_grad`, for ids and cached features that need no gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous(), group=_feature_group())
    return torch.cat(parts, dim=0)


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """In-place mean over ranks, one flat buffer for all of them (few collectives)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (so that all ranks skip a step together)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2: every block of every stack (the elements of each `nn.ModuleList`: tower blocks,
    decoder layers) is its own unit, gathered for its forward and backward only; the rest
    (embeddings, heads, queries, logit scales) forms the root unit. In place."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block)
    fully_shard(model)


def parallelize(model: torch.nn.Module, env: DistEnv, fsdp: bool = False, find_unused: bool = False) -> torch.nn.Module:
    """What the step runs forward through: the model itself on one process, DDP on several, or
    the model sharded in place (FSDP2, `fsdp`; several processes only)."""
    if fsdp:
        if not env.distributed:
            raise ValueError("fsdp=true needs several processes (launch with torchrun)")
        shard_model(model)
        return model
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)
