"""``streamq run``: shards → block → activations → Hessians → solver → packed shards, one block at a time.

For each decoder block: load its weights (FP8 dequantized on the device), calibrate and solve (block_solve.py:
Hessians from the saved input activations, handed to the method), write the block's shard (in the background,
see block_shard.py) while propagating the activations through the *quantized* block, so that the next block is
calibrated on what it will really see. The manifest is updated after each block (see resume.py); host memory
holds a few micro-batches and the tensor being written (on a GPU the packed weights stay on the device).

With several processes (see distributed.py) every rank runs this same loop on its slice of the calibration
sequences and its share of each layer's experts; rank 0 also owns everything that is not a routed expert (the
non-expert solves, the manifest, the report). The output is the same, byte for byte, for any number of ranks.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from streamq.block_shard import ShardWrite, start_block_shard
from streamq.block_solve import Calibration, calibrate_and_solve
from streamq.data import load_token_batches
from streamq.distributed import SINGLE, Dist
from streamq.export.checkpoint import (
    copy_side_files,
    plan_tensors,
    shard_name,
    stored_dtype,
    write_config,
    write_index,
    write_shard,
)
from streamq.finite import check_activations, check_block_weights, check_hessians, check_source_tensors
from streamq.fisher import fisher_done, fisher_samples, load_fisher, output_fisher
from streamq.forward import (
    BlockInputs,
    batch_samples,
    block_forward,
    local_spec,
    propagate,
    rank_batches,
    rank_slice,
    resolve_device,
)
from streamq.groups import LinearGroup, Role, linear_groups
from streamq.io.activations import ActivationReader, ActivationSpec, ActivationWriter, dtype_name
from streamq.io.safetensors_stream import CheckpointReader
from streamq.memory import MemoryPlan, largest_block_bytes, moe_input_bytes, plan_memory, release_host_memory
from streamq.methods import make_method
from streamq.model.deepseek import Block, MoE, load_block, load_embedding, rope_cos_sin
from streamq.preflight import Checked, check_before_output, config_sha
from streamq.recipe import Recipe, describe
from streamq.report import (
    BlockReport,
    StageClock,
    merge_rank_stats,
    rel_error,
    report_tokens,
    save_block_report,
    write_report,
)
from streamq.resident import ResidentActivations
from streamq.resume import OutputDir, crash_point
from streamq.smooth import BlockAWQ, fold_sites
from streamq.solve import Solved, Solver, share_dense_weights
from streamq.solvers.gptq import SolveOptions
from streamq.solvers.row_chunks import RowGains, output_metric, row_gains
from streamq.tui import Reporter

HEAD = "head"
_CRASH_WRITE = partial(crash_point, "write")  # between tensors of a shard


@dataclass(frozen=True)
class RunOptions:
    """How to run, not what to compute: none of these change the output bytes (except dtype)."""

    device: str = "auto"  # "auto": the GPU when there is one
    dtype: str = "bfloat16"  # compute and activation dtype
    token_budget: int = 32768  # tokens per forward micro-batch (over all ranks)
    memory_budget: int | None = None  # bytes for Hessians + solver workspace (see memory.py); None: automatic
    hessian_budget: int | None = None  # overrides the plan's bytes of expert Hessians per calibration pass
    solve_batch: int | None = None  # overrides the plan's experts per solver call
    allow_nonfinite: bool = False  # NaN/Inf go to the solvers' fallbacks instead of stopping the run (finite.py)
    activations: str = "auto"  # between blocks: on the device when they fit (auto), always there (device), disk


@dataclass(frozen=True)
class _Run:
    """Everything the block loop needs, fixed for the run."""

    reader: CheckpointReader
    output: OutputDir
    recipe: Recipe
    options: RunOptions
    memory: MemoryPlan
    device: torch.device
    dtype: torch.dtype
    reporter: Reporter
    dist: Dist
    model_dir: Path
    # The activations between blocks when the memory plan keeps them on the device (resident.py).
    resident: ResidentActivations | None = None
    # Manifest updates waiting for their shard's checksum or their activations' file (see _finish_block).
    # Each with whether it can be made without waiting.
    pending: list[tuple[Callable[[], None], Callable[[], bool]]] = field(default_factory=list)


def run(
    model_dir: Path,
    out: Path,
    recipe: Recipe,
    options: RunOptions,
    reporter: Reporter,
    dist: Dist = SINGLE,
    checked: Checked | None = None,
) -> Path:
    """Quantize ``model_dir`` into ``out``; ``checked``: the preflight's result when the caller already ran it."""
    checked = checked or check_before_output(Path(model_dir), Path(out), recipe, dist.world)
    reader = CheckpointReader(model_dir)
    cfg = reader.config
    output = OutputDir.open_together(Path(out), recipe, config_sha(model_dir), 1 + cfg.num_layers_with_mtp, dist)
    if output.manifest.complete:
        reporter.warning(f"{out} is already complete; nothing to do")
        return Path(out)
    device = resolve_device(options.device)
    dtype = getattr(torch, options.dtype)
    has_moe = any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    moe_input = moe_input_bytes(recipe.data.num_tokens, cfg.hidden_size, cfg.num_experts_per_tok, dtype)
    spec = ActivationSpec(recipe.data.num_samples, recipe.data.seq_len, cfg.hidden_size, dtype_name(dtype))
    memory = plan_memory(
        device,
        largest_block_bytes(reader),
        options.memory_budget,
        options.hessian_budget,
        options.solve_batch,
        moe_input if has_moe else 0,
        local_spec(spec, dist).nbytes,
        options.activations,
    )
    resident = ResidentActivations(local_spec(spec, dist), device) if memory.resident_bytes else None
    ctx = _Run(reader, output, recipe, options, memory, device, dtype, reporter, dist, model_dir, resident)
    reporter.run_start(
        model=str(model_dir),
        out=str(out),
        total_blocks=cfg.num_hidden_layers,
        experts_per_block=cfg.n_routed_experts,
        calib_tokens=recipe.data.num_tokens,
        recipe=describe(recipe),
        settings=recipe.to_dict(),
        moe_blocks=[i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)],
        # How this run works, not part of the recipe's digest: shown at the start, kept in the report.
        plan=memory.describe(),
    )
    for message in checked.warnings:
        reporter.warning(message)
    if HEAD not in output.manifest.shards:
        _start(ctx, checked.tokens)
    _output_fisher(ctx, checked.tokens)
    for layer in range(cfg.num_hidden_layers):
        if layer < output.manifest.next_layer:
            reporter.block_skipped(layer)
            continue
        _quantize_block(ctx, layer)
    _finish(ctx)
    if resident is not None:
        resident.shutdown()
    return Path(out)


