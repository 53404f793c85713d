"""``streamq eval``: the perplexity of a model and how far a quantized copy strays from it, one block at a time.

Neither model is ever loaded whole. Each model runs on its own stream of hidden states, kept in activation files in
a temporary work directory (two files per model at a time: a block's input and its output), so a quantized model's
errors compound exactly as they would in inference. Blocks run one at a time on micro-batches of whole sequences
bounded by a token budget; after block ``i`` of both models, the relative error of their outputs is measured.

At the end the final norm and ``lm_head`` of each model turn the last hidden states into logits a chunk of tokens
at a time (the chunk is bounded in bytes: DeepSeek's vocabulary has 129280 entries, so the logits of a whole
micro-batch would be tens of GB). Only sums leave a chunk (negative log-likelihoods, KL, top-1 agreements), and the
means are taken once at the end.

Metrics, over every position of each sequence except the last (whose next token is not in the sample):

* perplexity: exp of the mean next-token negative log-likelihood;
* KL divergence: mean over tokens of KL(P_model ‖ P_quantized) of the next-token distributions, in nats;
* top-1 agreement: the fraction of positions where both models' most likely next token is the same;
* layer errors: ‖h_q − h‖ / ‖h‖ over all tokens of the hidden states after each block (every position counts).

Evaluation always reads the held-out split of the dataset, so a quantized model is never scored on its calibration
text.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from streamq.config import ModelConfig
from streamq.data import DataConfig, load_token_batches
from streamq.errors import StreamqError
from streamq.forward import BlockInputs, propagate, resolve_device
from streamq.io.activations import (
    ActivationReader,
    ActivationSpec,
    ActivationWriter,
    disk_bytes_needed,
    dtype_name,
    microbatches,
    samples_per_batch,
)
from streamq.io.atomic import write_atomic
from streamq.io.safetensors_stream import CheckpointReader
from streamq.model.deepseek import load_block, load_embedding, load_head, rope_cos_sin
from streamq.resume import MANIFEST_NAME
from streamq.tui import Reporter

Warn = Callable[[str], None]

DTYPES = ("bfloat16", "float16", "float32")
# Fields that must agree for two checkpoints to be the same model at different precisions.
SAME_MODEL_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "n_routed_experts")
MODEL, QUANTIZED = "model", "quantized"
HEAD_STAGE = "final norm + lm_head: logits and scores"


class EvalWarning(UserWarning):
    """Something about the models being compared that the user should know but that does not stop evaluation."""


@dataclass(frozen=True)
class EvalOptions:
    """How to run, not what to measure."""

    device: str = "auto"  # "auto": the GPU when there is one
    dtype: str = "bfloat16"  # compute and activation dtype; log-probabilities are always float32
    token_budget: int = 32768  # tokens per forward micro-batch
    logits_budget: int = 1 << 29  # bytes of one float32 [tokens, vocab] logits chunk; a few such live at once
    work_dir: Path | None = None  # parent of the temporary activation directory; None: the system's temp dir

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise StreamqError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        if self.token_budget < 1 or self.logits_budget < 1:
            raise StreamqError(f"token and logits budgets must be >= 1, not {self.token_budget}, {self.logits_budget}")


@dataclass(frozen=True)
class ModelScore:
    path: str
    nll: float  # mean next-token negative log-likelihood, nats per token
    perplexity: float


@dataclass(frozen=True)
class Comparison:
    """The quantized model against the model, both fed the same tokens."""

    kl_divergence: float  # mean over tokens of KL(P_model ‖ P_quantized), nats
    top1_agreement: float
    layer_errors: tuple[float, ...]  # ‖h_q − h‖ / ‖h‖ after each block, each model on its own stream


@dataclass(frozen=True)
class EvalResult:
    data: DataConfig
    tokens: int  # scored next-token predictions: sequences × (seq_len − 1)
    dtype: str
    model: ModelScore
    quantized: ModelScore | None = None
    comparison: Comparison | None = None
    seconds: float = 0.0
    sequences: int = 0  # evaluated sequences, each of seq_len tokens: every block runs on all of them
    seq_len: int = 0

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))

    def write_json(self, path: Path) -> None:
        write_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        """A few human-readable lines for the terminal."""
        lines = [f"{self.data.source} (eval split), {self.dtype}: {describe_tokens(self.sequences, self.seq_len)}"]
        for score in (self.model, self.quantized):
            if score is not None:
                lines.append(f"perplexity {score.perplexity:.4f} (nll {score.nll:.4f})  {score.path}")
        if self.comparison is not None:
            c = self.comparison
            lines.append(
                f"KL(model ‖ quantized) {c.kl_divergence:.4g} nats/token, top-1 agreement {c.top1_agreement:.4f}"
            )
            lines += format_layer_errors(c.layer_errors, self.sequences * self.seq_len)
        return "\n".join(lines)


def describe_tokens(sequences: int, seq_len: int) -> str:
    """What runs and what is scored: the last token of a sequence has no next token in the sample to predict."""
    return (
        f"{sequences} sequences × {seq_len} tokens = {sequences * seq_len:,} tokens; scored: "
        f"{sequences * (seq_len - 1):,} next-token predictions ({seq_len - 1} per sequence)"
    )


def format_layer_errors(errors: Sequence[float], tokens: int, per_line: int = 6) -> list[str]:
    """One labelled entry per block, a few per line."""
    width = len(str(max(len(errors) - 1, 0)))
    entries = [f"block {i:>{width}} {e:.3e}" for i, e in enumerate(errors)]
    rows = ["  " + "   ".join(entries[i : i + per_line]) for i in range(0, len(entries), per_line)]
    return [f"output error after each block, ‖h_q − h‖ / ‖h‖ over all {tokens:,} tokens:", *rows]


# -- per-token sums: pure functions on one chunk of logits ---------------------------------------------------------


@dataclass(frozen=True)
class TokenSums:
    """Sums over predicted tokens; means are taken only once all chunks are in."""

    tokens: int = 0
    nll: float = 0.0
    nll_quantized: float = 0.0
    kl: float = 0.0
    agreements: int = 0

    def __add__(self, other: TokenSums) -> TokenSums:
        return TokenSums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    # float32 whatever the compute dtype: bf16 has 8 bits of mantissa, far too few for a 129280-way normaliser.
    return F.log_softmax(logits.float(), dim=-1)


def nll_sum(logp: torch.Tensor, targets: torch.Tensor) -> float:
    return -logp.gather(-1, targets[:, None]).sum(dtype=torch.float64).item()


def kl_sum(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """Σ over rows of KL(p ‖ q), from log-probabilities: no log of a probability that underflowed to 0."""
    return (logp.exp() * (logp - logq)).sum(dtype=torch.float64).item()


def token_sums(logits: torch.Tensor, targets: torch.Tensor, quantized_logits: torch.Tensor | None = None) -> TokenSums:
    """Sums over the rows of one chunk: ``logits`` [tokens, vocab] predict ``targets`` [tokens]."""
    logp = log_probs(logits)
    sums = TokenSums(tokens=targets.numel(), nll=nll_sum(logp, targets))
    if quantized_logits is None:
        return sums
    logq = log_probs(quantized_logits)
    return replace(
        sums,
        nll_quantized=nll_sum(logq, targets),
        kl=kl_sum(logp, logq),
        agreements=int((logp.argmax(-1) == logq.argmax(-1)).sum().item()),
    )


def perplexity(nll: float) -> float:
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def relative_error(diff_sq: float, ref_sq: float) -> float:
    if ref_sq > 0:
        return math.sqrt(diff_sq / ref_sq)
    return 0.0 if diff_sq == 0 else math.inf


def logits_rows(budget_bytes: int, vocab_size: int) -> int:
    """Tokens per logits chunk: one float32 row of logits is 4 × vocab bytes."""
    return max(1, budget_bytes // (4 * vocab_size))


# -- checks before any work -----------------------------------------------------------------------------------------


def check_complete(directory: Path, role: str) -> dict[str, Any] | None:
    """A streamq OUT's manifest, refusing an unfinished run; None for a checkpoint streamq did not write (any
    DeepSeek-V3 layout checkpoint can be evaluated)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StreamqError(f"{path}: unreadable ({exc}); is {role} a finished `streamq run` output?") from None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise StreamqError(
            f"{role} {directory} is not a finished quantization ({MANIFEST_NAME} says complete: false); rerun the "
            "same `streamq run` command to finish it, then evaluate"
        )
    return manifest


