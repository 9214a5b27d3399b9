"""torch.distributed plumbing: the process group, the device, and a CPU channel for control.

Control decisions and health readings travel over a Gloo group even when training uses NCCL:
exchanging small Python objects there never touches a CUDA stream, so agreeing on "pause at
step 1200" costs no host-device synchronisation in the training step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

#: Ranks agree on control requests every this many steps (and while paused). One small Gloo
#: all-gather per this many steps; a request is applied on every rank at the same step.
CONTROL_SYNC_EVERY = 4
TIMEOUT = timedelta(seconds=int(os.environ.get("TBHEALTH_DIST_TIMEOUT_S", "120")))


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control_group: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, over the CPU (Gloo) group."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control_group)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.control_group)
        return box[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def init_from_env(device_name: str = "auto") -> DistContext:
    """Join the job torchrun started: NCCL on GPUs, Gloo on CPU (``device: cpu`` forces CPU)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        index = local if device_name in ("auto", "cuda") else torch.device(device_name).index or 0
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=TIMEOUT,
                                **({"device_id": device} if use_cuda else {}))
    control = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else dist.group.WORLD
    return DistContext(rank, world, local, device, control)


def shutdown(ctx: DistContext | None = None, clean: bool = True) -> None:
    """Leave the job. After a clean finish, wait for every rank first: a rank that tears its
    connections down while a peer still talks to it makes Gloo abort that peer."""
    if not dist.is_initialized():
        return
    if clean and ctx is not None:
        try:
            dist.barrier(group=ctx.control_group)
        except Exception:
            pass
    dist.destroy_process_group()