def _start(ctx: _Run, tokens: torch.Tensor | None) -> None:
    """The head shard (embedding, norm, lm_head) and the embedding's output: block 0's input."""
    reader, output, dist = ctx.reader, ctx.output, ctx.dist
    if tokens is None:  # the preflight skips them when OUT is past the start; another rank may have been first
        tokens = load_token_batches(ctx.recipe.data, ctx.model_dir, warn=ctx.reporter.warning)
    spec = ActivationSpec(tokens.shape[0], tokens.shape[1], reader.config.hidden_size, dtype_name(ctx.dtype))
    file = shard_name(0, output.manifest.total_shards)
    if dist.main:
        names = [n for n in reader.names() if not n.startswith("model.layers.")]
        check_source_tensors(reader, names, ctx.device, ctx.options.allow_nonfinite, ctx.reporter.warning)
        digest = hashlib.sha256()
        write_shard(output.path / file, plan_tensors(reader, names, {}, {}), _CRASH_WRITE, digest=digest)
    embedding = load_embedding(reader, ctx.device, ctx.dtype)
    path = output.activation_path(0, dist)
    sink = ctx.resident if ctx.resident is not None else ActivationWriter(path, local_spec(spec, dist))
    per_batch = batch_samples(spec, ctx.options.token_budget, dist)
    for first, stop in rank_batches(spec, per_batch, dist):
        slice_first, slice_stop = rank_slice(first * dist.world, stop * dist.world, dist)
        sink.write(first, embedding(tokens[slice_first:slice_stop].to(ctx.device)))
    if isinstance(sink, ActivationWriter):
        sink.commit()
    else:
        sink.spill(path, 0).result()
    if dist.main:
        output.record_shard(HEAD, file, digest.hexdigest())
    output.start_activations(spec, per_batch)
    output.commit(dist)


