"""The ``streamq`` command line: the only place where user input is parsed and validated."""

from __future__ import annotations

import sys
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


def main() -> None:
    try:
        app()
    except StreamqError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
