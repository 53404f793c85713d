"""The ``streamq`` command line: the only place where user input is parsed and validated."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from streamq.errors import StreamqError

app = typer.Typer(
    name="streamq",
    help="Quantize DeepSeek-V3-style MoE checkpoints with GPTQ, one block at a time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Quantize DeepSeek-V3-style MoE checkpoints with GPTQ, one block at a time."""


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Directory to write the checkpoint into.")],
    preset: Annotated[str, typer.Option(help="tiny (CPU tests) or v3 (DeepSeek-V3 width).")] = "tiny",
    layers: Annotated[int | None, typer.Option(help="Decoder layers (default: the preset's).")] = None,
    dense_layers: Annotated[int | None, typer.Option(help="Leading dense layers (first_k_dense_replace).")] = None,
    experts: Annotated[int | None, typer.Option(help="Routed experts per MoE layer (default: the preset's).")] = None,
    mtp: Annotated[bool, typer.Option(help="Write the multi-token-prediction layer.")] = True,
    shards: Annotated[int, typer.Option(min=1, help="Number of safetensors shards.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Directory with tokenizer.json + tokenizer_config.json to copy.")
    ] = None,
    device: Annotated[str, typer.Option(help="Where to generate values (cuda is faster at full width).")] = "cpu",
) -> None:
    """Write a synthetic checkpoint in DeepSeek-V3's release layout (FP8 blocks, shards, index)."""
    from streamq.synth import PRESETS, SynthOptions, write_synthetic_checkpoint

    if preset not in PRESETS:
        raise StreamqError(f"--preset {preset}: unknown; choose one of {', '.join(PRESETS)}")
    if tokenizer is not None and not (tokenizer / "tokenizer.json").is_file():
        raise StreamqError(f"{tokenizer}: no tokenizer.json there; pass the directory that holds it")
    opts = SynthOptions(
        preset=preset,
        num_layers=layers,
        dense_layers=dense_layers,
        experts=experts,
        mtp=mtp,
        shards=shards,
        seed=seed,
        tokenizer_dir=tokenizer,
        device=device,
    )
    write_synthetic_checkpoint(out, opts, progress=lambda msg: typer.echo(msg, err=True))
    typer.echo(f"wrote {out}")


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="Checkpoint directory or Hugging Face repo id (DeepSeek-V3 layout).")],
    out: Annotated[Path, typer.Argument(help="Output directory; rerun the same command to resume.")],
    recipe_file: Annotated[
        Path | None, typer.Option("--recipe", help="A saved streamq_recipe.json; options below override it.")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="builtin, open-thoughts, open-platypus, fineweb-edu, or a .txt/.jsonl/.parquet")
    ] = None,
    num_samples: Annotated[int | None, typer.Option(help="Calibration sequences.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per calibration sequence.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling calibration text.")] = None,
    chat_template: Annotated[str | None, typer.Option(help="auto, on or off (conversational data).")] = None,
    method: Annotated[str | None, typer.Option(help="gptq, awq or rtn.")] = None,
    weight_format: Annotated[
        str | None,
        typer.Option("--format", help="int, nvfp4 or mxfp4 (FP4: 4 bits, symmetric, groups of 16 or 32)."),
    ] = None,
    bits: Annotated[int | None, typer.Option(help="2, 3, 4 or 8.")] = None,
    group_size: Annotated[int | None, typer.Option(help="32, 64, 128 ...; 0 = one scale per output channel.")] = None,
    sym: Annotated[bool | None, typer.Option("--sym/--asym", help="Symmetric or asymmetric grid.")] = None,
    act_order: Annotated[bool | None, typer.Option(help="Solve columns by decreasing Hessian diagonal.")] = None,
    observer: Annotated[str | None, typer.Option(help="absmax or mse scale search.")] = None,
    damp: Annotated[float | None, typer.Option(help="Damping, relative to the mean Hessian diagonal.")] = None,
    scope: Annotated[
        str | None, typer.Option(help="experts (routed experts) or all (+ shared, dense, attention).")
    ] = None,
    calibration: Annotated[str | None, typer.Option(help="routed, all or hybrid (see --min-tokens).")] = None,
    min_tokens: Annotated[int | None, typer.Option(help="hybrid: experts routed fewer tokens get all tokens.")] = None,
    tie_gate_up: Annotated[
        bool | None, typer.Option(help="One Hessian for gate and up (same result, less work).")
    ] = None,
    unquantized: Annotated[
        str | None, typer.Option(help="Unquantized Linears as bf16 or fp8 (FP8 blocks kept).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="Compute dtype: bfloat16 or float32.")] = "bfloat16",
    token_budget: Annotated[int, typer.Option(min=1, help="Tokens per forward micro-batch.")] = 32768,
    hessian_budget_gb: Annotated[float | None, typer.Option(help="GB of expert Hessians per pass (auto).")] = None,
    display: Annotated[str, typer.Option(help="auto, rich, plain or none.")] = "auto",
    gpus: Annotated[
        int | None,
        typer.Option(help="Processes on this machine (one per GPU; CPU processes with gloo when there is none)."),
    ] = None,
) -> None:
    """Quantize MODEL into OUT (compressed-tensors), one block at a time; resumable."""
    from streamq import distributed
    from streamq.io.hub import resolve_model
    from streamq.pipeline import RunOptions
    from streamq.pipeline import run as run_pipeline
    from streamq.recipe import Recipe
    from streamq.tui import EVENTS_FILENAME, Reporter

    if gpus is not None and gpus > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(distributed.launch(gpus, _without_option(sys.argv[1:], "--gpus")))
    base = Recipe.load(recipe_file) if recipe_file else Recipe()
    recipe = build_recipe(
        base,
        data=dict(source=dataset, num_samples=num_samples, seq_len=seq_len, seed=seed, chat_template=chat_template),
        scheme=dict(format=weight_format, bits=bits, group_size=group_size, symmetric=sym),
        solver=dict(
            actorder=None if act_order is None else ("weight" if act_order else "none"),
            observer={"absmax": "minmax"}.get(observer, observer) if observer else None,
            damp=damp,
        ),
        top=dict(
            method=method,
            scope=scope,
            calibration=calibration,
            min_tokens=min_tokens,
            tie_gate_up=tie_gate_up,
            unquantized=unquantized,
        ),
    )
    if dtype not in ("bfloat16", "float32"):
        raise StreamqError(f"--dtype {dtype}: choose bfloat16 or float32")
    if display not in ("auto", "rich", "plain", "none"):
        raise StreamqError(f"--display {display}: choose auto, rich, plain or none")
    options = RunOptions(
        device=device,
        dtype=dtype,
        token_budget=token_budget,
        hessian_budget=None if hessian_budget_gb is None else int(hessian_budget_gb * 2**30),
    )
    dist, rank_device = distributed.from_environment(device)
    options = replace(options, device=rank_device)
    model_dir = resolve_model(model)
    out.mkdir(parents=True, exist_ok=True)
    # Only rank 0 shows progress and keeps the event log; it reports every rank's experts.
    events, shown = (out / EVENTS_FILENAME, display) if dist.main else (None, "none")
    try:
        with Reporter(events, display=shown, rank=dist.rank) as reporter:
            run_pipeline(model_dir, out, recipe, options, reporter, dist)
    finally:
        distributed.shutdown()
    if dist.main:
        typer.echo(f"wrote {out}")


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` less ``option`` and its value (``--opt V`` or ``--opt=V``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="The original checkpoint (directory or Hugging Face repo id).")],
    quantized: Annotated[str | None, typer.Argument(help="A quantized OUT to compare with MODEL.")] = None,
    dataset: Annotated[
        str, typer.Option(help="builtin, a hub dataset name, or a .txt/.jsonl/.parquet file")
    ] = "builtin",
    num_samples: Annotated[int, typer.Option(min=1, help="Evaluation sequences (from the held-out split).")] = 64,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per sequence.")] = 2048,
    chat_template: Annotated[str, typer.Option(help="auto, on or off (conversational data).")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32.")] = "bfloat16",
    token_budget: Annotated[int, typer.Option(min=1, help="Tokens per forward micro-batch.")] = 32768,
    output: Annotated[Path | None, typer.Option(help="Write the result as JSON here.")] = None,
    display: Annotated[str, typer.Option(help="auto, rich, plain or none.")] = "auto",
) -> None:
    """Perplexity of MODEL and, with QUANTIZED, KL divergence, top-1 agreement and per-layer error, block by block."""
    from streamq.data import DataConfig
    from streamq.evaluate import EvalOptions, evaluate
    from streamq.io.hub import resolve_model
    from streamq.tui import Reporter

    data = DataConfig(
        source=dataset, num_samples=num_samples, seq_len=seq_len, split="eval", chat_template=chat_template
    )
    options = EvalOptions(device=device, dtype=dtype, token_budget=token_budget)
    model_dir = resolve_model(model)
    quantized_dir = resolve_model(quantized) if quantized else None
    events = output.with_suffix(".events.jsonl") if output else None
    with Reporter(events, display=display) as reporter:
        result = evaluate(model_dir, quantized_dir, data, options, reporter)
    typer.echo(result.summary())
    if output:
        result.write_json(output)


def build_recipe(base, *, data: dict, scheme: dict, solver: dict, top: dict):
    """``base`` with every option the user gave (not None) replaced; a new format starts from its preset."""
    from streamq.solvers.scheme import QuantScheme

    def given(d: dict) -> dict:
        return {k: v for k, v in d.items() if v is not None}

    fmt = scheme.get("format")
    try:
        start = base.solver.scheme if fmt in (None, base.solver.scheme.format) else QuantScheme.preset(fmt)
        new_scheme = replace(start, **given(scheme))
        new_solver = replace(base.solver, scheme=new_scheme, **given(solver))
        return replace(base, solver=new_solver, data=replace(base.data, **given(data)), **given(top))
    except ValueError as exc:
        raise StreamqError(f"invalid option: {exc}") from None


def main() -> None:
    try:
        app()
    except StreamqError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
