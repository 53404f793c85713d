"""Running a block over saved activations: micro-batches, the expert-parallel block forward, propagation.

The quantizer and ``streamq eval`` both move activations from block to block through this module. With several
processes (see distributed.py) every rank holds a slice of each micro-batch and a share of each layer's experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from streamq.distributed import SINGLE, Dist
from streamq.io.activations import ActivationSpec, microbatches, samples_per_batch
from streamq.model.deepseek import Block, MoE
from streamq.resume import crash_point


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def local_spec(spec: ActivationSpec, dist: Dist) -> ActivationSpec:
    """This rank's share of the activations ``spec`` describes."""
    return ActivationSpec(spec.samples // dist.world, spec.seq_len, spec.hidden, spec.dtype)


def batch_samples(spec: ActivationSpec, token_budget: int, dist: Dist = SINGLE) -> int:
    """Sequences per global micro-batch: whole sequences within the token budget, a multiple of the ranks."""
    return max(dist.world, samples_per_batch(spec, token_budget) // dist.world * dist.world)


def rank_batches(spec: ActivationSpec, per_batch: int, dist: Dist) -> list[tuple[int, int]]:
    """This rank's rows of each global micro-batch of ``per_batch`` sequences. Rank r holds slice r of every
    micro-batch, in order, so its rows of batch [g0, g1) are [g0 / world, g1 / world). The micro-batch size is
    fixed when the activations are first written (and kept in the manifest): it decides which sequences meet in
    a micro-batch, hence the order of every sum."""
    return [(g0 // dist.world, g1 // dist.world) for g0, g1 in microbatches(spec.samples, per_batch)]


def rank_slice(global_first: int, global_stop: int, dist: Dist) -> tuple[int, int]:
    """The global sample range of this rank's slice of micro-batch [global_first, global_stop)."""
    share = (global_stop - global_first) // dist.world
    return global_first + dist.rank * share, global_first + (dist.rank + 1) * share


def block_forward(
    block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dist: Dist, experts: Sequence[int]
) -> torch.Tensor:
    """``Block.forward`` (bit for bit with one rank) on this rank's slice ``x``, with the routed experts spread
    over ranks: the MoE input is gathered, each rank fills the slots of its ``experts``, and the slots come back
    to their tokens' ranks summed (exactly: each slot has one owner)."""
    h = x + block.self_attn(block.input_layernorm(x), cos, sin)
    m = block.post_attention_layernorm(h)
    if not isinstance(block.mlp, MoE):
        return h + block.mlp(m)
    local = m.reshape(-1, m.shape[-1])
    everyone = dist.gather_rows(local)
    weights, indices = block.mlp.gate(everyone)
    slots = dist.sum_scatter_rows(block.mlp.expert_slots(everyone, weights, indices, experts))
    return h + block.mlp.combine(local, slots).view(m.shape)


class ActivationSource(Protocol):
    """Where a block's input is read from: the disk (io.activations.ActivationReader) or the device
    (resident.ResidentActivations)."""

    def read(self, first: int, stop: int) -> torch.Tensor: ...

    def close(self) -> None: ...


class ActivationSink(Protocol):
    """Where a block's output goes: a file (io.activations.ActivationWriter) or the device (resident.py)."""

    def write(self, first: int, values: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class BlockInputs:
    """A block's saved input on this rank, micro-batch by micro-batch, and the rotary tables it needs."""

    source: ActivationSource
    batches: list[tuple[int, int]]
    cos: torch.Tensor
    sin: torch.Tensor
    device: torch.device

    def read(self, crash: str | None = None) -> Iterator[torch.Tensor]:
        """The micro-batches on the device; ``crash`` names the fault-injection point after each."""
        for first, stop in self.batches:
            yield self.source.read(first, stop).to(self.device)
            if crash:
                crash_point(crash)


def propagate(
    block: Block,
    inputs: BlockInputs,
    writer: ActivationSink,
    dtype: torch.dtype,
    dist: Dist = SINGLE,
    experts: Sequence[int] | None = None,
    check: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run ``block`` over ``inputs`` and write its output (as ``dtype``) to ``writer``, which may hold the inputs
    themselves (each micro-batch is read before its output is written); returns the first micro-batch's output.
    ``experts``: this rank's routed experts (None: all); ``check`` sees each output micro-batch before it is
    written (the run's finiteness guard)."""
    everyone = range(len(block.mlp.experts)) if isinstance(block.mlp, MoE) else range(0)
    first_output = None
    for (first, _), x in zip(inputs.batches, inputs.read(), strict=True):
        y = block_forward(block, x, inputs.cos, inputs.sin, dist, everyone if experts is None else experts)
        if check is not None:
            check(y)
        first_output = y if first_output is None else first_output
        writer.write(first, y.to(dtype))
        crash_point("propagate")
    assert first_output is not None
    return first_output
