"""torchrun support: process group set-up, rank queries and small collectives.

``torchrun --nproc_per_node=N -m mmf.cli.main train ...`` (or ``torchrun ... $(which mmf) train``)
sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; the trainer then uses NCCL on GPUs and gloo on CPU.
A plain ``mmf train`` is a world of one and touches no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import MMFError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this process created a process group (shutdown destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: str = "auto", group_of_one: bool = False) -> World:
    """Join the torchrun process group if there is one; pick this rank's device.

    ``group_of_one``: under torchrun, create the process group even for a world of one (a one-GPU
    NCCL smoke, or the N = 1 base of a scaling benchmark that should pay the same wrappers)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise MMFError("precision.device = 'cuda' but no CUDA GPU is visible; use --set precision.device=cpu")
    if want_cuda:
        if local >= torch.cuda.device_count():
            raise MMFError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "MASTER_ADDR" in os.environ
    if (size > 1 or (group_of_one and under_torchrun)) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        return World(rank, size, local, dev, owns_group=True)
    return World(rank, size, local, dev)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_object(world: World, obj):
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_mean(world: World, t: torch.Tensor) -> torch.Tensor:
    if world.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world.size
    return t


def all_sum(world: World, t: torch.Tensor) -> torch.Tensor:
    if world.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_flag(world: World, flag: bool) -> bool:
    """True if ``flag`` is set on any rank (so every rank stops at the same step)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def shutdown(world: World) -> None:
    if (world.distributed or world.owns_group) and dist.is_initialized():
        dist.destroy_process_group()