def check_same_model(model: ModelConfig, quantized: ModelConfig, quantized_dir: Path) -> None:
    differences = [
        f"{name} {getattr(quantized, name)} vs {getattr(model, name)}"
        for name in SAME_MODEL_FIELDS
        if getattr(quantized, name) != getattr(model, name)
    ]
    if differences:
        raise StreamqError(
            f"QUANTIZED {quantized_dir} was not made from MODEL ({', '.join(differences)} in MODEL); pass the "
            "model it was quantized from"
        )


def config_sha256(model_dir: Path) -> str:
    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()


def check_disk(work: Path, needed: int) -> None:
    free = shutil.disk_usage(work).free
    if free < needed:
        raise StreamqError(
            f"{work}: evaluation needs {needed / 2**30:.1f} GiB of activation files, {free / 2**30:.1f} GiB are free; "
            "pass a work directory on a larger disk"
        )


# -- the streams ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stream:
    """One model's pass over the eval tokens: its checkpoint and its activation files."""

    name: str
    reader: CheckpointReader
    work: Path

    def acts(self, layer: int) -> Path:
        """The hidden states entering block ``layer`` (``num_hidden_layers``: the final ones)."""
        return self.work / f"{self.name}.{layer}.bin"


@dataclass(frozen=True)
class _Plan:
    spec: ActivationSpec
    batches: list[tuple[int, int]]
    device: torch.device
    dtype: torch.dtype


