"""The ``streamq`` command line: the only place where user input is parsed and validated."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from streamq.errors import StreamqError

if TYPE_CHECKING:
    from streamq.pipeline import RunOptions
    from streamq.recipe import Recipe

app = typer.Typer(
    name="streamq",
    help="Quantize DeepSeek-V3-style MoE checkpoints with GPTQ, one block at a time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's own help wraps every text to the terminal (up to 120 columns); Rich's help tables cut option texts
    # with "…" at 80 columns whenever the output is not a terminal (a pipe, `less`, a CI log).
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)


@app.callback()
def _root() -> None:
    """Quantize DeepSeek-V3-style MoE checkpoints with GPTQ, one block at a time."""


@app.command(short_help="Write a synthetic checkpoint in DeepSeek's release layout.")
def synth(
    out: Annotated[Path, typer.Argument(help="Directory to write the checkpoint into.")],
    preset: Annotated[
        str, typer.Option(help="tiny (CPU tests), v3 (DeepSeek-V3 width), v2-lite or kimi-k2 (tiny, real routing).")
    ] = "tiny",
    layers: Annotated[int | None, typer.Option(help="Decoder layers (default: the preset's).")] = None,
    dense_layers: Annotated[int | None, typer.Option(help="Leading dense layers (first_k_dense_replace).")] = None,
    experts: Annotated[int | None, typer.Option(help="Routed experts per MoE layer (default: the preset's).")] = None,
    mtp: Annotated[bool, typer.Option(help="Write the multi-token-prediction layer.")] = True,
    shards: Annotated[int, typer.Option(min=1, help="Number of safetensors shards.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="Directory with tokenizer.json (or tiktoken.model + its code) + tokenizer_config.json."),
    ] = None,
    device: Annotated[str, typer.Option(help="Where to generate values (cuda is faster at full width).")] = "cpu",
    source_format: Annotated[
        str,
        typer.Option(help="Linears as fp8 (DeepSeek's 128x128 blocks), bf16, or int4 (experts as Kimi-K2-Thinking)."),
    ] = "fp8",
) -> None:
    """Write a synthetic checkpoint in DeepSeek's release layout (FP8 blocks, shards, index)."""
    from streamq.synth import PRESETS, SynthOptions, write_synthetic_checkpoint
    from streamq.synth_formats import SOURCE_FORMATS

    if preset not in PRESETS:
        raise StreamqError(f"--preset {preset}: unknown; choose one of {', '.join(PRESETS)}")
    if source_format not in SOURCE_FORMATS:
        raise StreamqError(f"--source-format {source_format}: unknown; choose one of {', '.join(SOURCE_FORMATS)}")
    if tokenizer is not None and not any((tokenizer / n).is_file() for n in ("tokenizer.json", "tiktoken.model")):
        raise StreamqError(f"{tokenizer}: no tokenizer.json or tiktoken.model there; pass the directory that holds it")
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
        source_format=source_format,
    )
    try:
        write_synthetic_checkpoint(out, opts, progress=lambda msg: typer.echo(msg, err=True))
    except ValueError as exc:  # a config the options make invalid (e.g. int4 experts of a width not 32k)
        raise StreamqError(f"synth: {exc}") from None
    typer.echo(f"wrote {out}")


