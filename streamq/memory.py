"""One device-memory plan per run: the calibration's Hessians and the solver's workspace share one budget.

The expert Hessians of a calibration pass and the solver's working copies never live at the same time as another
block's, but they do coexist with the loaded block: the budget is what is left for the two together, split
between them in a fixed ratio, and the plan is reported at the start of the run.

When a block's MoE input (every calibration token's, with its routing) fits in half of the solver's share, that
half is given to keeping it on the device across the block's calibration passes (block_solve.MoEInputCache), so
that only the first pass reads the block's input and runs its attention. The Hessians' share, hence the number
of passes, does not change; on a smaller device, or with more tokens, nothing is kept.

Before that, the activations between blocks (this rank's share) are kept on the device when they fit in
ACTIVATION_SHARE of the solver's share (resident.py): every pass and the propagation of every block then read them
there instead of through host memory. What is left of the share is the MoE-input cache's to take, by its rule.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from dataclasses import dataclass

import torch

from streamq.errors import StreamqError
from streamq.io.safetensors_stream import SCALE_SUFFIX, CheckpointReader

# Of the budget: 3/8 for the Hessians of one calibration pass, 5/8 for the solver (the shares the two used to
# take of free GPU memory on their own: 30% and 50%).
HESSIAN_SHARE = 0.375
# On a GPU, the budget is this share of the memory free at the start of the run (the rest: the block's weights,
# a micro-batch's activations, the allocator's slack).
CUDA_FREE_SHARE = 0.8
# On a GPU the automatic budget leaves room beside it for the loaded block (its bf16 weights) and that block's
# packed output, kept on the device until the writer copies it (a quarter of the block at 4 bits, half at 8): the
# 80 GB plan of bench/RESULTS.md ran out of memory with a budget that did not count them.
RESIDENT_BLOCKS = 1.5
# On the CPU the Hessians and the solver workspace are host memory, which must stay about one block: the budget
# is this many times the largest block's bf16 size (Hessians 3/4 of a block, at the cost of more passes).
CPU_BLOCKS = 2
# Of the solver's share, at most this much goes to keeping a block's MoE inputs (the solver needs far less than
# its share at DeepSeek-V3's shapes: 32 gate/up experts' weights, Hessians and factors are ~20 GB of 69).
CACHE_SHARE = 0.5
# Of the solver's share, at most this much goes to keeping the activations between blocks on the device. The
# solver works in chunks of experts that fit what is left (solvers/gptq.py): at DeepSeek-V3's shapes on an H200
# (a 48 GiB share) the 28 GiB of one GPU's activations at 2 M tokens leave it 20 GiB, about its 32 experts.
ACTIVATION_SHARE = 0.65
ACTIVATION_MODES = ("auto", "device", "disk")
GIB = 1 << 30


@dataclass(frozen=True)
class MemoryPlan:
    budget: int  # bytes for Hessians and solver together
    hessian_bytes: int  # expert Hessians held during one calibration pass
    solver_bytes: int  # the solver's working memory for one batched call
    solve_batch: int  # experts stacked into one solver call
    cache_bytes: int = 0  # a block's MoE inputs kept across its calibration passes (0: recomputed per pass)
    resident_bytes: int = 0  # the activations between blocks kept on the device (0: read from and written to disk)

    def describe(self) -> str:
        cache = f" + MoE inputs kept {_size(self.cache_bytes)}" if self.cache_bytes else ", MoE inputs not kept"
        kept = f" + activations kept {_size(self.resident_bytes)}" if self.resident_bytes else ""
        return (
            f"memory plan: {_size(self.budget)} = Hessians {_size(self.hessian_bytes)} per pass + "
            f"solver {_size(self.solver_bytes)}{kept}{cache}, {self.solve_batch} experts per solver call"
        )

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def plan_memory(
    device: torch.device,
    block_bytes: int,
    budget: int | None = None,
    hessian_bytes: int | None = None,
    solve_batch: int | None = None,
    moe_input_bytes: int = 0,
    activation_bytes: int = 0,
    activations: str = "auto",
) -> MemoryPlan:
    """The plan from ``budget`` bytes (None: from the device, or on the CPU from ``block_bytes``, the largest
    block's bf16 size); ``hessian_bytes`` and ``solve_batch`` override their part of it; ``moe_input_bytes``: a
    block's MoE inputs and routing for every calibration token (0: the model has no MoE block);
    ``activation_bytes``: this rank's activations at one block boundary, kept on the device by ``activations``:
    "auto" on a GPU when they fit, "device" always (the CPU: host memory), "disk" never."""
    if budget is None:
        budget = _gpu_budget(device, block_bytes) if device.type == "cuda" else CPU_BLOCKS * block_bytes
    hessians = hessian_bytes if hessian_bytes is not None else int(budget * HESSIAN_SHARE)
    solver = budget - int(budget * HESSIAN_SHARE)
    fits = device.type == "cuda" and activation_bytes <= solver * ACTIVATION_SHARE
    resident = activation_bytes if activations == "device" or (activations == "auto" and fits) else 0
    solver = max(solver - resident, 0)
    cache = moe_input_bytes if 0 < moe_input_bytes <= solver * CACHE_SHARE else 0
    batch = solve_batch if solve_batch is not None else (32 if device.type == "cuda" else 4)
    return MemoryPlan(budget, hessians, solver - cache, batch, cache, resident)


def moe_input_bytes(tokens: int, hidden: int, top_k: int, dtype: torch.dtype) -> int:
    """A block's MoE input [tokens, hidden] and routing [tokens, top_k] (int64), as the cache keeps them."""
    return tokens * (hidden * dtype.itemsize + top_k * 8)


def _device_budget(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * CUDA_FREE_SHARE)


def _gpu_budget(device: torch.device, block_bytes: int) -> int:
    """The automatic budget on a GPU: its share of free memory less what one block holds beside the plan."""
    usable, resident = _device_budget(device), int(block_bytes * RESIDENT_BLOCKS)
    if usable <= resident:
        raise StreamqError(
            f"{device}: {_size(usable)} of free memory is usable, but a block and its packed output take "
            f"{_size(resident)}; use a GPU with more free memory or more GPUs (--gpus N)"
        )
    return usable - resident


def largest_block_bytes(reader: CheckpointReader) -> int:
    """The largest decoder block's weights in bf16 (FP8 scales left out, packed Linears at their dense size), from
    the checkpoint's headers."""
    sizes = [
        sum(
            2 * math.prod(reader.shape(n))
            for n in reader.names(reader.layer_prefix(layer)) + sorted(reader.packed)
            if n.startswith(reader.layer_prefix(layer)) and not n.endswith(SCALE_SUFFIX) and _dense(reader, n)
        )
        for layer in range(reader.config.num_hidden_layers)
    ]
    return max(sizes, default=0)


def _dense(reader: CheckpointReader, name: str) -> bool:
    """Not one of a packed Linear's stored tensors (its dense size is counted once, under its weight name)."""
    return name in reader.packed or name.rsplit(".", 1)[0] + ".weight" not in reader.packed


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS: glibc keeps it otherwise, and a long run's RSS creeps upward."""
    libc_name = ctypes.util.find_library("c")
    if libc_name and hasattr(ctypes.CDLL(libc_name), "malloc_trim"):
        ctypes.CDLL(libc_name).malloc_trim(0)


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"