def evaluate(
    model_dir: Path,
    quantized_dir: Path | None,
    data: DataConfig,
    options: EvalOptions,
    reporter: Reporter | None = None,
) -> EvalResult:
    """Score MODEL (and compare QUANTIZED, a quantized copy of it, when given) on the eval split of ``data``.

    Warnings go to ``reporter`` when given, else to ``warnings.warn``."""
    started = time.perf_counter()
    report_warning = reporter.warning if reporter is not None else None
    # A reporter without log or display: progress calls need no None checks.
    progress = reporter if reporter is not None else Reporter(None, display="none")
    data = replace(data, split="eval")
    with ExitStack() as stack:
        readers = _open_readers(stack, Path(model_dir), quantized_dir, report_warning or _warn)
        cfg = readers[0].config
        tokens = load_token_batches(data, Path(model_dir), warn=report_warning)
        plan = _plan(tokens, cfg, options)
        progress.run_start(
            model=str(model_dir),
            out=str(quantized_dir or ""),
            total_blocks=cfg.num_hidden_layers,
            experts_per_block=cfg.n_routed_experts,
            calib_tokens=tokens.numel(),
            recipe=f"evaluation of {len(readers)} model(s) on {data.source} (eval split): "
            + describe_tokens(*tokens.shape),
        )
        with _work_dir(options.work_dir) as work:
            check_disk(work, len(readers) * disk_bytes_needed(plan.spec))
            streams = [_Stream(name, reader, work) for name, reader in zip((MODEL, QUANTIZED), readers, strict=False)]
            layer_errors = _run_blocks(streams, tokens, plan, progress)
            sums = _score(streams, tokens, plan, logits_rows(options.logits_budget, cfg.vocab_size), progress)
    result = _result(data, options.dtype, model_dir, quantized_dir, sums, layer_errors, time.perf_counter() - started)
    return replace(result, sequences=tokens.shape[0], seq_len=tokens.shape[1])


