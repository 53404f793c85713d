"""``streamq run``: shards → block → activations → Hessians → solver → packed shards, one block at a time.

For each decoder block: load its weights (FP8 dequantized on the device), calibrate (accumulate Hessians from the
saved input activations), solve (GPTQ, experts batched), write the block's shard, then propagate the activations
through the *quantized* block, so that the next block is calibrated on what it will really see. The manifest is
updated after each block (see resume.py); host memory holds one block's packed weights and one micro-batch.

With several processes (see distributed.py) every rank runs this same loop on its slice of the calibration
sequences and its share of each layer's experts; rank 0 also owns everything that is not a routed expert (the
non-expert solves, the manifest, the report). The output is the same, byte for byte, for any number of ranks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import re
import shutil
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamq.calibrate import (
    MOE_INPUT,
    ExpertPass,
    Hessians,
    LinearGroup,
    calibration_pass,
    expert_hessian,
    linear_groups,
    plan_passes,
)
from streamq.data import load_token_batches
from streamq.distributed import SINGLE, Dist
from streamq.errors import StreamqError
from streamq.export.checkpoint import (
    FP8_DTYPES,
    copy_side_files,
    plan_tensors,
    shard_name,
    write_config,
    write_index,
    write_shard,
)
from streamq.export.compressed_tensors import pack_linear, packed_layout
from streamq.io.activations import ActivationReader, ActivationSpec, ActivationWriter, dtype_name, microbatches
from streamq.io.safetensors_stream import CheckpointReader
from streamq.model.deepseek import Block, MoE, load_block, load_embedding, rope_cos_sin
from streamq.recipe import Recipe
from streamq.resume import OutputDir, crash_point
from streamq.smooth import BlockAWQ, fold_sites
from streamq.solvers.awq import activation_rms
from streamq.solvers.gptq import gptq_quantize
from streamq.solvers.hessian import hessian_weighted_error
from streamq.solvers.rtn import rtn_quantize
from streamq.solvers.scheme import QuantResult
from streamq.tui import Reporter

REPORT_NAME = "streamq_report.json"
HEAD = "head"
# The Hessian-weighted error costs as much as the solve (out · in² flops in float64): the report samples every
# ERROR_EVERY-th expert (and every non-expert group), a choice that does not depend on how solves are batched.
ERROR_EVERY = 8
_EXPERT_TENSOR = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")


@dataclass(frozen=True)
class RunOptions:
    """How to run, not what to compute: none of these change the output bytes (except dtype)."""

    device: str = "auto"  # "auto": the GPU when there is one
    dtype: str = "bfloat16"  # compute and activation dtype
    token_budget: int = 32768  # tokens per forward micro-batch (over all ranks)
    hessian_budget: int | None = None  # bytes of expert Hessians per calibration pass; None: automatic
    solve_batch: int | None = None  # experts stacked into one solver call; None: 32 on a GPU, 4 on the CPU


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


@dataclass(frozen=True)
class _Run:
    """Everything one block's work needs, fixed for the run."""

    reader: CheckpointReader
    output: OutputDir
    recipe: Recipe
    options: RunOptions
    device: torch.device
    dtype: torch.dtype
    reporter: Reporter
    dist: Dist
    model_dir: Path

    def stage(self, report: BlockReport, name: str):
        return _stage(report, name, self.reporter)


