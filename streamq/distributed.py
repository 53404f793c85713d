"""Several processes, one per GPU, through torch.distributed (NCCL on GPUs, gloo on the CPU).

Expert parallelism: rank r owns a contiguous range of every MoE layer's routed experts; it reads only their
tensors from the shards, holds only their weights and Hessians, and solves them. Data parallelism: each global
micro-batch of calibration sequences is split evenly across ranks, which run the attention (and every other
token-wise module) on their own slice. At the MoE, the slices' inputs are all-gathered in rank order, so every
rank sees the micro-batch exactly as a single process would, runs its own experts on the tokens routed to them,
and the weighted expert outputs go back to the tokens' ranks by a reduce-scatter. Each (token, top-k slot) has
exactly one owning expert, so that sum only ever adds zeros to one value: it is exact, and the output does not
depend on the number of processes.

Launch: ``streamq run ... --gpus N`` starts N workers of the same command (launch.py); ``torchrun`` can also be
called directly, including its multi-node rendezvous flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist

from streamq.errors import StreamqError

# torch 2.13 renamed these two (the old names warn, once per process, into the live display); the image of the GPU
# machines has 2.11, which may only have the old ones. Same arguments in the same order.
_ALL_GATHER = getattr(torch_dist, "all_gather_single", torch_dist.all_gather_into_tensor)
_REDUCE_SCATTER = getattr(torch_dist, "reduce_scatter_single", torch_dist.reduce_scatter_tensor)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    # The process group the collectives run on (None: the default one). A background thread must not share a
    # group with the main thread: collectives of one group have to be called in the same order on every rank.
    group: Any = field(default=None, compare=False, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def experts(self, n: int) -> range:
        """The routed experts this rank owns: a contiguous share of ``n``."""
        return range(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def owner(self, expert: int, n: int) -> int:
        return next(r for r in range(self.world) if expert < n * (r + 1) // self.world)

    def side(self) -> Dist:
        """The same ranks on a group of their own (gloo, made once; every rank must call this at the same point)
        for a background thread's collectives, which then cannot interleave with the main thread's."""
        if self.world == 1:
            return self
        global _SIDE_GROUP
        if _SIDE_GROUP is None:
            _SIDE_GROUP = torch_dist.new_group(backend="gloo")
        return replace(self, group=_SIDE_GROUP)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (equal shapes) concatenated along dim 0 in rank order."""
        if self.world == 1:
            return t
        out = t.new_empty((self.world * t.shape[0], *t.shape[1:]))
        _ALL_GATHER(out, t.contiguous(), group=self.group)
        return out

    def sum_scatter_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``t``, split along dim 0: this rank's share."""
        if self.world == 1:
            return t
        out = t.new_empty((t.shape[0] // self.world, *t.shape[1:]))
        _REDUCE_SCATTER(out, t.contiguous(), group=self.group)
        return out

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch_dist.all_reduce(t, group=self.group)
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch_dist.broadcast(t, src=0, group=self.group)
        return t

    def broadcast_object(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch_dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier(group=self.group)


SINGLE = Dist()
_SIDE_GROUP: Any = None


def from_environment(device: str) -> tuple[Dist, str]:
    """The process group the launcher (or torchrun) describes in the environment (or a single process), and this
    rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise StreamqError(f"--gpus {world}: this machine has {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not torch_dist.is_initialized():
        # Naming the device binds NCCL's communicator to it up front: without it every barrier warns that it
        # guesses the device, and those warnings break into the live panel.
        options = {"backend": "nccl", "device_id": torch.device(device)} if use_cuda else {"backend": "gloo"}
        # An hour, not the default 10 minutes: the other ranks wait at a barrier while rank 0 measures the output
        # Fisher before the first block (pipeline._output_fisher), minutes at DeepSeek-V3 width.
        torch_dist.init_process_group(**options, timeout=timedelta(hours=1))
    return Dist(rank=torch_dist.get_rank(), world=torch_dist.get_world_size()), device if use_cuda else "cpu"


def shutdown() -> None:
    global _SIDE_GROUP
    _SIDE_GROUP = None
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