def _warn(message: str) -> None:
    warnings.warn(message, EvalWarning, stacklevel=4)


def _open_readers(stack: ExitStack, model_dir: Path, quantized_dir: Path | None, warn: Warn) -> list[CheckpointReader]:
    """MODEL's reader, then QUANTIZED's when given, after checking that both are finished and QUANTIZED is a copy
    of MODEL; ``stack`` closes them."""
    check_complete(model_dir, "MODEL")
    model = stack.enter_context(CheckpointReader(model_dir))
    if quantized_dir is None:
        return [model]
    manifest = check_complete(Path(quantized_dir), "QUANTIZED")
    quantized = stack.enter_context(CheckpointReader(quantized_dir))
    check_same_model(model.config, quantized.config, Path(quantized_dir))
    recorded = manifest.get("model_config_sha256") if manifest else None
    if recorded and recorded != config_sha256(model_dir):
        # Same shapes, different config.json: a re-saved config is harmless, a fine-tuned sibling is not.
        warn(f"QUANTIZED {quantized_dir} was made from a model whose config.json differs from {model_dir}'s")
    return [model, quantized]


def _plan(tokens: torch.Tensor, cfg: ModelConfig, options: EvalOptions) -> _Plan:
    if tokens.shape[1] < 2:
        raise StreamqError(f"--seq-len {tokens.shape[1]}: evaluation needs at least 2 tokens per sequence")
    dtype = getattr(torch, options.dtype)
    spec = ActivationSpec(tokens.shape[0], tokens.shape[1], cfg.hidden_size, dtype_name(dtype))
    batches = microbatches(spec.samples, samples_per_batch(spec, options.token_budget))
    return _Plan(spec, batches, resolve_device(options.device), dtype)


@contextmanager
def _work_dir(parent: Path | None) -> Iterator[Path]:
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="streamq-eval-", dir=parent) as work:
        yield Path(work)


@torch.inference_mode()
def _run_blocks(streams: Sequence[_Stream], tokens: torch.Tensor, plan: _Plan, progress: Reporter) -> list[float]:
    """Every block of every stream, block-major so that one block is in memory at a time; the layer errors when
    there are two streams."""
    for stream in streams:
        _embed(stream, tokens, plan)
    cfg = streams[0].reader.config
    cos, sin = rope_cos_sin(cfg, plan.spec.seq_len, plan.device)
    errors: list[float] = []
    for layer in range(cfg.num_hidden_layers):
        for stream in streams:
            progress.stage(layer, stream.name)
            _forward_block(stream, layer, cos, sin, plan)
        error = _layer_error(streams, layer + 1, plan) if len(streams) > 1 else None
        if error is not None:
            errors.append(error)
        progress.block_done(layer, rel_error=error)
    return errors


def _embed(stream: _Stream, tokens: torch.Tensor, plan: _Plan) -> None:
    embedding = load_embedding(stream.reader, plan.device, plan.dtype)
    with _writing(stream.acts(0), plan.spec) as writer:
        for first, stop in plan.batches:
            writer.write(first, embedding(tokens[first:stop].to(plan.device)))


def _forward_block(stream: _Stream, layer: int, cos: torch.Tensor, sin: torch.Tensor, plan: _Plan) -> None:
    """Block ``layer`` over the stream's saved input, writing its output; the input is deleted after."""
    block = load_block(stream.reader, layer, plan.device, plan.dtype)
    source = ActivationReader(stream.acts(layer), plan.spec)
    try:
        with _writing(stream.acts(layer + 1), plan.spec) as writer:
            propagate(block, BlockInputs(source, plan.batches, cos, sin, plan.device), writer, plan.dtype)
    finally:
        source.close()
    stream.acts(layer).unlink()


