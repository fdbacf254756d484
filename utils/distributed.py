"""torch.distributed helpers: set-up from torchrun's environment, rank queries, gathering Python objects."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistributedContext:
    """Join the process group torchrun describes in WORLD_SIZE/RANK/LOCAL_RANK; single process otherwise.

    NCCL for CUDA tensors, gloo for CPU ones: on a GPU both, since the small collectives (stop requests,
    Python objects) use CPU tensors; gloo alone on CPU (so multi-process training also runs, and is
    tested, without a GPU).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = process_group_backend(device_type)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size)


def process_group_backend(device_type: str) -> str:
    """The backend string for `init_process_group`: NCCL alone would refuse the CPU tensors of `any_rank`."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj: Any, context: DistributedContext) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list without distributed training)."""
    if not context.enabled:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, context: DistributedContext) -> Any:
    """Rank 0's `obj` on every rank."""
    if not context.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_mean(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    if not context.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / context.world_size


def broadcast_buffers(module: torch.nn.Module, context: DistributedContext) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP syncs buffers at the start of each training forward, so after the last one every rank holds the
    statistics of its own batch; evaluating then would score each rank's shard with other buffers than
    the checkpoint rank 0 saves.
    """
    if not context.enabled:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def any_rank(flag: bool, context: DistributedContext) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a stop request that reached one rank)."""
    if not context.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