@app.command(short_help="Quantize MODEL into OUT, one block at a time; resumable.")
def run(
    ctx: typer.Context,
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
    observer: Annotated[
        str | None, typer.Option(help="absmax, mse or mse-hessian (columns weighted by the Hessian) scale search.")
    ] = None,
    damp: Annotated[float | None, typer.Option(help="Damping, relative to the mean Hessian diagonal.")] = None,
    scale_rounds: Annotated[
        int | None, typer.Option(help="Rounds of least-squares group scales + a new GPTQ sweep (0 = off).")
    ] = None,
    code_rounds: Annotated[
        int | None,
        typer.Option(help="Rounds of coordinate descent on the codes after the GPTQ sweep (default 2; 0 = off)."),
    ] = None,
    scale_candidates: Annotated[
        str | None,
        typer.Option(
            help="Multipliers of the group scales, a sweep each, best per row (default 0.88,0.91,0.94,0.97,1.03,1.06)."
        ),
    ] = None,
    refine: Annotated[
        str | None,
        typer.Option(help="Where the scale candidates and code descent apply: down (projections, default) or all."),
    ] = None,
    outside_weight: Annotated[
        float | None,
        typer.Option(
            help="Code descent without the output Fisher: weight of a down projection's errors across its column "
            "space (default 1)."
        ),
    ] = None,
    fisher_tokens: Annotated[
        int | None,
        typer.Option(
            help="Calibration tokens for measuring the output Fisher that down projections are solved under "
            "(default 32768; 0 = off)."
        ),
    ] = None,
    fisher_weight: Annotated[
        float | None, typer.Option(help="Weight of the Fisher in the down projections' metric, the rest I (0.5).")
    ] = None,
    row_chunks: Annotated[
        int | None, typer.Option(help="Chunks of rows a down projection is solved in under the Fisher (8).")
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="float: experts match the unquantized model's output (GPTAQ); layer: GPTQ.")
    ] = None,
    router_weighted: Annotated[
        bool | None, typer.Option(help="Weigh each expert's tokens by their router weight squared.")
    ] = None,
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
    scheme: Annotated[
        list[str] | None,
        typer.Option(
            help="FAMILY=SPEC, repeatable: one family's scheme, over what --scope/--unquantized/--format give it. "
            "FAMILY: experts, shared, dense, attention; SPEC: nvfp4, mxfp4, wNa16 (N-bit, groups of 128 as "
            "compressed-tensors' presets), wNa16-gG[-asym] (-g0: per channel), fp8 (the release's FP8 blocks "
            "kept) or bf16.",
        ),
    ] = None,
    source_experts: Annotated[str | None, typer.Option(help="Packed source experts: requantize or keep.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="Compute dtype: bfloat16 or float32.")] = "bfloat16",
    token_budget: Annotated[int, typer.Option(min=1, help="Tokens per forward micro-batch.")] = 32768,
    memory_budget_gb: Annotated[float | None, typer.Option(help="GB for Hessians + solver (auto).")] = None,
    hessian_budget_gb: Annotated[float | None, typer.Option(help="GB of expert Hessians per pass (auto).")] = None,
    activations: Annotated[
        str,
        typer.Option(
            help="Where the activations between blocks live: auto (on the GPU when the memory plan has room, "
            "else read from and written to OUT's work directory), device (always on the compute device) or disk. "
            "The disk copy that resume needs is written in every case."
        ),
    ] = "auto",
    display: Annotated[str, typer.Option(help="auto, rich, plain or none.")] = "auto",
    allow_nonfinite: Annotated[
        bool, typer.Option(help="On NaN/Inf go on with the solver's fallbacks (NaN as 0, RTN); errors then show NaN.")
    ] = False,
    gpus: Annotated[
        int | None,
        typer.Option(help="Processes on this machine (one per GPU; CPU processes with gloo when there is none)."),
    ] = None,
) -> None:
    """Quantize MODEL into OUT (compressed-tensors), one block at a time; resumable.

    Before anything is written to OUT, every tensor's shape and dtype is checked against config.json (FP8 block
    scales included), the data set must give --num-samples x --seq-len tokens, and --group-size must divide the
    in_features of every Linear in --scope (routed experts, and with --scope all also attention, shared experts
    and dense MLPs); a Linear it does not divide refuses the run with the group sizes that fit."""
    from streamq.launch import launch

    if gpus is not None and gpus > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(launch(gpus, _without_option(sys.argv[1:], "--gpus")))
    recipe = _recipe_from_options(ctx.params)
    _quantize(model, out, recipe, _run_options(ctx.params), display)


_RECIPE_OPTIONS = (
    "method",
    "scope",
    "calibration",
    "min_tokens",
    "tie_gate_up",
    "unquantized",
    "source_experts",
    "target",
    "router_weighted",
    "refine",
    "fisher_tokens",
    "fisher_weight",
    "row_chunks",
)


def _recipe_from_options(p: dict[str, Any]) -> Recipe:
    """The recipe ``streamq run``'s options describe: the saved one (--recipe) with the options given replaced."""
    from streamq.recipe import Recipe

    act_order, observer = p["act_order"], p["observer"]
    return build_recipe(
        Recipe.load(p["recipe_file"]) if p["recipe_file"] else Recipe(),
        data=dict(
            source=p["dataset"],
            num_samples=p["num_samples"],
            seq_len=p["seq_len"],
            seed=p["seed"],
            chat_template=p["chat_template"],
        ),
        scheme=dict(format=p["weight_format"], bits=p["bits"], group_size=p["group_size"], symmetric=p["sym"]),
        solver=dict(
            actorder=None if act_order is None else ("weight" if act_order else "none"),
            observer={"absmax": "minmax", "mse-hessian": "mse"}.get(observer, observer) if observer else None,
            mse_hessian=None if observer is None else observer == "mse-hessian",
            damp=p["damp"],
            scale_rounds=p["scale_rounds"],
            code_rounds=p["code_rounds"],
            scale_candidates=_multipliers(p["scale_candidates"]),
            outside_weight=p["outside_weight"],
        ),
        top={k: p[k] for k in _RECIPE_OPTIONS},
        schemes=_scheme_options(p["scheme"] or []),
    )


def _multipliers(text: str | None) -> tuple[float, ...] | None:
    """``--scale-candidates`` as floats; "none" (or an empty value) for none; the recipe checks their range."""
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        fix = "write numbers separated by commas, e.g. 0.94,0.97,1.03"
        raise StreamqError(f"--scale-candidates {text!r}: {fix}") from None


def _scheme_options(values: list[str]) -> list[tuple[str, str]]:
    """``--scheme FAMILY=SPEC`` values as (family, spec) pairs; the recipe validates both."""
    pairs = []
    for value in values:
        family, sep, spec = value.partition("=")
        if not sep or not family.strip() or not spec.strip():
            raise StreamqError(f"--scheme {value!r}: write FAMILY=SPEC, e.g. --scheme shared=w8a16")
        pairs.append((family.strip().lower(), spec.strip()))
    return pairs


def _run_options(p: dict[str, Any]) -> RunOptions:
    from streamq.memory import ACTIVATION_MODES
    from streamq.pipeline import RunOptions

    if p["dtype"] not in ("bfloat16", "float32"):
        raise StreamqError(f"--dtype {p['dtype']}: choose bfloat16 or float32")
    if p["display"] not in ("auto", "rich", "plain", "none"):
        raise StreamqError(f"--display {p['display']}: choose auto, rich, plain or none")
    if p["activations"] not in ACTIVATION_MODES:
        raise StreamqError(f"--activations {p['activations']}: choose {', '.join(ACTIVATION_MODES)}")

    def gib(value: float | None) -> int | None:
        return None if value is None else int(value * 2**30)

    return RunOptions(
        device=p["device"],
        dtype=p["dtype"],
        token_budget=p["token_budget"],
        memory_budget=gib(p["memory_budget_gb"]),
        hessian_budget=gib(p["hessian_budget_gb"]),
        allow_nonfinite=p["allow_nonfinite"],
        activations=p["activations"],
    )


def _quantize(model: str, out: Path, recipe: Recipe, options: RunOptions, display: str) -> None:
    from streamq import distributed
    from streamq.io.hub import resolve_model
    from streamq.pipeline import run as run_pipeline
    from streamq.preflight import check_before_output
    from streamq.tui import EVENTS_FILENAME, Reporter

    dist, rank_device = distributed.from_environment(options.device)
    options = replace(options, device=rank_device)
    model_dir = resolve_model(model)
    checked = check_before_output(model_dir, out, recipe, dist.world)  # preflight: before OUT is created
    out.mkdir(parents=True, exist_ok=True)
    # Only rank 0 shows progress and keeps the event log; it reports every rank's experts.
    events, shown = (out / EVENTS_FILENAME, display) if dist.main else (None, "none")
    try:
        with _sigterm_interrupts(), Reporter(events, display=shown, rank=dist.rank) as reporter:
            run_pipeline(model_dir, out, recipe, options, reporter, dist, checked)
    except KeyboardInterrupt as exc:
        # Every finished block is in the manifest: an interrupted run is resumed, not started again.
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        if dist.main:  # each worker is stopped; rank 0 speaks for the run
            typer.echo(f"streamq: {how}; rerun the same command to resume {out}", err=True)
        raise typer.Exit(128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)) from None
    finally:
        distributed.shutdown()
    if dist.main:
        typer.echo(f"wrote {out}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's stop, `kill`), raised where the run is, so that it stops as Ctrl-C does: the
    event log ends with run_end "interrupted" and every file in OUT is either finished or a temporary one."""


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the clean-up kills at once
        raise Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


@app.command("eval", short_help="Perplexity, KL divergence and per-layer error.")
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


def build_recipe(base, *, data: dict, scheme: dict, solver: dict, top: dict, schemes: list | tuple = ()):
    """``base`` with every option the user gave (not None) replaced; a new format starts from its preset;
    ``schemes`` (family, spec) replace the base's scheme of those families (the last one given wins)."""
    from streamq.solvers.scheme import QuantScheme

    def given(d: dict) -> dict:
        return {k: v for k, v in d.items() if v is not None}

    fmt = scheme.get("format")
    try:
        start = base.solver.scheme if fmt in (None, base.solver.scheme.format) else QuantScheme.preset(fmt)
        new_scheme = replace(start, **given(scheme))
        new_solver = replace(base.solver, scheme=new_scheme, **given(solver))
        merged = tuple({**dict(base.schemes), **dict(schemes)}.items())
        return replace(base, solver=new_solver, data=replace(base.data, **given(data)), schemes=merged, **given(top))
    except ValueError as exc:
        raise StreamqError(f"invalid option: {exc}") from None


def main() -> None:
    try:
        app()
    except StreamqError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