def _output_fisher(ctx: _Run, tokens: torch.Tensor | None) -> None:
    """The output Fisher pre-pass (fisher.py), once per output and before the first block: rank 0 measures it on
    the first calibration sequences and saves it in the work directory, which every rank then reads block by
    block. A run killed during it measures it again."""
    recipe, output, dist = ctx.recipe, ctx.output, ctx.dist
    if not recipe.fisher_tokens or output.manifest.complete or fisher_done(output.work):
        return
    if dist.main:
        if tokens is None:
            tokens = load_token_batches(recipe.data, ctx.model_dir, warn=ctx.reporter.warning)
        cfg = ctx.reader.config
        layers = [i for i in range(cfg.num_hidden_layers) if _weighs_output(ctx, i)]
        samples = fisher_samples(recipe.fisher_tokens, tokens.shape[1], tokens.shape[0])

        def stage(layer: int, what: str) -> None:
            ctx.reporter.stage(layer, f"output Fisher, {what}")

        measured = output_fisher(
            ctx.reader, tokens[:samples], layers, ctx.device, ctx.dtype, output.work, recipe.data.seed, stage
        )
        if missed := [i for i in layers if i not in measured]:
            ctx.reporter.warning(
                f"the output Fisher met NaN/Inf and stopped: blocks {', '.join(map(str, missed))} are solved without it"
            )
    dist.barrier()


def _weighs_output(ctx: _Run, layer: int) -> bool:
    """Whether ``layer`` has down projections to solve under the output Fisher."""
    return ctx.recipe.fisher_tokens > 0 and any(
        g.role is Role.DOWN for g in linear_groups(ctx.reader.config, layer, ctx.recipe)
    )


def _row_gains(ctx: _Run, layer: int) -> RowGains | None:
    """This block's output metric as the row-chunked solve needs it (solvers/row_chunks.py)."""
    if not _weighs_output(ctx, layer):
        return None
    fisher = load_fisher(ctx.output.work, layer)
    if fisher is None:
        return None
    metric = output_metric(fisher.to(ctx.device), ctx.recipe.fisher_weight)
    return row_gains(metric, ctx.recipe.row_chunks)


def _quantize_block(ctx: _Run, layer: int) -> None:
    cfg, output, dist, manifest = ctx.reader.config, ctx.output, ctx.dist, ctx.output.manifest
    spec = manifest.activation_spec
    assert spec is not None and manifest.activations is not None
    report = BlockReport(layer, "moe" if cfg.is_moe_layer(layer) else "dense")
    started = time.perf_counter()
    clock = StageClock(report, ctx.reporter)
    experts = dist.experts(cfg.n_routed_experts) if cfg.is_moe_layer(layer) else range(0)
    with clock("load"):
        block = load_block(ctx.reader, layer, ctx.device, ctx.dtype, experts=experts)
        check_block_weights(ctx.reader, layer, block, ctx.options.allow_nonfinite, ctx.reporter.warning)
        batches = rank_batches(
            spec, manifest.batch_samples or batch_samples(spec, ctx.options.token_budget, dist), dist
        )
        source = _block_input(ctx, layer, spec)
        inputs = BlockInputs(source, batches, *rope_cos_sin(cfg, spec.seq_len, ctx.device), ctx.device)
        reference = block_forward(block, next(inputs.read()), inputs.cos, inputs.sin, dist, experts).float()
    every = linear_groups(cfg, layer, ctx.recipe)
    groups = [g for g in every if g.expert is None or g.expert in experts]
    targets = _float_stream(ctx, layer, block, inputs, experts, clock)
    solved = _solve_block(ctx, block, groups, inputs, report, targets) if every else Solved()
    share_dense_weights(dict(block.named_modules()), groups, solved, dist)
    with clock("write"):  # started here, finished in the background while the block propagates
        _settle(ctx)  # before this block's output activations take the room (and, kept, overwrite its input)
        shard = ctx.output.path / shard_name(1 + layer, ctx.output.manifest.total_shards)
        writing = start_block_shard(shard, ctx.reader, layer, ctx.recipe, solved, block, dist, _CRASH_WRITE)
    with clock("propagate"):
        path = output.activation_path(layer + 1, dist)
        check = partial(check_activations, layer=layer, stage="propagate", allow=ctx.options.allow_nonfinite)
        spilling: Future[None] | None = None
        if ctx.resident is None:
            writer = ActivationWriter(path, local_spec(spec, dist))
            first = propagate(block, inputs, writer, ctx.dtype, dist, experts, check)
            writer.commit()
        else:  # in place; the next block's input reaches its file while the next block computes
            first = propagate(block, inputs, ctx.resident, ctx.dtype, dist, experts, check)
            spilling = ctx.resident.spill(path, layer + 1)
        report.rel_error = rel_error(first.float(), reference, dist)
    if dist.world == 1:
        with clock("write", announce=False):  # what of the write (hashed as written) propagation did not hide
            writing.result()
    source.close()
    if targets is not None:
        targets.source.close()
    merge_rank_stats(report, solved.errors, solved.fallbacks, len(solved.packed), dist)
    report.wall_seconds = time.perf_counter() - started
    _finish_block(ctx, layer, report, writing, spilling)


