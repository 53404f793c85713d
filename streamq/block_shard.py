"""A quantized block's shard: the packed Linears the recipe quantizes, everything else as stored.

Its header is laid out from the checkpoint and the recipe alone, so that every rank can write its own experts'
byte ranges into the one file (rank 0 writes everything that is not a routed expert).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from streamq.distributed import Dist
from streamq.export.checkpoint import keeps_fp8, plan_tensors, stored_dtype, write_shard
from streamq.export.compressed_tensors import packed_layout
from streamq.groups import linear_groups
from streamq.io.safetensors_stream import CheckpointReader
from streamq.model.deepseek import Block
from streamq.recipe import Recipe
from streamq.solve import Solved

_EXPERT_TENSOR = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")


def write_block_shard(
    path: Path,
    reader: CheckpointReader,
    layer: int,
    recipe: Recipe,
    solved: Solved,
    block: Block,
    dist: Dist,
    on_write: Callable[[], None],
) -> None:
    """Write block ``layer``'s shard to ``path``: this rank's part of it (``solved``, ``block``'s changed weights)."""
    prefix = reader.layer_prefix(layer)
    scheme = recipe.scheme
    members = [m for g in linear_groups(reader.config, layer, recipe) for m in g.members]
    quantized = {
        prefix + m: packed_layout(*reader.info(f"{prefix}{m}.weight").shape, scheme, scheme.scale_torch_dtype)
        for m in members
    }
    packed = {prefix + module: tensors for module, tensors in solved.packed.items()}
    keep_fp8 = keeps_fp8(reader.config, recipe)
    params = dict(block.named_parameters())
    overrides = {
        prefix + name: params[name].data.to(stored_dtype(reader, prefix + name)).cpu()
        for name in solved.changed
        if prefix + name.removesuffix(".weight") not in quantized and not params[name].is_meta
    }
    plan = plan_tensors(reader, reader.names(prefix), quantized, packed, keep_fp8, overrides=overrides)
    n = reader.config.n_routed_experts

    def owner(name: str) -> int:
        match = _EXPERT_TENSOR.match(name)
        return dist.owner(int(match[1]), n) if match else 0

    write_shard(path, plan, on_write, dist, owner)
