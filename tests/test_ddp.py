"""DistributedDataParallel: 2 CPU processes on the gloo backend end with equal masks."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from compressor import BlockShape, CubicSchedule, MagnitudePruner, PruneGroup, ThresholdSchedule, sparsity_report
from compressor.masking import find_mask
from compressor.selection import RECURRENT_TYPES

from .models import Mixed, batch, loss_fn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = Mixed()
        pruner = MagnitudePruner([
            PruneGroup(ThresholdSchedule(start_itr=1, ramp_itr=5, end_itr=12, freq=2), types=RECURRENT_TYPES,
                       final_sparsity=0.8),
            PruneGroup(CubicSchedule(0.75, start_itr=2, n_steps=3, delta_t=3), block=BlockShape(2, 2)),
        ])
        pruner.prepare(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
        for _ in range(15):
            loss_fn(ddp, *batch(generator)).backward()
            optimizer.step()
            optimizer.zero_grad()
            pruner.step()
        masks = {ref.name: find_mask(ref.module, ref.attr).mask.clone() for ref in pruner.weights}
        final = pruner.finalize()
        report = [r.as_dict() for r in sparsity_report(final)]
        torch.save({"masks": masks, "params": {k: v.detach() for k, v in final.named_parameters()}, "report": report},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_end_with_equal_masks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["masks"].keys() == rank1["masks"].keys() and len(rank0["masks"]) == 19
    for name in rank0["masks"]:
        assert torch.equal(rank0["masks"][name], rank1["masks"][name]), name
        assert not rank0["masks"][name].all(), f"{name} was never pruned"
    # parameters too (BatchNorm running statistics are per-rank between DDP's buffer broadcasts)
    for key in rank0["params"]:
        assert torch.equal(rank0["params"][key], rank1["params"][key]), key
    assert rank0["report"] == rank1["report"]