@contextmanager
def _writing(path: Path, spec: ActivationSpec) -> Iterator[ActivationWriter]:
    writer = ActivationWriter(path, spec)
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
    writer.commit()


def _layer_error(streams: Sequence[_Stream], index: int, plan: _Plan) -> float:
    """‖h_q − h‖ / ‖h‖ over every token of activation file ``index`` of the two streams."""
    diff_sq = ref_sq = 0.0
    with _reading(streams, index, plan.spec) as (reference, quantized):
        for first, stop in plan.batches:
            h = reference.read(first, stop).to(plan.device, torch.float32)
            h_q = quantized.read(first, stop).to(plan.device, torch.float32)
            diff_sq += (h_q - h).pow(2).sum(dtype=torch.float64).item()
            ref_sq += h.pow(2).sum(dtype=torch.float64).item()
    return relative_error(diff_sq, ref_sq)


@contextmanager
def _reading(streams: Sequence[_Stream], index: int, spec: ActivationSpec) -> Iterator[list[ActivationReader]]:
    readers: list[ActivationReader] = []
    try:
        for stream in streams:
            readers.append(ActivationReader(stream.acts(index), spec))
        yield readers
    finally:
        for reader in readers:
            reader.close()


@torch.inference_mode()
def _score(streams: Sequence[_Stream], tokens: torch.Tensor, plan: _Plan, rows: int, progress: Reporter) -> TokenSums:
    """Token sums over the final hidden states, ``rows`` tokens of logits at a time: the only logits that ever
    exist are one chunk's, one per model."""
    # The head has no block of its own: it reports as a stage of the last block, whose output it reads.
    progress.stage(streams[0].reader.config.num_hidden_layers - 1, HEAD_STAGE)
    heads = [load_head(stream.reader, plan.device, plan.dtype) for stream in streams]
    hidden_size, sums = plan.spec.hidden, TokenSums()
    with _reading(streams, streams[0].reader.config.num_hidden_layers, plan.spec) as finals:
        for first, stop in plan.batches:
            # The last position predicts a token outside the sample: it is dropped before the head.
            hidden = [final.read(first, stop)[:, :-1].reshape(-1, hidden_size) for final in finals]
            targets = tokens[first:stop, 1:].reshape(-1)
            for lo in range(0, targets.numel(), rows):
                logits = [head(h[lo : lo + rows].to(plan.device)) for head, h in zip(heads, hidden, strict=True)]
                quantized = logits[1] if len(logits) > 1 else None
                sums += token_sums(logits[0], targets[lo : lo + rows].to(plan.device), quantized)
    return sums


def _result(
    data: DataConfig,
    dtype: str,
    model_dir: Path,
    quantized_dir: Path | None,
    sums: TokenSums,
    layer_errors: list[float],
    seconds: float,
) -> EvalResult:
    nll = sums.nll / sums.tokens
    result = EvalResult(data, sums.tokens, dtype, ModelScore(str(model_dir), nll, perplexity(nll)), seconds=seconds)
    if quantized_dir is None:
        return result
    nll_q = sums.nll_quantized / sums.tokens
    return replace(
        result,
        quantized=ModelScore(str(quantized_dir), nll_q, perplexity(nll_q)),
        comparison=Comparison(sums.kl / sums.tokens, sums.agreements / sums.tokens, tuple(layer_errors)),
    )


def _json_safe(value: Any) -> Any:
    """Non-finite floats as strings ("inf", "nan"): strict JSON parsers reject the bare words json.dumps writes."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


__all__ = [
    "Comparison",
    "EvalOptions",
    "EvalResult",
    "EvalWarning",
    "ModelScore",
    "TokenSums",
    "evaluate",
    "token_sums",
]
