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



class _TinyHead(torch.nn.Module):
    """(locs (N, 4, 4), scores (N, 4, 2)) from one weight, enough for train_one_epoch to step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, images):
        value = images.mean() * self.weight
        return value.expand(images.shape[0], 4, 4), value.expand(images.shape[0], 4, 2)


class _RankLoss(torch.nn.Module):
    """Loss parts set by rank and call number (NaN on rank 1 at `nan_at_call`), with a graph to the weight."""

    def __init__(self, rank: int, nan_at_call: int | None) -> None:
        super().__init__()
        self.rank, self.nan_at_call, self.calls = rank, nan_at_call, 0

    def forward(self, locs, scores, boxes, labels):
        from model.loss import LossOutput

        self.calls += 1
        graph = locs.sum() * 0
        localization = graph + 1.0 + self.rank
        confidence = graph + 10.0 * (self.rank + 1) * self.calls
        if self.calls == self.nan_at_call and self.rank == 1:
            confidence = confidence * float("nan")
        return LossOutput(confidence + localization, localization, confidence, 1)


def _train_worker(rank: int, port: int, results) -> None:
    from utils.engine import NonFiniteLossError, train_one_epoch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    context = DistributedContext(rank=rank, local_rank=rank, world_size=2)
    model = _TinyHead()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [torch.zeros(0, 4)] * 2,
             [torch.zeros(0, dtype=torch.long)] * 2, [torch.zeros(0, dtype=torch.bool)] * 2)
    outcomes = []
    for nan_at_call in (None, 2):
        logged = []
        try:
            train_one_epoch(model, _RankLoss(rank, nan_at_call), [batch, batch], optimizer, scheduler,
                            torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), epoch=1, global_step=0,
                            total_batches=2, amp_dtype=None, channels_last=False, grad_clip_norm=None,
                            context=context, on_step=logged.append, show_progress=False)
            outcomes.append([(s.loss, s.localization, s.confidence) for s in logged])
        except NonFiniteLossError as error:
            outcomes.append(str(error))
    results[rank] = outcomes
    dist.destroy_process_group()


def test_the_logged_loss_is_the_mean_of_the_ranks_and_a_nan_stops_every_rank():
    results = mp.Manager().dict()
    mp.spawn(_train_worker, args=(_free_port(), results), nprocs=2, join=True)
    (mean_0, nan_0), (mean_1, nan_1) = results[0], results[1]
    # rank 0: (11, 1, 10) then (21, 1, 20); rank 1: (22, 2, 20) then (42, 2, 40). Rank 0's alone was logged.
    assert mean_0 == mean_1 == [(16.5, 1.5, 15.0), (31.5, 1.5, 30.0)]
    assert "loss became nan at epoch 1, step 2" in nan_1
    # rank 0's own loss is finite: it says where the NaN was instead of blaming its own 21.0
    assert "loss became non-finite on another rank at epoch 1, step 2" in nan_0
