"""`streamq eval` on the tiny synthetic model: perplexity, KL, top-1 agreement and layer errors against transformers."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import streamq_env
from hf_reference import hf_model

from streamq.config import ModelConfig
from streamq.data import DataConfig, load_token_batches
from streamq.errors import StreamqError
from streamq.evaluate import (
    HEAD_STAGE,
    EvalOptions,
    EvalResult,
    EvalWarning,
    ModelScore,
    TokenSums,
    evaluate,
    token_sums,
)
from streamq.io.safetensors_stream import CheckpointReader
from streamq.pipeline import RunOptions, run
from streamq.recipe import Recipe
from streamq.resume import MANIFEST_NAME
from streamq.tui import Reporter

pytestmark = [
    # The tiny model has no tokenizer: every data load warns that it falls back to bytes.
    pytest.mark.filterwarnings("ignore::streamq.data.DataWarning"),
    # transformers notes that OUT's config already has a quantization_config, which is what dequantize=True extends.
    pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning"),
]

DATA = DataConfig(num_samples=6, seq_len=32, split="eval")
LOGIT_CHUNK_TOKENS = 20  # chunks that straddle sequences and micro-batches


@dataclass(frozen=True)
class Logged:
    result: EvalResult
    events: list[dict]
    work: Path


@pytest.fixture(scope="module")
def options(tiny_checkpoint: Path) -> EvalOptions:
    vocab = ModelConfig.load(tiny_checkpoint).vocab_size
    # 2 sequences per micro-batch: 3 micro-batches.
    return EvalOptions(device="cpu", dtype="float32", token_budget=64, logits_budget=LOGIT_CHUNK_TOKENS * 4 * vocab)


@pytest.fixture(scope="module")
def quantized_out(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    recipe = Recipe(data=DataConfig(num_samples=6, seq_len=32))
    with Reporter(None, display="none") as reporter:
        return run(
            tiny_checkpoint,
            tmp_path_factory.mktemp("quantized") / "out",
            recipe,
            RunOptions(device="cpu", dtype="float32", token_budget=64),
            reporter,
        )


@pytest.fixture(scope="module")
def tokens(tiny_checkpoint: Path) -> torch.Tensor:
    return load_token_batches(DATA, tiny_checkpoint, warn=lambda _: None)


@pytest.fixture(scope="module")
def against_itself(tiny_checkpoint: Path, options: EvalOptions) -> EvalResult:
    return evaluate(tiny_checkpoint, tiny_checkpoint, DATA, options)


@pytest.fixture(scope="module")
def against_quantized(
    tiny_checkpoint: Path, quantized_out: Path, options: EvalOptions, tmp_path_factory: pytest.TempPathFactory
) -> Logged:
    work = tmp_path_factory.mktemp("eval-work")
    events = work.parent / f"{work.name}-events.jsonl"
    with Reporter(events, display="none") as reporter:
        result = evaluate(tiny_checkpoint, quantized_out, DATA, replace(options, work_dir=work), reporter)
    return Logged(result, [json.loads(line) for line in events.read_text().splitlines()], work)


def transformers_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token logits [tokens, vocab] of every position but the last, in float64."""
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    return logits[:, :-1].reshape(-1, logits.shape[-1]).double()


