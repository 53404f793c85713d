"""``streamq run``: shards → block → activations → Hessians → solver → packed shards, one block at a time.

For each decoder block: load its weights (FP8 dequantized on the device), calibrate (accumulate Hessians from the
saved input activations), solve (GPTQ, experts batched), write the block's shard, then propagate the activations
through the *quantized* block, so that the next block is calibrated on what it will really see. The manifest is
updated after each block (see resume.py); host memory holds one block's packed weights and one micro-batch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import shutil
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamq.calibrate import (
    ExpertPass,
    Hessians,
    LinearGroup,
    calibration_pass,
    expert_hessian,
    linear_groups,
    plan_passes,
)
from streamq.data import load_token_batches
from streamq.export.checkpoint import (
    copy_side_files,
    plan_tensors,
    shard_name,
    write_config,
    write_index,
    write_shard,
)
from streamq.export.compressed_tensors import pack_linear
from streamq.io.activations import (
    ActivationReader,
    ActivationSpec,
    ActivationWriter,
    dtype_name,
    microbatches,
    samples_per_batch,
)
from streamq.io.safetensors_stream import CheckpointReader
from streamq.model.deepseek import MTP_EXTRAS, Block, MoE, load_block, load_embedding, rope_cos_sin
from streamq.recipe import Recipe
from streamq.resume import OutputDir, crash_point
from streamq.solvers.gptq import gptq_quantize
from streamq.solvers.hessian import hessian_weighted_error
from streamq.solvers.rtn import rtn_quantize
from streamq.solvers.scheme import QuantResult
from streamq.tui import Reporter

REPORT_NAME = "streamq_report.json"
ERROR_SAMPLE = 2  # matrices per solver call whose Hessian-weighted error is reported
HEAD = "head"


@dataclass(frozen=True)
class RunOptions:
    """How to run, not what to compute: none of these change the output bytes (except dtype)."""

    device: str = "auto"  # "auto": the GPU when there is one
    dtype: str = "bfloat16"  # compute and activation dtype
    token_budget: int = 32768  # tokens per forward micro-batch
    hessian_budget: int | None = None  # bytes of expert Hessians per calibration pass; None: automatic
    solve_batch: int | None = None  # experts stacked into one solver call; None: 16 on a GPU, 4 on the CPU


@dataclass
class BlockReport:
    layer: int
    kind: str
    seconds: dict[str, float] = field(default_factory=dict)
    rel_error: float | None = None
    hessian_error: float | None = None
    tokens_routed: dict[str, float] | None = None
    tokens_hessian: dict[str, float] | None = None
    fallbacks: dict[str, int] = field(default_factory=dict)
    quantized_linears: int = 0


@dataclass
class _Solved:
    """A block's solver output: packed tensors per module, and weights to put in before propagating."""

    packed: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: list[float] = field(default_factory=list)
    fallbacks: dict[str, int] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(model_dir: Path, out: Path, recipe: Recipe, options: RunOptions, reporter: Reporter) -> Path:
    reader = CheckpointReader(model_dir)
    cfg = reader.config
    config_sha = hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()
    total_shards = 1 + cfg.num_layers_with_mtp
    output = OutputDir.open(out, recipe, config_sha, total_shards)
    if output.manifest.complete:
        reporter.warning(f"{out} is already complete; nothing to do")
        return Path(out)
    device, dtype = resolve_device(options.device), getattr(torch, options.dtype)
    reporter.run_start(
        model=str(model_dir),
        out=str(out),
        total_blocks=cfg.num_hidden_layers,
        experts_per_block=cfg.n_routed_experts,
        calib_tokens=recipe.data.num_tokens,
        recipe=recipe.to_dict(),
    )
    if HEAD not in output.manifest.shards:
        _start(reader, output, recipe, device, dtype, reporter, Path(model_dir))
    for layer in range(cfg.num_hidden_layers):
        if layer < output.manifest.next_layer:
            reporter.block_skipped(layer)
            continue
        _quantize_block(reader, output, recipe, options, layer, device, dtype, reporter)
    _finish(reader, output, recipe, Path(model_dir))
    return Path(out)


# -- the start: head shard and the first activations ------------------------------------------------------------


