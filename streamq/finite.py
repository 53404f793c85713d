"""NaN and Inf stop the run: in a source weight, in a block's output activations, in a Hessian.

A non-finite value never comes from quantization itself: it is a corrupt checkpoint or a block that overflows
in the compute dtype, and either way the output would be wrong while looking complete. So by default each check
raises a StreamqError naming the tensor and its file (weights) or the block and stage (activations, Hessians);
since config.json and the index are written only at the end, the stopped run leaves nothing that looks finished.
With ``--allow-nonfinite`` (``allow=True``) a non-finite source weight is a warning, and the solvers' fallbacks
take over as they always did (NaN/Inf weights solved as zero, non-finite Hessians rounded to nearest, each counted
as a fallback); the block's error in the report and the summary is then NaN, not left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from streamq.errors import StreamqError
from streamq.io.safetensors_stream import CheckpointReader

WarnFn = Callable[[str], None]
ALLOW_HINT = "rerun with --allow-nonfinite to go on with the solver's fallbacks"


def nonfinite_count(t: torch.Tensor) -> int:
    """How many entries of ``t`` are NaN or Inf. One reduction settles the common, clean case (a sum over
    finite values can overflow, so a non-finite sum is recounted exactly)."""
    if not t.is_floating_point() or torch.isfinite(t.sum(dtype=torch.float32)).item():
        return 0
    return int((~torch.isfinite(t)).sum().item())


def _stop_or_warn(message: str, allow: bool, warn: WarnFn) -> None:
    if not allow:
        raise StreamqError(message)
    warn(message.split("; ")[0] + "; continuing (--allow-nonfinite)")


def check_weights(
    reader: CheckpointReader, tensors: Iterable[tuple[str, torch.Tensor]], allow: bool, warn: WarnFn
) -> None:
    """Source tensors as loaded (FP8 already dequantized), by checkpoint name."""
    for name, tensor in tensors:
        bad = nonfinite_count(tensor)
        if bad:
            info = reader.infos.get(name)
            where = f"{info.file}: tensor {info.name}" if info is not None else f"{reader.dir}: tensor {name}"
            fp8 = info is not None and info.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
            _stop_or_warn(
                f"{where} has {bad} NaN/Inf value(s){' (after FP8 dequantization)' if fp8 else ''}; the checkpoint "
                f"is corrupt: download this shard again, or {ALLOW_HINT}",
                allow,
                warn,
            )


def check_block_weights(reader: CheckpointReader, layer: int, block: nn.Module, allow: bool, warn: WarnFn) -> None:
    """Every parameter of a loaded block (those of other processes' experts stay on the meta device)."""
    prefix = reader.layer_prefix(layer)
    params = ((prefix + name, p.data) for name, p in block.named_parameters() if not p.is_meta)
    check_weights(reader, params, allow, warn)


def check_source_tensors(
    reader: CheckpointReader, names: Sequence[str], device: torch.device, allow: bool, warn: WarnFn
) -> None:
    """Tensors that are copied, not computed with (the head shard, the MTP layers): read once more to check."""
    for name in names:
        if _is_scale(reader, name) or not reader.infos[name].dtype.is_floating_point:
            continue
        fp8 = reader.infos[name].dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        tensor = reader.weight(name, device) if fp8 else reader.raw(name, device)
        check_weights(reader, [(name, tensor)], allow, warn)


def _is_scale(reader: CheckpointReader, name: str) -> bool:
    return name.endswith(("_scale_inv", "_scale")) and name.rsplit("_scale", 1)[0] in reader.infos


def check_activations(y: torch.Tensor, layer: int, stage: str, allow: bool) -> None:
    """A block's output micro-batch ``y``. With ``allow`` nothing is checked: the block's error becomes NaN."""
    bad = 0 if allow else nonfinite_count(y)
    if bad:
        raise StreamqError(
            f"block {layer}, stage {stage}: the block's output has {bad} NaN/Inf value(s) although its weights are "
            f"finite, so it overflows in {str(y.dtype).removeprefix('torch.')}; rerun in a new OUT with --dtype "
            f"float32, or {ALLOW_HINT}"
        )


def check_hessians(hessians: torch.Tensor, keys: Sequence[str], layer: int, allow: bool) -> None:
    """A stack of Hessians [E, n, n] before the solve, ``keys`` naming each. With ``allow`` nothing is checked:
    the solver rounds those matrices to nearest and counts a fallback."""
    if allow or torch.isfinite(hessians.sum(dim=(-2, -1), dtype=torch.float32)).all().item():
        return  # one synchronisation for the clean case; a non-finite sum is recounted exactly below
    for key, h in zip(keys, hessians, strict=True):
        bad = nonfinite_count(h)
        if bad:
            raise StreamqError(
                f"block {layer}, stage solve: the Hessian of {key} has {bad} NaN/Inf value(s) because its inputs "
                f"overflow in the compute dtype; rerun in a new OUT with --dtype float32, or {ALLOW_HINT}"
            )