@pytest.fixture(scope="module")
def reference_logits(tiny_checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    return transformers_logits(hf_model(CheckpointReader(tiny_checkpoint)), tokens)


@pytest.fixture(scope="module")
def quantized_logits(quantized_out: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        quantized_out, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32
    )
    model.config._attn_implementation = "eager"
    # transformers leaves decompressed experts in the scale dtype (bf16); compare in float32 throughout.
    return transformers_logits(model.float().eval(), tokens)


def direct_perplexity(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    return math.exp(F.cross_entropy(logits, tokens[:, 1:].reshape(-1)).item())


def direct_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, the textbook way in float64: Σ p log(p / q)."""
    p, q = logits_p.double().softmax(-1), logits_q.double().softmax(-1)
    return (p * (p / q).log()).sum(-1)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# -- perplexity, KL, agreement, layer errors -------------------------------------------------------------------------


def test_perplexity_equals_transformers_on_the_same_tokens(
    against_itself: EvalResult, reference_logits: torch.Tensor, tokens: torch.Tensor
) -> None:
    assert against_itself.tokens == DATA.num_samples * (DATA.seq_len - 1)
    assert rel(against_itself.model.perplexity, direct_perplexity(reference_logits, tokens)) < 1e-3


def test_a_model_against_itself_has_no_divergence(against_itself: EvalResult, tiny_checkpoint: Path) -> None:
    comparison = against_itself.comparison
    assert comparison is not None and against_itself.quantized is not None
    assert against_itself.quantized.nll == against_itself.model.nll
    assert abs(comparison.kl_divergence) <= 1e-7
    assert comparison.top1_agreement == 1.0
    assert comparison.layer_errors == (0.0,) * ModelConfig.load(tiny_checkpoint).num_hidden_layers


def test_a_quantized_model_diverges_exactly_as_transformers_measures_it(
    against_quantized: Logged,
    reference_logits: torch.Tensor,
    quantized_logits: torch.Tensor,
    tokens: torch.Tensor,
    tiny_checkpoint: Path,
) -> None:
    result = against_quantized.result
    comparison, quantized = result.comparison, result.quantized
    assert comparison is not None and quantized is not None
    assert comparison.kl_divergence > 0
    assert comparison.top1_agreement < 1
    assert len(comparison.layer_errors) == ModelConfig.load(tiny_checkpoint).num_hidden_layers
    assert all(error > 0 for error in comparison.layer_errors)

    assert rel(quantized.perplexity, direct_perplexity(quantized_logits, tokens)) < 1e-3
    assert rel(result.model.perplexity, direct_perplexity(reference_logits, tokens)) < 1e-3
    assert rel(comparison.kl_divergence, direct_kl(reference_logits, quantized_logits).mean().item()) < 1e-3
    agree = (reference_logits.argmax(-1) == quantized_logits.argmax(-1)).double().mean().item()
    assert comparison.top1_agreement == pytest.approx(agree, abs=1.5 / result.tokens)


def test_micro_batching_does_not_change_the_perplexity_and_calibration_text_is_never_scored(
    tiny_checkpoint: Path, against_itself: EvalResult
) -> None:
    whole = EvalOptions(device="cpu", dtype="float32", token_budget=1 << 20, logits_budget=1 << 30)
    result = evaluate(tiny_checkpoint, None, replace(DATA, split="calib"), whole)
    assert result.data.split == "eval"
    assert result.quantized is None and result.comparison is None
    assert result.model.perplexity == pytest.approx(against_itself.model.perplexity, rel=1e-6)


# -- the per-chunk sums ----------------------------------------------------------------------------------------------


def test_token_sums_match_a_direct_computation() -> None:
    torch.manual_seed(0)
    p, q = torch.randn(50, 37, dtype=torch.float64) * 3, torch.randn(50, 37, dtype=torch.float64) * 3
    targets = torch.randint(0, 37, (50,))
    sums = token_sums(p.float(), targets, q.float())
    assert sums.tokens == 50
    assert sums.nll == pytest.approx(F.cross_entropy(p, targets, reduction="sum").item(), rel=1e-6)
    assert sums.nll_quantized == pytest.approx(F.cross_entropy(q, targets, reduction="sum").item(), rel=1e-6)
    assert sums.kl == pytest.approx(direct_kl(p, q).sum().item(), rel=1e-6)
    assert sums.agreements == (p.argmax(-1) == q.argmax(-1)).sum().item()
    assert token_sums(p.float(), targets) == TokenSums(tokens=50, nll=sums.nll)


def test_kl_stays_finite_where_probabilities_underflow() -> None:
    torch.manual_seed(1)
    p, q = torch.randn(8, 1000) * 200, torch.randn(8, 1000) * 200
    naive = (p.softmax(-1) * (p.softmax(-1).log() - q.softmax(-1).log())).sum()
    assert not torch.isfinite(naive)  # the premise: float32 softmax underflows to 0 and its log is -inf
    reference = (p.double().log_softmax(-1).exp() * (p.double().log_softmax(-1) - q.double().log_softmax(-1))).sum()
    assert token_sums(p, torch.zeros(8, dtype=torch.long), q).kl == pytest.approx(reference.item(), rel=1e-5)


def test_bfloat16_logits_are_normalised_in_float32() -> None:
    torch.manual_seed(2)
    p, q = (torch.randn(16, 4096) * 4).bfloat16(), (torch.randn(16, 4096) * 4).bfloat16()
    targets = torch.randint(0, 4096, (16,))
    sums = token_sums(p, targets, q)
    assert sums.nll == pytest.approx(F.cross_entropy(p.double(), targets, reduction="sum").item(), rel=1e-5)
    assert sums.kl == pytest.approx(direct_kl(p, q).sum().item(), rel=1e-4)


# -- progress, output, clean-up ----------------------------------------------------------------------------------------


def test_progress_reports_every_block_of_both_models(against_quantized: Logged, tiny_checkpoint: Path) -> None:
    layers = ModelConfig.load(tiny_checkpoint).num_hidden_layers
    stages = [(e["block"], e["stage"]) for e in against_quantized.events if e["event"] == "stage"]
    # The head reads the last block's output and reports as its stage: no block number past the model's.
    expected = [(i, name) for i in range(layers) for name in ("model", "quantized")] + [(layers - 1, HEAD_STAGE)]
    assert stages == expected
    done = [e["rel_error"] for e in against_quantized.events if e["event"] == "block_done"]
    comparison = against_quantized.result.comparison
    assert comparison is not None and tuple(done) == comparison.layer_errors
    assert against_quantized.events[-1]["event"] == "run_end" and against_quantized.events[-1]["status"] == "ok"


def test_the_announced_tokens_are_the_evaluated_tokens_and_the_scored_ones_are_named(
    against_quantized: Logged,
) -> None:
    result = against_quantized.result
    start = next(e for e in against_quantized.events if e["event"] == "run_start")
    assert (result.sequences, result.seq_len) == (DATA.num_samples, DATA.seq_len)
    assert start["calib_tokens"] == result.sequences * result.seq_len  # every block runs on all of them
    assert result.tokens == result.sequences * (result.seq_len - 1)
    scored = f"scored: {result.tokens:,} next-token predictions ({DATA.seq_len - 1} per sequence)"
    assert f"{DATA.num_samples} sequences × {DATA.seq_len} tokens = {start['calib_tokens']:,} tokens" in start["recipe"]
    assert scored in start["recipe"]
    assert scored in result.summary().splitlines()[0]


def test_the_summary_labels_each_blocks_error(against_quantized: Logged) -> None:
    errors = against_quantized.result.comparison.layer_errors
    lines = against_quantized.result.summary().splitlines()
    header = lines.index(
        f"output error after each block, ‖h_q − h‖ / ‖h‖ over all {DATA.num_samples * DATA.seq_len:,} tokens:"
    )
    labelled = " ".join(lines[header + 1 :]).split()
    assert labelled == [word for i, e in enumerate(errors) for word in ("block", str(i), f"{e:.3e}")]


def test_eval_command_prints_labelled_errors_and_no_block_past_the_last(
    tiny_checkpoint: Path, quantized_out: Path
) -> None:
    layers = ModelConfig.load(tiny_checkpoint).num_hidden_layers
    args = ["--num-samples", "2", "--seq-len", "16", "--dtype", "float32", "--device", "cpu", "--display", "plain"]
    cmd = [sys.executable, "-m", "streamq", "eval", str(tiny_checkpoint), str(quantized_out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=streamq_env(), timeout=600, check=True)
    printed = done.stdout + done.stderr  # the plain log lines, then the summary
    assert f"block {layers}" not in printed
    assert f"block {layers - 1}: {HEAD_STAGE}" in printed
    summary = printed[printed.index("(eval split), float32:") :]
    assert "scored: 30 next-token predictions (15 per sequence)" in summary
    assert all(f"block {i} " in summary for i in range(layers))


def test_activation_files_are_deleted_at_the_end(against_quantized: Logged) -> None:
    assert list(against_quantized.work.iterdir()) == []


def test_the_result_is_written_as_strict_json(against_quantized: Logged, tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    against_quantized.result.write_json(path)
    written = json.loads(path.read_text())
    assert written == against_quantized.result.to_dict()
    assert written["comparison"]["layer_errors"] == list(against_quantized.result.comparison.layer_errors)
    assert written["data"]["split"] == "eval"

    diverged = replace(against_quantized.result, model=ModelScore("m", math.inf, math.inf))
    diverged.write_json(path)
    assert json.loads(path.read_text(), parse_constant=reject)["model"]["perplexity"] == "inf"


def reject(constant: str) -> None:
    raise AssertionError(f"{constant} is not standard JSON")


# -- refusals --------------------------------------------------------------------------------------------------------


def linked_copy(source: Path, target: Path, **config_changes: object) -> Path:
    """``source`` with every file linked, except config.json, rewritten with ``config_changes``."""
    target.mkdir()
    for path in source.iterdir():
        if path.is_file() and path.name != "config.json":
            (target / path.name).symlink_to(path)
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **config_changes}))
    return target


def test_a_quantized_model_of_another_model_is_refused(
    tiny_checkpoint: Path, quantized_out: Path, options: EvalOptions, tmp_path: Path
) -> None:
    other = linked_copy(quantized_out, tmp_path / "other", num_hidden_layers=3)
    with pytest.raises(StreamqError, match=r"not made from MODEL.*num_hidden_layers 3 vs 4"):
        evaluate(tiny_checkpoint, other, DATA, options)


def test_an_unfinished_quantization_is_refused(
    tiny_checkpoint: Path, quantized_out: Path, options: EvalOptions, tmp_path: Path
) -> None:
    unfinished = linked_copy(quantized_out, tmp_path / "unfinished")
    manifest = json.loads((quantized_out / MANIFEST_NAME).read_text())
    (unfinished / MANIFEST_NAME).unlink()
    (unfinished / MANIFEST_NAME).write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(StreamqError, match="not a finished quantization"):
        evaluate(tiny_checkpoint, unfinished, DATA, options)


def test_a_full_disk_is_refused_before_any_block_runs(
    tiny_checkpoint: Path, options: EvalOptions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(total=1 << 40, used=1 << 40, free=1024))
    with pytest.raises(StreamqError, match="GiB are free"):
        evaluate(tiny_checkpoint, None, DATA, replace(options, work_dir=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_sequences_of_one_token_are_refused(tiny_checkpoint: Path, options: EvalOptions) -> None:
    with pytest.raises(StreamqError, match="at least 2 tokens"):
        evaluate(tiny_checkpoint, None, replace(DATA, seq_len=1), options)


def test_quantized_from_a_differently_configured_model_warns(
    tiny_checkpoint: Path, quantized_out: Path, options: EvalOptions, tmp_path: Path
) -> None:
    resaved = linked_copy(tiny_checkpoint, tmp_path / "resaved", note="re-saved")
    with pytest.warns(EvalWarning, match=r"config\.json differs"):
        evaluate(resaved, quantized_out, replace(DATA, num_samples=2), options)