def _start(
    reader: CheckpointReader,
    output: OutputDir,
    recipe: Recipe,
    device: torch.device,
    dtype: torch.dtype,
    reporter: Reporter,
    model_dir: Path,
) -> None:
    cfg, manifest = reader.config, output.manifest
    tokens = load_token_batches(recipe.data, model_dir, warn=reporter.warning)
    spec = ActivationSpec(tokens.shape[0], tokens.shape[1], cfg.hidden_size, dtype_name(dtype))
    names = [n for n in reader.names() if not n.startswith("model.layers.")]
    file = shard_name(0, manifest.total_shards)
    write_shard(output.path / file, plan_tensors(reader, names, {}, keep_fp8=False), lambda: crash_point("write"))
    embedding = load_embedding(reader, device, dtype)
    writer = ActivationWriter(output.activation_path(0), spec)
    for first, stop in microbatches(spec.samples, samples_per_batch(spec, 1 << 16)):
        writer.write(first, embedding(tokens[first:stop].to(device)))
    writer.commit()
    output.record_shard(HEAD, file)
    manifest.next_layer = 0
    manifest.activations = output.activation_path(0).name
    manifest.activation_spec = spec
    output.save()


# -- one block --------------------------------------------------------------------------------------------------


@contextmanager
def _stage(report: BlockReport, name: str, reporter: Reporter) -> Iterator[None]:
    reporter.stage(report.layer, name)
    start = time.perf_counter()
    yield
    report.seconds[name] = report.seconds.get(name, 0.0) + time.perf_counter() - start


def _quantize_block(
    reader: CheckpointReader,
    output: OutputDir,
    recipe: Recipe,
    options: RunOptions,
    layer: int,
    device: torch.device,
    dtype: torch.dtype,
    reporter: Reporter,
) -> None:
    cfg, manifest = reader.config, output.manifest
    spec = manifest.activation_spec
    assert spec is not None and manifest.activations is not None
    report = BlockReport(layer, "moe" if cfg.is_moe_layer(layer) else "dense")
    with _stage(report, "load", reporter):
        block = load_block(reader, layer, device, dtype)
        acts = ActivationReader(output.work / manifest.activations, spec)
        batches = microbatches(spec.samples, samples_per_batch(spec, options.token_budget))
        cos, sin = rope_cos_sin(cfg, spec.seq_len, device)
        reference = block(acts.read(*batches[0]).to(device), cos, sin).float().cpu()
    groups = linear_groups(cfg, layer, recipe)
    solved = _calibrate_and_solve(block, groups, acts, batches, cos, sin, recipe, options, report, reporter)
    with _stage(report, "write", reporter):
        file = shard_name(1 + layer, manifest.total_shards)
        names = [n for n in reader.names(reader.layer_prefix(layer))]
        prefix = reader.layer_prefix(layer)
        packed = {prefix + module: tensors for module, tensors in solved.packed.items()}
        plan = plan_tensors(reader, names, packed, keep_fp8=recipe.unquantized == "fp8" and bool(cfg.fp8_block))
        write_shard(output.path / file, plan, lambda: crash_point("write"))
    with _stage(report, "propagate", reporter):
        _put_weights(block, solved.weights)
        next_path = output.activation_path(layer + 1)
        writer = ActivationWriter(next_path, spec)
        for i, (first, stop) in enumerate(batches):
            y = block(acts.read(first, stop).to(device), cos, sin)
            if i == 0:
                report.rel_error = _rel_error(y.float().cpu(), reference)
            writer.write(first, y.to(dtype))
            crash_point("propagate")
        writer.commit()
    acts.close()
    old = output.work / manifest.activations
    output.record_shard(f"layer.{layer}", file)
    manifest.next_layer = layer + 1
    manifest.activations = next_path.name
    report.hessian_error = statistics.fmean(solved.errors) if solved.errors else None
    report.fallbacks = solved.fallbacks
    report.quantized_linears = len(solved.packed)
    output.timings_path(f"layer.{layer}").write_text(json.dumps(report.__dict__, sort_keys=True))
    output.save()
    old.unlink(missing_ok=True)
    crash_point("block-done")
    release_host_memory()
    reporter.block_done(layer, rel_error=report.rel_error if report.rel_error is not None else float("nan"))


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS: glibc keeps it otherwise, and a long run's RSS creeps upward."""
    libc_name = ctypes.util.find_library("c")
    if libc_name and hasattr(ctypes.CDLL(libc_name), "malloc_trim"):
        ctypes.CDLL(libc_name).malloc_trim(0)


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def _put_weights(block: Block, weights: dict[str, torch.Tensor]) -> None:
    modules = dict(block.named_modules())
    for name, weight in weights.items():
        modules[name].weight.data = weight.to(modules[name].weight.dtype)


# -- calibrate + solve ----------------------------------------------------------------------------------------