def _block_input(ctx: _Run, layer: int, spec: ActivationSpec) -> ActivationReader | ResidentActivations:
    """The block's input where it is: kept on the device by the previous block, else (the first block run after a
    resume, or activations on disk) in the file."""
    if ctx.resident is not None and ctx.resident.holds(layer):
        return ctx.resident
    return ActivationReader(ctx.output.activation_path(layer, ctx.dist), local_spec(spec, ctx.dist))


def _float_stream(
    ctx: _Run, layer: int, block: Block, inputs: BlockInputs, experts: Sequence[int], clock: StageClock
) -> BlockInputs | None:
    """A float target's second stream: the unquantized model's input to this block, which is also propagated
    through the block now, while its weights are still the source's, as the next block's float input."""
    if ctx.recipe.target != "float":
        return None
    spec = local_spec(ctx.output.manifest.activation_spec, ctx.dist)
    source = ActivationReader(ctx.output.float_activation_path(layer, ctx.dist), spec)
    targets = BlockInputs(source, inputs.batches, inputs.cos, inputs.sin, inputs.device)
    if layer + 1 < ctx.reader.config.num_hidden_layers:
        with clock("propagate"):
            writer = ActivationWriter(ctx.output.float_activation_path(layer + 1, ctx.dist), spec)
            check = partial(check_activations, layer=layer, stage="propagate", allow=ctx.options.allow_nonfinite)
            propagate(block, targets, writer, ctx.dtype, ctx.dist, experts, check)
            writer.commit()
    return targets


def _solve_block(
    ctx: _Run,
    block: Block,
    groups: list[LinearGroup],
    inputs: BlockInputs,
    report: BlockReport,
    targets: BlockInputs | None,
) -> Solved:
    recipe, dist, layer = ctx.recipe, ctx.dist, report.layer
    solved = Solved()
    solve_options = SolveOptions(memory_budget=ctx.memory.solver_bytes)
    solver = Solver(
        dict(block.named_modules()),
        recipe.solver,
        solve_options,
        ctx.memory.solve_batch,
        partial(ctx.reporter.fallback, layer),
        recipe.plan(ctx.reader.config.fp8_block is not None).quantized(),
        recipe.refine,
        _row_gains(ctx, layer),
    )
    mine = [g for g in groups if g.expert is not None or dist.main]
    awq = partial(_block_awq, ctx.reader, recipe, dist, block, layer, mine)
    method = make_method(recipe.method, solver, solved, block, dist, awq)
    check = partial(check_hessians, layer=layer, allow=ctx.options.allow_nonfinite)
    calibration = Calibration(
        recipe.calibration,
        recipe.min_tokens,
        recipe.tie_gate_up,
        ctx.memory.hessian_bytes,
        dist,
        check,
        ctx.memory.cache_bytes,
        router_weighted=recipe.router_weighted,
    )
    moe = block.mlp if isinstance(block.mlp, MoE) else None

    def on_experts() -> None:
        if moe is not None:
            for rank, done in enumerate(dist.gather_objects(solved.experts_done())):
                ctx.reporter.experts(layer, done, len(dist.experts(len(moe.experts))), rank=rank)

    # The previous block's record (see _finish_block) waits at most until this block's first pass is done.
    clock = StageClock(report, ctx.reporter)
    stats = calibrate_and_solve(
        block,
        groups,
        inputs,
        calibration,
        method,
        clock,
        on_experts,
        partial(_settle, ctx, False),
        targets,
    )
    if moe is not None and stats is not None:
        routed = stats.into.counts.tolist()
        ctx.reporter.expert_tokens(layer, routed)
        mode, floor = recipe.calibration, recipe.min_tokens
        fed_all = [mode == "all" or (mode == "hybrid" and n < floor) for n in routed]
        report_tokens(report, routed, ctx.reader.config.num_experts_per_tok, fed_all)
    return solved


