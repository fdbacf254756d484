"""Collectives of utils/distributed.py in a real 2-process gloo group."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.distributed import DistributedContext, any_rank, broadcast_buffers, process_group_backend


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _any_rank_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    context = DistributedContext(rank=rank, local_rank=rank, world_size=2)
    # Only rank 1 got the signal; both must see it, and an unset flag on both stays unset.
    results[rank] = (any_rank(rank == 1, context), any_rank(False, context))
    dist.destroy_process_group()


def test_any_rank_spreads_a_stop_request_to_every_rank():
    results = mp.Manager().dict()
    mp.spawn(_any_rank_worker, args=(_free_port(), results), nprocs=2, join=True)
    assert dict(results) == {0: (True, False), 1: (True, False)}


def test_any_rank_without_distributed_is_the_flag_itself():
    assert any_rank(True, DistributedContext()) is True
    assert any_rank(False, DistributedContext()) is False


def test_a_gpu_process_group_also_takes_the_cpu_tensors_of_the_small_collectives():
    # any_rank and the object collectives reduce CPU tensors, which an NCCL-only group refuses.
    assert process_group_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("cpu") == "gloo"


def _buffers_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    context = DistributedContext(rank=rank, local_rank=rank, world_size=2)
    norm = torch.nn.BatchNorm1d(3)
    norm.train()(torch.randn(8, 3) + rank * 10)  # each rank's statistics from its own batch
    broadcast_buffers(norm, context)
    results[rank] = norm.running_mean.tolist()
    dist.destroy_process_group()


def test_broadcast_buffers_gives_every_rank_rank_0_s_statistics():
    results = mp.Manager().dict()
    mp.spawn(_buffers_worker, args=(_free_port(), results), nprocs=2, join=True)
    assert results[0] == results[1] and max(abs(v) for v in results[0]) < 1