def _calibrate_and_solve(
    block: Block,
    groups: list[LinearGroup],
    acts: ActivationReader,
    batches: list[tuple[int, int]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    recipe: Recipe,
    options: RunOptions,
    report: BlockReport,
    reporter: Reporter,
) -> _Solved:
    solved = _Solved()
    if not groups:
        return solved
    if recipe.method == "rtn":
        with _stage(report, "solve", reporter):
            _solve(block, groups, None, set(), recipe, options, solved, report, reporter)
        return solved
    moe = block.mlp if isinstance(block.mlp, MoE) else None
    n_experts = len(moe.experts) if moe else 0
    dense_groups = [g for g in groups if g.expert is None]
    device = cos.device
    hessians = Hessians()
    counts = torch.zeros(n_experts, dtype=torch.int64, device=device)
    hybrid = moe is not None and recipe.calibration == "hybrid"
    all_tokens = set(range(n_experts)) if recipe.calibration == "all" else set()
    if hybrid:
        # Which experts are starved is known only once every token has been routed: a first pass counts, and
        # takes the non-expert Hessians on the way.
        with _stage(report, "calibrate", reporter):
            calibration_pass(
                block,
                _read(acts, batches, device),
                cos,
                sin,
                ExpertPass((), (), True),
                dense_groups,
                hessians,
                counts,
                recipe.tie_gate_up,
                moe_input=True,
            )
        all_tokens = {e for e in range(n_experts) if counts[e].item() < recipe.min_tokens}
        with _stage(report, "solve", reporter):
            _solve(block, dense_groups, hessians, set(), recipe, options, solved, report, reporter)
    sizes = _hessian_bytes(block) if moe is not None else (0, 0)
    passes = plan_passes(
        n_experts, all_tokens, *sizes, _budget(options, block, device), bool(dense_groups) and not hybrid
    )
    for i, expert_pass in enumerate(passes):
        first = i == 0 and not hybrid
        with _stage(report, "calibrate", reporter):
            calibration_pass(
                block,
                _read(acts, batches, device),
                cos,
                sin,
                expert_pass,
                dense_groups,
                hessians,
                counts if first else None,
                recipe.tie_gate_up,
                moe_input=first and bool(all_tokens),
            )
        members = set(expert_pass.routed) | set(expert_pass.all_tokens)
        chosen = [g for g in groups if g.expert in members or (g.expert is None and expert_pass.dense_hooks)]
        with _stage(report, "solve", reporter):
            _solve(block, chosen, hessians, all_tokens, recipe, options, solved, report, reporter)
        for group in chosen:
            hessians.pop(group.key)
        if moe is not None:
            reporter.experts(report.layer, _count_solved(solved), n_experts)
    if moe is not None:
        routed = counts.tolist()
        reporter.expert_tokens(report.layer, routed)
        report.tokens_routed = _summary(routed)
        total = sum(routed) // max(block.mlp.cfg.num_experts_per_tok, 1)
        report.tokens_hessian = _summary([total if e in all_tokens else routed[e] for e in range(len(routed))])
    return solved


def _read(acts: ActivationReader, batches: list[tuple[int, int]], device: torch.device) -> Iterator[torch.Tensor]:
    for first, stop in batches:
        yield acts.read(first, stop).to(device)
        crash_point("calibrate")


def _hessian_bytes(block: Block) -> tuple[int, int]:
    """Bytes of one routed expert's Hessians: from routed tokens (gate/up + down) and in all-token mode (down
    only: gate/up share the MoE input's)."""
    assert isinstance(block.mlp, MoE)
    expert = block.mlp.experts[0]
    hidden, inter = expert.gate_proj.in_features, expert.down_proj.in_features
    return 4 * (hidden * hidden + inter * inter), 4 * inter * inter


def _budget(options: RunOptions, block: Block, device: torch.device) -> int:
    if options.hessian_budget is not None:
        return options.hessian_budget
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.3)
    # On the CPU the Hessians are host memory: keep them within one block's bf16 size (routed experts' Hessians
    # outweigh their weights 2.5 to 1 at DeepSeek-V3's shapes), at the cost of more passes.
    return 2 * sum(p.numel() for p in block.parameters())


def _solve_batch(options: RunOptions, block: Block) -> int:
    if options.solve_batch is not None:
        return options.solve_batch
    # On the CPU the solver's workspace is host memory, which must stay about one block.
    return 16 if next(block.parameters()).is_cuda else 4


def _count_solved(solved: _Solved) -> int:
    return len({m.split(".")[2] for m in solved.packed if m.startswith("mlp.experts.")})