@dataclass
class _Solved:
    """A block's solver output: packed tensors per module, and weights to put in before propagating."""

    packed: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)  # sampled Hessian-weighted errors by group key
    changed: list[str] = field(default_factory=list)  # unquantized parameters changed by folding AWQ scales
    fallbacks: dict[str, int] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(
    model_dir: Path, out: Path, recipe: Recipe, options: RunOptions, reporter: Reporter, dist: Dist = SINGLE
) -> Path:
    reader = CheckpointReader(model_dir)
    cfg = reader.config
    if recipe.data.num_samples % dist.world:
        raise StreamqError(f"--num-samples {recipe.data.num_samples} must be a multiple of the {dist.world} processes")
    config_sha = hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()
    output = _open_output(Path(out), recipe, config_sha, 1 + cfg.num_layers_with_mtp, dist)
    if output.manifest.complete:
        reporter.warning(f"{out} is already complete; nothing to do")
        return Path(out)
    ctx = _Run(
        reader,
        output,
        recipe,
        options,
        resolve_device(options.device),
        getattr(torch, options.dtype),
        reporter,
        dist,
        Path(model_dir),
    )
    reporter.run_start(
        model=str(model_dir),
        out=str(out),
        total_blocks=cfg.num_hidden_layers,
        experts_per_block=cfg.n_routed_experts,
        calib_tokens=recipe.data.num_tokens,
        recipe=recipe.to_dict(),
    )
    if HEAD not in output.manifest.shards:
        _start(ctx)
    for layer in range(cfg.num_hidden_layers):
        if layer < output.manifest.next_layer:
            reporter.block_skipped(layer)
            continue
        _quantize_block(ctx, layer)
    _finish(ctx)
    return Path(out)


def _open_output(out: Path, recipe: Recipe, config_sha: str, total_shards: int, dist: Dist) -> OutputDir:
    """Rank 0 checks or creates OUT; the others follow once it has."""
    output = OutputDir.open(out, recipe, config_sha, total_shards, dist.world) if dist.main else None
    dist.barrier()
    if output is None:
        output = OutputDir.attach(out, dist.world)
    return output


def _save_manifest(ctx: _Run) -> None:
    """Rank 0 writes the manifest; every rank then continues from what it says."""
    if ctx.dist.main:
        ctx.output.save()
    ctx.dist.barrier()
    if not ctx.dist.main:
        ctx.output.reload()


# -- the start: head shard and the first activations ------------------------------------------------------------


def _start(ctx: _Run) -> None:
    reader, output, dist = ctx.reader, ctx.output, ctx.dist
    tokens = load_token_batches(ctx.recipe.data, ctx.model_dir, warn=ctx.reporter.warning)
    spec = ActivationSpec(tokens.shape[0], tokens.shape[1], reader.config.hidden_size, dtype_name(ctx.dtype))
    file = shard_name(0, output.manifest.total_shards)
    if dist.main:
        names = [n for n in reader.names() if not n.startswith("model.layers.")]
        write_shard(output.path / file, plan_tensors(reader, names, {}, {}, keep_fp8=False), _crash_write)
    embedding = load_embedding(reader, ctx.device, ctx.dtype)
    writer = ActivationWriter(output.activation_path(0, dist), _local(spec, dist))
    per_batch = batch_samples(spec, ctx.options.token_budget, dist)
    for first, stop in _batches(spec, per_batch, dist):
        slice_first, slice_stop = _slice_of(first * dist.world, stop * dist.world, dist)
        writer.write(first, embedding(tokens[slice_first:slice_stop].to(ctx.device)))
    writer.commit()
    if dist.main:
        output.record_shard(HEAD, file)
    output.manifest.next_layer = 0
    output.manifest.activations = output.activation_path(0).name
    output.manifest.activation_spec = spec
    output.manifest.batch_samples = per_batch
    _save_manifest(ctx)


