"""A quantized block's shard: the packed Linears the recipe quantizes, everything else as stored.

Its header is laid out from the checkpoint and the recipe alone, so that every rank can write its own experts'
byte ranges into the one file (rank 0 writes everything that is not a routed expert).

The shard is written, and hashed for the manifest, in a background thread while the block propagates: nothing in
propagation reads it, and at DeepSeek-V3 width writing and hashing ~6 GB would otherwise add ~10 s per block. The
thread's collectives (with several processes) run on a process group of their own (``Dist.side``).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from streamq.distributed import Dist
from streamq.export.checkpoint import Producer, kept_fp8, plan_tensors, stored_dtype, write_shard
from streamq.export.compressed_tensors import packed_layout
from streamq.groups import linear_groups
from streamq.io.safetensors_stream import CheckpointReader
from streamq.io.safetensors_write import TensorSpec
from streamq.model.deepseek import Block
from streamq.recipe import Recipe
from streamq.solve import Solved

_EXPERT_TENSOR = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")


_WRITER = ThreadPoolExecutor(1, thread_name_prefix="streamq-shard")


@dataclass(frozen=True)
class ShardWrite:
    """A shard being written in the background."""

    future: Future[str | None]

    def result(self) -> str | None:
        """Waits for the write; the shard's SHA-256 on rank 0 (None on the other ranks). Re-raises its error."""
        return self.future.result()


def start_block_shard(
    path: Path,
    reader: CheckpointReader,
    layer: int,
    recipe: Recipe,
    solved: Solved,
    block: Block,
    dist: Dist,
    on_write: Callable[[], None],
) -> ShardWrite:
    """Start writing block ``layer``'s shard to ``path``: this rank's part of it (``solved``, ``block``'s changed
    weights, copied now: the block may change after this returns)."""
    plan, owner = _shard_plan(reader, layer, recipe, solved, block, dist)
    side = dist.side()
    copies = _copy_stream(next(block.parameters()).device)

    def write() -> str | None:
        digest = hashlib.sha256()
        with copies:
            write_shard(path, plan, on_write, side, owner, digest)
        return digest.hexdigest() if side.main else None

    return ShardWrite(_WRITER.submit(write))


def _copy_stream(device: torch.device) -> contextlib.AbstractContextManager:
    """On a GPU, the writer thread copies the packed tensors to the host on a stream of its own (the default
    stream is busy with propagation and would make every copy wait for it), after what the main thread has
    queued so far (the solver's last packing)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return torch.cuda.stream(stream)


def _shard_plan(
    reader: CheckpointReader, layer: int, recipe: Recipe, solved: Solved, block: Block, dist: Dist
) -> tuple[dict[str, tuple[TensorSpec, Producer]], Callable[[str], int]]:
    prefix = reader.layer_prefix(layer)
    plan = recipe.plan(reader.config.fp8_block is not None)
    schemes = plan.quantized()
    quantized = {
        prefix + m: packed_layout(*reader.info(f"{prefix}{m}.weight").shape, scheme, scheme.scale_torch_dtype)
        for g in linear_groups(reader.config, layer, recipe)
        for scheme in (schemes[g.family],)
        for m in g.members
    }
    packed = {prefix + module: tensors for module, tensors in solved.packed.items()}
    params = dict(block.named_parameters())
    overrides = {
        prefix + name: params[name].data.to(stored_dtype(reader, prefix + name)).cpu()
        for name in solved.changed
        if prefix + name.removesuffix(".weight") not in quantized and not params[name].is_meta
    }
    tensors = plan_tensors(reader, reader.names(prefix), quantized, packed, kept_fp8(plan), overrides=overrides)
    n = reader.config.n_routed_experts

    def owner(name: str) -> int:
        match = _EXPERT_TENSOR.match(name)
        return dist.owner(int(match[1]), n) if match else 0

    return tensors, owner