def _summary(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# -- the solver, batched over experts -------------------------------------------------------------------------


def _solve(
    block: Block,
    groups: Sequence[LinearGroup],
    hessians: Hessians | None,
    all_tokens: set[int],
    recipe: Recipe,
    options: RunOptions,
    solved: _Solved,
    report: BlockReport,
    reporter: Reporter,
) -> None:
    """Solve ``groups``; groups of the same shape (the experts) are stacked into batched solver calls."""
    modules = dict(block.named_modules())
    by_shape: dict[tuple[int, ...], list[LinearGroup]] = {}
    for group in groups:
        shape = (*tuple(modules[m].weight.shape[0] for m in group.members), modules[group.members[0]].weight.shape[1])
        by_shape.setdefault((*shape, group.expert is None), []).append(group)
    for same in by_shape.values():
        step = _solve_batch(options, block) if same[0].expert is not None else 1
        for start in range(0, len(same), step):
            chunk = same[start : start + step]
            _solve_stack(modules, chunk, hessians, all_tokens, recipe, solved, report, reporter)


def _solve_stack(
    modules: dict[str, torch.nn.Module],
    groups: Sequence[LinearGroup],
    hessians: Hessians | None,
    all_tokens: set[int],
    recipe: Recipe,
    solved: _Solved,
    report: BlockReport,
    reporter: Reporter,
) -> None:
    weights = torch.stack([torch.cat([modules[m].weight for m in g.members]) for g in groups]).float()
    device = weights.device
    if hessians is None:
        result = rtn_quantize(weights, recipe.solver)
    else:
        dim = weights.shape[-1]
        hs = torch.stack([expert_hessian(hessians, g, g.expert in all_tokens, dim, device)[0] for g in groups])
        result = gptq_quantize(weights, hs, recipe.solver)
        # A sample of the stack: the exact error costs as much as the solve itself (out · in² flops in float64).
        k = min(len(groups), ERROR_SAMPLE)
        solved.errors += hessian_weighted_error(weights[:k], result.weight[:k], hs[:k]).flatten().tolist()
    crash_point("solve")
    for reason, n in result.fallbacks.items():
        if n:
            solved.fallbacks[reason] = solved.fallbacks.get(reason, 0) + n
            reporter.fallback(report.layer, groups[0].key if len(groups) == 1 else f"{len(groups)} experts", reason)
    for i, group in enumerate(groups):
        row = 0
        for member in group.members:
            rows = modules[member].weight.shape[0]
            part = _select(result, i, row, row + rows)
            solved.packed[member] = {
                k: v.cpu() for k, v in pack_linear(part, recipe.scheme, recipe.scheme.scale_torch_dtype).items()
            }
            if group.expert is None:
                # Attention and shared/dense MLP weights change every expert's input: they go in only after
                # all expert Hessians are collected. An expert's own weights affect nothing else.
                solved.weights[member] = part.weight
            else:
                modules[member].weight.data = part.weight.to(modules[member].weight.dtype)
            row += rows


def _select(result: QuantResult, expert: int, first: int, stop: int) -> QuantResult:
    """One expert's rows [first, stop) of a batched result."""

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[expert, first:stop]

    return QuantResult(
        q=pick(result.q),
        scale=pick(result.scale),
        zero_point=pick(result.zero_point),
        g_idx=None if result.g_idx is None else result.g_idx[expert],
        weight=pick(result.weight),
    )


# -- the end: MTP layers, index, config, report ------------------------------------------------------------------


def _finish(reader: CheckpointReader, output: OutputDir, recipe: Recipe, model_dir: Path) -> None:
    cfg, manifest = reader.config, output.manifest
    for layer in range(cfg.num_hidden_layers, cfg.num_layers_with_mtp):
        key = f"layer.{layer}"
        if key in manifest.shards:
            continue
        # The MTP layer is copied unquantized (bf16): it is not part of the decoder the config describes.
        file = shard_name(1 + layer, manifest.total_shards)
        names = reader.names(reader.layer_prefix(layer))
        write_shard(output.path / file, plan_tensors(reader, names, {}, keep_fp8=False), lambda: crash_point("write"))
        output.record_shard(key, file)
        output.save()
    write_index(output.path, [r.file for r in manifest.shards.values()])
    write_config(output.path, reader, recipe)
    copy_side_files(model_dir, output.path)
    _write_report(output, cfg.num_hidden_layers)
    manifest.complete = True
    manifest.activations = None
    output.save()
    shutil.rmtree(output.work, ignore_errors=True)


def _write_report(output: OutputDir, layers: int) -> None:
    blocks = []
    for layer in range(layers):
        path = output.timings_path(f"layer.{layer}")
        if path.is_file():
            blocks.append(json.loads(path.read_text()))
    (output.path / REPORT_NAME).write_text(json.dumps({"blocks": blocks}, indent=2) + "\n")


__all__ = ["MTP_EXTRAS", "RunOptions", "resolve_device", "run"]