def _block_awq(
    reader: CheckpointReader, recipe: Recipe, dist: Dist, block: Block, layer: int, mine: list[LinearGroup]
) -> BlockAWQ:
    prefix = reader.layer_prefix(layer)

    def stored(name: str) -> torch.dtype:
        return stored_dtype(reader, prefix + name)

    sites = fold_sites(reader.config, layer, linear_groups(reader.config, layer, recipe))
    # One grid for every quantized family (Recipe refuses AWQ with mixed schemes).
    (scheme,) = recipe.plan().by_scheme()
    return BlockAWQ(block, sites, mine, recipe.solver_for(scheme), dist, stored)


def _finish_block(
    ctx: _Run, layer: int, report: BlockReport, writing: ShardWrite, spilling: Future[None] | None
) -> None:
    """Record the finished block in the manifest. With several processes rank 0 can hash the shard only once
    every rank has written its part, and activations kept on the device reach their file only after propagation:
    the record then waits (the block's input kept, so a crash meanwhile resumes from this block) until the next
    block's first calibration pass finds both done on every rank, at the latest until the next block's write
    starts, or the run ends."""
    record = partial(_record_block, ctx, layer, report, writing, spilling)
    if ctx.dist.world == 1 and spilling is None:
        record()
    else:
        ctx.pending.append((record, partial(_ready, writing, spilling)))
    release_host_memory()
    ctx.reporter.block_done(layer, rel_error=report.rel_error if report.rel_error is not None else float("nan"))


def _settle(ctx: _Run, wait: bool = True) -> None:
    """Make the pending records; without ``wait`` only those ready on every rank (every rank calls this at the same
    points and makes the same records, which take part in collectives)."""
    while ctx.pending:
        if not wait and not all(ctx.dist.gather_objects(ctx.pending[0][1]())):
            return
        ctx.pending.pop(0)[0]()


def _ready(writing: ShardWrite, spilling: Future[None] | None) -> bool:
    return writing.future.done() and (spilling is None or spilling.done())


def _record_block(
    ctx: _Run, layer: int, report: BlockReport, writing: ShardWrite, spilling: Future[None] | None
) -> None:
    output, dist = ctx.output, ctx.dist
    digest = writing.result()
    if spilling is not None:
        spilling.result()
    old = output.activation_path(layer, dist)
    if dist.main:
        output.record_shard(f"layer.{layer}", shard_name(1 + layer, output.manifest.total_shards), digest)
        save_block_report(output, report)
    output.activations_ready(layer + 1)
    output.commit(dist)
    old.unlink(missing_ok=True)
    output.float_activation_path(layer, dist).unlink(missing_ok=True)
    crash_point("block-done")


def _finish(ctx: _Run) -> None:
    """The MTP layers (copied unquantized), the index, config.json, the side files and the report."""
    _settle(ctx)
    reader, output, dist = ctx.reader, ctx.output, ctx.dist
    cfg, manifest = reader.config, output.manifest
    if dist.main:
        for layer in range(cfg.num_hidden_layers, cfg.num_layers_with_mtp):
            key = f"layer.{layer}"
            if key in manifest.shards:
                continue
            # The MTP layer is not part of the decoder the config describes: bf16, in the ignore list.
            file = shard_name(1 + layer, manifest.total_shards)
            names = reader.names(reader.layer_prefix(layer))
            check_source_tensors(reader, names, ctx.device, ctx.options.allow_nonfinite, ctx.reporter.warning)
            digest = hashlib.sha256()
            write_shard(output.path / file, plan_tensors(reader, names, {}, {}), _CRASH_WRITE, digest=digest)
            output.record_shard(key, file, digest.hexdigest())
            output.save()
        write_index(output.path, [r.file for r in manifest.shards.values()])
        write_config(output.path, reader, ctx.recipe)
        copy_side_files(ctx.model_dir, output.path)
        write_report(output, cfg.num_hidden_layers, ctx.memory)
        output.mark_complete()
        shutil.rmtree(output.work, ignore_errors=True)
    dist.barrier()


__all__ = ["RunOptions", "run"]