def _local(spec: ActivationSpec, dist: Dist) -> ActivationSpec:
    return ActivationSpec(spec.samples // dist.world, spec.seq_len, spec.hidden, spec.dtype)


def batch_samples(spec: ActivationSpec, token_budget: int, dist: Dist) -> int:
    """Sequences per global micro-batch: whole sequences within the token budget, a multiple of the ranks."""
    return max(dist.world, min(spec.samples, token_budget // max(spec.seq_len, 1)) // dist.world * dist.world)


def _batches(spec: ActivationSpec, per_batch: int, dist: Dist) -> list[tuple[int, int]]:
    """This rank's rows of each global micro-batch of ``per_batch`` sequences. Rank r holds slice r of every
    micro-batch, in order, so its rows of batch [g0, g1) are [g0 / world, g1 / world). The micro-batch size is
    fixed when the activations are first written (and kept in the manifest): it decides which sequences meet in
    a micro-batch, hence the order of every sum."""
    return [(g0 // dist.world, g1 // dist.world) for g0, g1 in microbatches(spec.samples, per_batch)]


def _slice_of(global_first: int, global_stop: int, dist: Dist) -> tuple[int, int]:
    """The global sample range of this rank's slice of micro-batch [global_first, global_stop)."""
    share = (global_stop - global_first) // dist.world
    return global_first + dist.rank * share, global_first + (dist.rank + 1) * share


def _crash_write() -> None:
    crash_point("write")


# -- the expert-parallel forward ----------------------------------------------------------------------------------


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


# -- one block --------------------------------------------------------------------------------------------------


@contextmanager
def _stage(report: BlockReport, name: str, reporter: Reporter) -> Iterator[None]:
    reporter.stage(report.layer, name)
    start = time.perf_counter()
    yield
    report.seconds[name] = report.seconds.get(name, 0.0) + time.perf_counter() - start


def _quantize_block(ctx: _Run, layer: int) -> None:
    cfg, output, dist = ctx.reader.config, ctx.output, ctx.dist
    manifest = output.manifest
    spec = manifest.activation_spec
    assert spec is not None and manifest.activations is not None
    report = BlockReport(layer, "moe" if cfg.is_moe_layer(layer) else "dense")
    experts = dist.experts(cfg.n_routed_experts) if cfg.is_moe_layer(layer) else range(0)
    with ctx.stage(report, "load"):
        block = load_block(ctx.reader, layer, ctx.device, ctx.dtype, experts=experts)
        acts = ActivationReader(output.activation_path(layer, dist), _local(spec, dist))
        batches = _batches(spec, manifest.batch_samples or batch_samples(spec, ctx.options.token_budget, dist), dist)
        cos, sin = rope_cos_sin(cfg, spec.seq_len, ctx.device)
        reference = block_forward(block, acts.read(*batches[0]).to(ctx.device), cos, sin, dist, experts).float()
    groups = [g for g in linear_groups(cfg, layer, ctx.recipe) if g.expert is None or g.expert in experts]
    solved = _calibrate_and_solve(ctx, block, groups, acts, batches, cos, sin, report)
    _share_dense_weights(block, groups, solved, dist)
    with ctx.stage(report, "write"):
        _write_block(ctx, layer, solved, block)
    with ctx.stage(report, "propagate"):
        writer = ActivationWriter(output.activation_path(layer + 1, dist), _local(spec, dist))
        for i, (first, stop) in enumerate(batches):
            y = block_forward(block, acts.read(first, stop).to(ctx.device), cos, sin, dist, experts)
            if i == 0:
                report.rel_error = _rel_error(y.float(), reference, dist)
            writer.write(first, y.to(ctx.dtype))
            crash_point("propagate")
        writer.commit()
    acts.close()
    _merge_rank_stats(report, solved, dist)
    _finish_block(ctx, layer, report)


def _merge_rank_stats(report: BlockReport, solved: _Solved, dist: Dist) -> None:
    """The report covers every rank's experts, in an order that does not depend on the number of ranks."""
    errors: dict[str, float] = {}
    fallbacks: dict[str, int] = {}
    linears = 0
    for rank_errors, rank_fallbacks, rank_linears in dist.gather_objects(
        (solved.errors, solved.fallbacks, len(solved.packed))
    ):
        errors.update(rank_errors)
        for reason, n in rank_fallbacks.items():
            fallbacks[reason] = fallbacks.get(reason, 0) + n
        linears += rank_linears
    report.hessian_error = statistics.fmean(errors[k] for k in sorted(errors)) if errors else None
    report.fallbacks = dict(sorted(fallbacks.items()))
    report.quantized_linears = linears


def _finish_block(ctx: _Run, layer: int, report: BlockReport) -> None:
    output, dist, manifest = ctx.output, ctx.dist, ctx.output.manifest
    old = output.activation_path(layer, dist)
    if dist.main:
        output.record_shard(f"layer.{layer}", shard_name(1 + layer, manifest.total_shards))
        output.timings_path(f"layer.{layer}").write_text(json.dumps(report.__dict__, sort_keys=True))
    manifest.next_layer = layer + 1
    manifest.activations = output.activation_path(layer + 1).name
    _save_manifest(ctx)
    old.unlink(missing_ok=True)
    crash_point("block-done")
    release_host_memory()
    ctx.reporter.block_done(layer, rel_error=report.rel_error if report.rel_error is not None else float("nan"))


def _write_block(ctx: _Run, layer: int, solved: _Solved, block: Block) -> None:
    """The block's shard: this rank writes its experts (and rank 0 everything else) into one shared file."""
    reader, recipe, dist = ctx.reader, ctx.recipe, ctx.dist
    prefix = reader.layer_prefix(layer)
    quantized = {
        prefix + member: packed_layout(out, inp, recipe.scheme, recipe.scheme.scale_torch_dtype)
        for member, (out, inp) in _quantized_shapes(reader, layer, recipe).items()
    }
    packed = {prefix + module: tensors for module, tensors in solved.packed.items()}
    keep_fp8 = recipe.unquantized == "fp8" and bool(reader.config.fp8_block)
    params = dict(block.named_parameters())
    overrides = {
        prefix + name: params[name].data.to(_stored(reader, prefix + name)).cpu()
        for name in solved.changed
        if prefix + name.removesuffix(".weight") not in quantized and not params[name].is_meta
    }
    plan = plan_tensors(reader, reader.names(prefix), quantized, packed, keep_fp8, overrides=overrides)
    n = reader.config.n_routed_experts

    def owner(name: str) -> int:
        match = _EXPERT_TENSOR.match(name)
        return dist.owner(int(match[1]), n) if match else 0

    write_shard(
        ctx.output.path / shard_name(1 + layer, ctx.output.manifest.total_shards), plan, _crash_write, dist, owner
    )


def _stored(reader: CheckpointReader, name: str) -> torch.dtype:
    """The dtype a tensor is written in when not quantized: as stored, FP8 dequantized to bf16."""
    dtype = reader.infos[name].dtype
    return torch.bfloat16 if dtype in FP8_DTYPES else dtype


def _quantized_shapes(reader: CheckpointReader, layer: int, recipe: Recipe) -> dict[str, tuple[int, int]]:
    """[out, in] of every Linear the recipe quantizes in this block, whichever rank solves it."""
    prefix = reader.layer_prefix(layer)
    members = [m for g in linear_groups(reader.config, layer, recipe) for m in g.members]
    return {m: tuple(reader.infos[f"{prefix}{m}.weight"].shape) for m in members}


def _share_dense_weights(block: Block, groups: Sequence[LinearGroup], solved: _Solved, dist: Dist) -> None:
    """Rank 0 solved the non-expert groups; every rank needs their quantized weights for the forward."""
    modules = dict(block.named_modules())
    for member in sorted(m for g in groups if g.expert is None for m in g.members):
        weight = solved.weights.get(member)
        if weight is None:
            weight = torch.empty_like(modules[member].weight, dtype=torch.float32)
        modules[member].weight.data = dist.broadcast(weight.float().contiguous()).to(modules[member].weight.dtype)


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS: glibc keeps it otherwise, and a long run's RSS creeps upward."""
    libc_name = ctypes.util.find_library("c")
    if libc_name and hasattr(ctypes.CDLL(libc_name), "malloc_trim"):
        ctypes.CDLL(libc_name).malloc_trim(0)


def _rel_error(y: torch.Tensor, ref: torch.Tensor, dist: Dist) -> float:
    sums = dist.sum(torch.stack([(y - ref).pow(2).sum(), ref.pow(2).sum()]).double())
    return (sums[0].sqrt() / sums[1].sqrt().clamp(min=1e-30)).item()


# -- calibrate + solve ----------------------------------------------------------------------------------------


def _calibrate_and_solve(
    ctx: _Run,
    block: Block,
    groups: list[LinearGroup],
    acts: ActivationReader,
    batches: list[tuple[int, int]],
    cos: torch.Tensor,
    sin: torch.Tensor,
    report: BlockReport,
) -> _Solved:
    recipe, dist = ctx.recipe, ctx.dist
    solved = _Solved()
    mine = [g for g in groups if g.expert is not None or dist.main]
    if not any(linear_groups(ctx.reader.config, report.layer, recipe)):
        return solved
    if recipe.method == "rtn":
        with ctx.stage(report, "solve"):
            _solve(ctx, block, mine, None, set(), solved, report)
        return solved
    moe = block.mlp if isinstance(block.mlp, MoE) else None
    n_experts = len(moe.experts) if moe else 0
    experts = [e for e in range(n_experts) if any(g.expert == e for g in groups)]
    dense_groups = [g for g in groups if g.expert is None]
    hessians = Hessians()
    counts = torch.zeros(n_experts, dtype=torch.int64, device=ctx.device)
    hybrid = moe is not None and recipe.calibration == "hybrid"
    all_tokens = set(experts) if recipe.calibration == "all" else set()
    awq = _block_awq(ctx, block, report.layer, mine) if recipe.method == "awq" else None

    def one_pass(expert_pass: ExpertPass, count: bool, moe_input: bool) -> None:
        with ctx.stage(report, "calibrate"):
            reads = _read(acts, batches, ctx.device)
            calibration_pass(
                block,
                reads,
                cos,
                sin,
                expert_pass,
                dense_groups,
                hessians,
                counts if count else None,
                recipe.tie_gate_up,
                moe_input,
                dist.gather_rows,
                dist.main,
            )

    modules = dict(block.named_modules())

    def hessian(group: LinearGroup) -> torch.Tensor:
        dim = modules[group.members[0]].weight.shape[1]
        return expert_hessian(hessians, group, group.expert in all_tokens, dim, ctx.device)

    if hybrid:
        # Which experts are starved is known only once every token has been routed: a first pass counts, and
        # takes the non-expert Hessians on the way.
        one_pass(ExpertPass((), (), True), count=True, moe_input=True)
        all_tokens = {e for e in experts if counts[e].item() < recipe.min_tokens}
        if awq is None:
            with ctx.stage(report, "solve"):
                _solve(ctx, block, [g for g in dense_groups if dist.main], hessians, set(), solved, report)
    sizes = _hessian_bytes(block, experts) if experts else (0, 0)
    passes = plan_passes(
        len(experts),
        {experts.index(e) for e in all_tokens},
        *sizes,
        _budget(ctx, block),
        bool(dense_groups) and not hybrid,
    )
    passes = _same_count(_renumber(passes, experts), dist)
    for i, expert_pass in enumerate(passes):
        first = i == 0 and not hybrid
        one_pass(expert_pass, count=first, moe_input=first and (recipe.calibration == "all" or awq is not None))
        if awq is not None and awq.mlp_act is None:
            awq.mlp_act = _mlp_input_rms(hessians, block, dense_groups)
        members = set(expert_pass.routed) | set(expert_pass.all_tokens)
        chosen = [g for g in mine if g.expert in members or (g.expert is None and expert_pass.dense_hooks)]
        with ctx.stage(report, "solve"):
            if awq is None:
                _solve(ctx, block, chosen, hessians, all_tokens, solved, report)
            else:
                chunk = [g for g in chosen if g.expert is not None]
                _record_awq(ctx, block, awq.chunk(chunk, hessian), {g.key: g for g in chunk}, solved)
        for group in chosen:
            if awq is None or group.expert is not None:  # AWQ solves the non-expert groups at the end
                hessians.pop(group.key)
        if moe is not None:
            for rank, done in enumerate(dist.gather_objects(_count_solved(solved))):
                ctx.reporter.experts(report.layer, done, len(dist.experts(n_experts)), rank=rank)
    if awq is not None:
        with ctx.stage(report, "solve"):
            finishing = [g for g in mine if g.expert is None]
            _record_awq(ctx, block, awq.finish(finishing, hessian), {g.key: g for g in mine}, solved)
            solved.changed = _share_folds(block, awq, dist)
    if moe is not None:
        _report_tokens(ctx, report, counts, block)
    return solved


def _block_awq(ctx: _Run, block: Block, layer: int, mine: list[LinearGroup]) -> BlockAWQ:
    reader = ctx.reader
    prefix = reader.layer_prefix(layer)

    def stored_dtype(name: str) -> torch.dtype:
        return _stored(reader, prefix + name)

    sites = fold_sites(reader.config, layer, linear_groups(reader.config, layer, ctx.recipe))
    return BlockAWQ(block, sites, mine, ctx.recipe.solver, ctx.dist, stored_dtype)


def _mlp_input_rms(hessians: Hessians, block: Block, dense_groups: list[LinearGroup]) -> torch.Tensor | None:
    """The MLP input's per-channel RMS: the MoE input's Hessian, or a dense MLP's gate/up one (rank 0)."""
    device = next(p for p in block.parameters() if not p.is_meta).device
    hidden = block.post_attention_layernorm.weight.shape[0]
    key = (
        MOE_INPUT
        if isinstance(block.mlp, MoE)
        else next((g.key for g in dense_groups if g.key.startswith("mlp.") and not g.key.endswith("down_proj")), None)
    )
    if key is None or hessians.count(key) == 0:
        return None
    return activation_rms(hessians.mean(key, hidden, device))


def _share_folds(block: Block, awq: BlockAWQ, dist: Dist) -> list[str]:
    """Non-expert tensors changed by folding (norms, router, compensated shared experts): rank 0's values for
    every rank. Returns every changed parameter's name."""
    modules = dict(block.named_parameters())
    shared = sorted(
        name
        for site in awq.sites
        if site.expert is None
        for name in (f"{site.producer}.weight", *(f"{c}.weight" for c in site.compensate))
    )
    for name in shared:
        param = modules[name]
        param.data = dist.broadcast(param.data.float().contiguous()).to(param.dtype)
    return sorted(awq.changed | set(shared))


def _report_tokens(ctx: _Run, report: BlockReport, counts: torch.Tensor, block: Block) -> None:
    """Routed tokens per expert, and the tokens each expert's Hessian saw (the same on every rank)."""
    routed = counts.tolist()
    ctx.reporter.expert_tokens(report.layer, routed)
    report.tokens_routed = _summary(routed)
    total = sum(routed) // max(block.mlp.cfg.num_experts_per_tok, 1)
    mode, floor = ctx.recipe.calibration, ctx.recipe.min_tokens
    fed_all = [mode == "all" or (mode == "hybrid" and n < floor) for n in routed]
    report.tokens_hessian = _summary(
        [total if everything else n for n, everything in zip(routed, fed_all, strict=True)]
    )


def _renumber(passes: list[ExpertPass], experts: list[int]) -> list[ExpertPass]:
    """``plan_passes`` numbers this rank's experts 0..n-1; map them back to the layer's expert indices."""
    return [
        ExpertPass(tuple(experts[i] for i in p.routed), tuple(experts[i] for i in p.all_tokens), p.dense_hooks)
        for p in passes
    ]


def _same_count(passes: list[ExpertPass], dist: Dist) -> list[ExpertPass]:
    """Every rank must take part in every pass (the MoE input is gathered): pad with empty passes."""
    most = max(dist.gather_objects(len(passes)))
    return passes + [ExpertPass((), ())] * (most - len(passes))


def _read(acts: ActivationReader, batches: list[tuple[int, int]], device: torch.device) -> Iterator[torch.Tensor]:
    for first, stop in batches:
        yield acts.read(first, stop).to(device)
        crash_point("calibrate")


def _hessian_bytes(block: Block, experts: Sequence[int]) -> tuple[int, int]:
    """Bytes of one routed expert's Hessians: from routed tokens (gate/up + down) and in all-token mode (down
    only: gate/up share the MoE input's)."""
    assert isinstance(block.mlp, MoE)
    expert = block.mlp.experts[experts[0]]
    hidden, inter = expert.gate_proj.in_features, expert.down_proj.in_features
    return 4 * (hidden * hidden + inter * inter), 4 * inter * inter


def _budget(ctx: _Run, block: Block) -> int:
    if ctx.options.hessian_budget is not None:
        return ctx.options.hessian_budget
    if ctx.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(ctx.device)
        # Memory torch's allocator holds but no tensor uses (the previous block's) is free for the Hessians too;
        # without it the second MoE block took 5 passes instead of 2 (H200, 2.1 M tokens).
        cached = torch.cuda.memory_reserved(ctx.device) - torch.cuda.memory_allocated(ctx.device)
        return int((free + cached) * 0.3)
    # On the CPU the Hessians are host memory: keep them within one block's bf16 size (routed experts' Hessians
    # outweigh their weights 2.5 to 1 at DeepSeek-V3's shapes), at the cost of more passes.
    return 2 * sum(p.numel() for p in block.parameters() if not p.is_meta)


def _solve_batch(ctx: _Run) -> int:
    if ctx.options.solve_batch is not None:
        return ctx.options.solve_batch
    # On the CPU the solver's workspace is host memory, which must stay about one block.
    return 32 if ctx.device.type == "cuda" else 4


def _count_solved(solved: _Solved) -> int:
    return len({m.split(".")[2] for m in solved.packed if m.startswith("mlp.experts.")})


def _summary(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# -- the solver, batched over experts -------------------------------------------------------------------------


def _solve(
    ctx: _Run,
    block: Block,
    groups: Sequence[LinearGroup],
    hessians: Hessians | None,
    all_tokens: set[int],
    solved: _Solved,
    report: BlockReport,
) -> None:
    """Solve ``groups``; groups of the same shape (the experts) are stacked into batched solver calls."""
    modules = dict(block.named_modules())
    by_shape: dict[tuple[int, ...], list[LinearGroup]] = {}
    for group in groups:
        shape = (*(modules[m].weight.shape[0] for m in group.members), modules[group.members[0]].weight.shape[1])
        by_shape.setdefault((*shape, group.expert is None), []).append(group)
    for same in by_shape.values():
        step = _solve_batch(ctx) if same[0].expert is not None else 1
        for start in range(0, len(same), step):
            _solve_stack(ctx, modules, same[start : start + step], hessians, all_tokens, solved, report)


def _solve_stack(
    ctx: _Run,
    modules: dict[str, torch.nn.Module],
    groups: Sequence[LinearGroup],
    hessians: Hessians | None,
    all_tokens: set[int],
    solved: _Solved,
    report: BlockReport,
) -> None:
    recipe = ctx.recipe
    weights = torch.stack([torch.cat([modules[m].weight for m in g.members]) for g in groups]).float()
    if hessians is None:
        result = rtn_quantize(weights, recipe.solver)
    else:
        dim, device = weights.shape[-1], weights.device
        hs = torch.stack([expert_hessian(hessians, g, g.expert in all_tokens, dim, device) for g in groups])
        result = gptq_quantize(weights, hs, recipe.solver)
        sample = [i for i, g in enumerate(groups) if g.expert is None or g.expert % ERROR_EVERY == 0]
        if sample:
            errors = hessian_weighted_error(weights[sample], result.weight[sample], hs[sample]).tolist()
            solved.errors.update({groups[i].key: err for i, err in zip(sample, errors, strict=True)})
    crash_point("solve")
    for reason, n in result.fallbacks.items():
        if n:
            solved.fallbacks[reason] = solved.fallbacks.get(reason, 0) + n
            name = groups[0].key if len(groups) == 1 else f"{len(groups)} experts"
            ctx.reporter.fallback(report.layer, name, reason)
    for i, group in enumerate(groups):
        _record(ctx, modules, group, result, i, solved)


def _record(
    ctx: _Run, modules: dict[str, torch.nn.Module], group: LinearGroup, result: QuantResult, index: int, solved: _Solved
) -> None:
    """Pack the members' rows of entry ``index`` of a batched result, and put the quantized weights in."""
    row = 0
    for member in group.members:
        rows = modules[member].weight.shape[0]
        part = _select(result, index, row, row + rows)
        tensors = pack_linear(part, ctx.recipe.scheme, ctx.recipe.scheme.scale_torch_dtype)
        solved.packed[member] = {k: v.cpu() for k, v in tensors.items()}
        if group.expert is None:
            # Attention and shared/dense MLP weights change every expert's input: they go in only after
            # all expert Hessians are collected. An expert's own weights affect nothing else.
            solved.weights[member] = part.weight
        else:
            modules[member].weight.data = part.weight.to(modules[member].weight.dtype)
        row += rows


def _record_awq(
    ctx: _Run, block: Block, results: dict[str, QuantResult], groups: dict[str, LinearGroup], solved: _Solved
) -> None:
    modules = dict(block.named_modules())
    for key, result in results.items():
        _record(ctx, modules, groups[key], _batch_of_one(result), 0, solved)


def _batch_of_one(result: QuantResult) -> QuantResult:
    def one(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.unsqueeze(0)

    return QuantResult(
        one(result.q),
        one(result.scale),
        one(result.zero_point),
        one(result.g_idx),
        one(result.weight),
        result.fallbacks,
    )


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


def _finish(ctx: _Run) -> None:
    reader, output, dist = ctx.reader, ctx.output, ctx.dist
    cfg, manifest = reader.config, output.manifest
    if dist.main:
        for layer in range(cfg.num_hidden_layers, cfg.num_layers_with_mtp):
            key = f"layer.{layer}"
            if key in manifest.shards:
                continue
            # The MTP layer is copied unquantized (bf16): it is not part of the decoder the config describes.
            file = shard_name(1 + layer, manifest.total_shards)
            names = reader.names(reader.layer_prefix(layer))
            write_shard(output.path / file, plan_tensors(reader, names, {}, {}, keep_fp8=False), _crash_write)
            output.record_shard(key, file)
            output.save()
        write_index(output.path, [r.file for r in manifest.shards.values()])
        write_config(output.path, reader, ctx.recipe)
        copy_side_files(ctx.model_dir, output.path)
        _write_report(output, cfg.num_hidden_layers)
        manifest.complete = True
        manifest.activations = None
        manifest.ranks = None
        output.save()
        shutil.rmtree(output.work, ignore_errors=True)
    dist.barrier()


def _write_report(output: OutputDir, layers: int) -> None:
    blocks = []
    for layer in range(layers):
        path = output.timings_path(f"layer.{layer}")
        if path.is_file():
            blocks.append(json.loads(path.read_text()))
    (output.path / REPORT_NAME).write_text(json.dumps({"blocks": blocks}, indent=2) + "\n")


__all__ = ["RunOptions", "block_forward", "resolve_device", "run"]
