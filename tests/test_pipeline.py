"""`streamq run` end to end on the tiny synthetic model: crash safety, resume, calibration modes, memory."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from streamq.data import DataConfig
from streamq.errors import StreamqError
from streamq.io.safetensors_stream import CheckpointReader
from streamq.memory import plan_memory
from streamq.pipeline import RunOptions, run
from streamq.recipe import Recipe
from streamq.report import REPORT_NAME
from streamq.resume import MANIFEST_NAME
from streamq.tui import EVENTS_FILENAME, Reporter

DATA = DataConfig(num_samples=6, seq_len=32)
OPTIONS = RunOptions(device="cpu", dtype="float32", token_budget=64)
# Files whose content depends on timing, not on the computation.
TIMING_FILES = {EVENTS_FILENAME, REPORT_NAME}


# The default recipe with its output Fisher in 2 chunks of rows instead of 8: the same code path, a quarter of the
# CPU solve's extra cost (at this size each chunk's GPTQ solve is dominated by its per-column loop). ROW_CHUNKS is
# what ``streamq_command`` passes too, so that the CLI runs and ``quantize`` give the same bytes.
ROW_CHUNKS = 2


def quantize(model: Path, out: Path, recipe: Recipe | None = None, options: RunOptions = OPTIONS) -> Path:
    with Reporter(None, display="none") as reporter:
        return run(model, out, recipe or Recipe(data=DATA, row_chunks=ROW_CHUNKS), options, reporter)


def output_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name not in TIMING_FILES}


def report_without_times(out: Path) -> list[dict]:
    blocks = json.loads((out / REPORT_NAME).read_text())["blocks"]
    return [{k: v for k, v in b.items() if k not in ("seconds", "wall_seconds")} for b in blocks]


@pytest.fixture(scope="module")
def reference_out(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize(tiny_checkpoint, tmp_path_factory.mktemp("ref") / "out")


def test_a_complete_output_has_every_file_and_no_work_directory(reference_out: Path) -> None:
    names = {p.name for p in reference_out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", MANIFEST_NAME, REPORT_NAME, "streamq_recipe.json"} <= names
    assert ".streamq" not in names
    manifest = json.loads((reference_out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True
    index = json.loads((reference_out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {r["file"] for r in manifest["shards"].values()}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_only_methods_that_need_statistics_run_calibration_passes(
    method: str, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamq.block_solve

    passes = []
    real_pass = streamq.block_solve.calibration_pass
    monkeypatch.setattr(
        streamq.block_solve, "calibration_pass", lambda *args: passes.append(args[4]) or real_pass(*args)
    )
    quantize(tiny_checkpoint, tmp_path / "out", Recipe(data=DATA, method=method))
    # RTN needs no statistics: not one pass over the activations (GPTQ makes at least one per MoE block).
    assert (len(passes) > 0) == (method != "rtn")


def test_shards_are_hashed_as_written_not_read_back(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest's checksums come from the bytes the writer produced (in the background, overlapped with
    propagation), and they are the files' SHA-256, which resume verifies."""
    import streamq.resume

    def read_back(path: Path, chunk: int = 0) -> str:
        raise AssertionError(f"{path} was read back to hash it")

    monkeypatch.setattr(streamq.resume, "sha256_file", read_back)
    out = quantize(tiny_checkpoint, tmp_path / "out")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    shards = manifest["shards"]
    assert len(shards) == manifest["total_shards"] == 1 + 4 + 1  # head, 4 blocks, the MTP layer
    for record in shards.values():
        assert record["sha256"] == hashlib.sha256((out / record["file"]).read_bytes()).hexdigest()


# -- crash safety ---------------------------------------------------------------------------------------------

# Fault point -> the first unfinished block the killed run must have left in its manifest. The tiny model has
# 2 dense then 2 MoE blocks; 6 samples at 2 per micro-batch make 3 micro-batches per pass.
CRASH_POINTS = {
    "write:1": 0,  # inside the first shard (embeddings, norm, lm_head), before the activations exist
    "fisher:1": 0,  # in the output Fisher pre-pass, after the first layer's estimate is saved
    "propagate:3": 0,  # writing the first block's output activations, between micro-batches
    "calibrate:2": 2,  # in the middle of the first MoE block's calibration pass
    "solve:2": 2,  # between two solver calls of the first MoE block
    "write:60": 2,  # in the middle of writing the first MoE block's shard
    "block-done:3": 3,  # between blocks, right after the third block's manifest update
}


def streamq_run(
    model: Path, out: Path, crash: str | None, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STREAMQ_CRASH_AT": crash or ""}
    cmd = [*streamq_command(model, out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def streamq_command(model: Path, out: Path) -> list[str]:
    """`streamq run` with the options of ``quantize``, in plain display mode."""
    args = ["--num-samples", str(DATA.num_samples), "--seq-len", str(DATA.seq_len), "--dtype", "float32"]
    args += ["--row-chunks", str(ROW_CHUNKS)]
    return [
        sys.executable,
        "-m",
        "streamq",
        "run",
        str(model),
        str(out),
        *args,
        "--device",
        "cpu",
        "--token-budget",
        str(OPTIONS.token_budget),
        "--display",
        "plain",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_killed_run_resumes_to_identical_bytes(
    crash: str, tiny_checkpoint: Path, reference_out: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    killed = streamq_run(tiny_checkpoint, out, crash)
    assert killed.returncode == -9, f"the fault point {crash} was not reached:\n{killed.stderr[-2000:]}"
    assert json.loads((out / MANIFEST_NAME).read_text())["next_layer"] == CRASH_POINTS[crash]
    assert not (out / "config.json").exists() and not (out / "model.safetensors.index.json").exists()
    if crash.startswith("write"):
        assert list(out.glob(".model-*.tmp-*")), "the kill should have left a half-written shard"
    resumed = streamq_run(tiny_checkpoint, out, None)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert output_files(out) == output_files(reference_out)
    assert report_without_times(out) == report_without_times(reference_out)


# With the activations kept on the device (here the CPU's memory), a block is recorded only once the next block's
# input has reached its file, during the next block's first pass: a kill inside that pass resumes one block
# earlier than with the activations on disk (calibrate:2), the others where they did.
KEPT_CRASH_POINTS = {"propagate:3": 0, "calibrate:2": 1, "block-done:3": 3}


@pytest.mark.slow
@pytest.mark.parametrize("crash", KEPT_CRASH_POINTS)
def test_activations_kept_on_the_device_give_the_same_bytes_and_resume_exactly(
    crash: str, tiny_checkpoint: Path, reference_out: Path, tmp_path: Path
) -> None:
    out, kept = tmp_path / "out", ("--activations", "device")
    killed = streamq_run(tiny_checkpoint, out, crash, kept)
    assert killed.returncode == -9, f"the fault point {crash} was not reached:\n{killed.stderr[-2000:]}"
    assert json.loads((out / MANIFEST_NAME).read_text())["next_layer"] == KEPT_CRASH_POINTS[crash]
    assert "activations kept" in killed.stdout.splitlines()[0]
    resumed = streamq_run(tiny_checkpoint, out, None, kept)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert output_files(out) == output_files(reference_out)  # reference_out: activations on disk
    assert report_without_times(out) == report_without_times(reference_out)


def test_sigterm_stops_cleanly_with_an_interrupted_event_and_resumes_to_identical_bytes(
    tiny_checkpoint: Path, reference_out: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cmd = streamq_command(tiny_checkpoint, out)
    env = {**os.environ, "STREAMQ_CRASH_AT": ""}
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:  # plain mode: one line per event, flushed
            if "block 2: calibrate" in line:  # inside the first MoE block
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    assert f"streamq: terminated (SIGTERM); rerun the same command to resume {out}" in err
    events = [json.loads(line) for line in (out / EVENTS_FILENAME).read_text().splitlines()]
    assert events[-1]["event"] == "run_end" and events[-1]["status"] == "interrupted"
    assert "run interrupted: 2 blocks done" in rest
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["next_layer"] == 2 and not manifest["complete"]
    assert not (out / "config.json").exists()
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert output_files(out) == output_files(reference_out)


def test_a_different_recipe_is_refused(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv("STREAMQ_CRASH_AT", "")
    quantize(tiny_checkpoint, out, Recipe(data=DATA, method="rtn"))
    # The message names what changed (e.g. a default that moved between versions): the options that resume it.
    gptq = Recipe(data=DATA, method="gptq", fisher_tokens=0)  # the output Fisher would be named too (GPTQ only)
    with pytest.raises(StreamqError, match=r"different recipe: method saved rtn, now gptq \(see .*streamq_recipe"):
        quantize(tiny_checkpoint, out, gptq)
    later = Recipe(data=DATA, method="rtn", solver=replace(Recipe().solver, code_rounds=3))
    with pytest.raises(StreamqError, match=r"different recipe: solver.code_rounds saved 2, now 3 \(see"):
        quantize(tiny_checkpoint, out, later)


def test_an_unrelated_directory_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(StreamqError, match=r"is not empty and has no streamq_manifest\.json"):
        quantize(tiny_checkpoint, tmp_path, Recipe(data=DATA, method="rtn"))


@pytest.mark.slow
def test_disk_full_stops_cleanly_and_resumes(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamq.io.safetensors_write as writer

    out, recipe = tmp_path / "out", Recipe(data=DATA, method="rtn")
    real_write = writer._write_tensor
    calls = {"n": 0}

    def full_disk(f, spec, chunks, digest):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(28, "No space left on device")
        return real_write(f, spec, chunks, digest)

    monkeypatch.setattr(writer, "_write_tensor", full_disk)
    with pytest.raises(StreamqError, match=r"disk full while writing; free space on .* and rerun to resume"):
        quantize(tiny_checkpoint, out, recipe)
    finished = json.loads((out / MANIFEST_NAME).read_text())["shards"]
    assert finished and not (out / "config.json").exists()
    assert not list(out.glob(".*.tmp-*"))
    monkeypatch.setattr(writer, "_write_tensor", real_write)
    quantize(tiny_checkpoint, out, recipe)
    assert output_files(out) == output_files(quantize(tiny_checkpoint, tmp_path / "clean", recipe))


# -- calibration modes ----------------------------------------------------------------------------------------


def solve_with(tiny_checkpoint: Path, out: Path, **recipe_fields) -> list[dict]:
    quantize(tiny_checkpoint, out, Recipe(data=DATA, **{"row_chunks": ROW_CHUNKS, **recipe_fields}))
    return [b for b in json.loads((out / REPORT_NAME).read_text())["blocks"] if b["kind"] == "moe"]


def test_all_expert_calibration_gives_every_expert_every_token(tiny_checkpoint: Path, tmp_path: Path) -> None:
    routed = solve_with(tiny_checkpoint, tmp_path / "routed", calibration="routed")
    everyone = solve_with(tiny_checkpoint, tmp_path / "all", calibration="all")
    tokens = DATA.num_samples * DATA.seq_len
    for r, a in zip(routed, everyone, strict=True):
        assert a["tokens_hessian"]["min"] == a["tokens_hessian"]["max"] == tokens
        assert r["tokens_hessian"] == r["tokens_routed"] and r["tokens_routed"]["max"] < tokens
    # The first MoE block reads the same activations in both runs: its real routing is untouched by the mode.
    # (Later blocks differ because the previous block was quantized differently.)
    assert everyone[0]["tokens_routed"] == routed[0]["tokens_routed"]


def test_hybrid_tops_up_only_starved_experts(tiny_checkpoint: Path, tmp_path: Path) -> None:
    routed = solve_with(tiny_checkpoint, tmp_path / "routed", calibration="routed")
    median = int(routed[0]["tokens_routed"]["median"])
    hybrid = solve_with(tiny_checkpoint, tmp_path / "hybrid", calibration="hybrid", min_tokens=median)
    tokens = DATA.num_samples * DATA.seq_len
    assert hybrid[0]["tokens_hessian"]["min"] >= median
    assert hybrid[0]["tokens_hessian"]["max"] == tokens
    assert hybrid[0]["tokens_hessian"]["median"] < tokens  # experts at or above the minimum keep their own tokens


@pytest.mark.slow
def test_chunked_expert_passes_and_untied_gate_up_give_the_same_bytes(
    tiny_checkpoint: Path, reference_out: Path, tmp_path: Path
) -> None:
    one_expert_per_pass = replace(OPTIONS, hessian_budget=1)
    chunked = quantize(tiny_checkpoint, tmp_path / "chunked", options=one_expert_per_pass)
    untied = quantize(tiny_checkpoint, tmp_path / "untied", Recipe(data=DATA, tie_gate_up=False, row_chunks=ROW_CHUNKS))
    shards = {k: v for k, v in output_files(reference_out).items() if k.startswith("model-")}
    assert {k: v for k, v in output_files(chunked).items() if k.startswith("model-")} == shards
    assert {k: v for k, v in output_files(untied).items() if k.startswith("model-")} == shards


@pytest.mark.slow
def test_later_expert_passes_start_from_the_moe_inputs_kept_on_the_device(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one expert per pass, only each MoE block's first pass reads the block's input and runs its attention
    when the plan keeps the MoE inputs; the bytes are those of recomputing them every pass."""
    import streamq.block_solve
    import streamq.memory

    full_passes: list[object] = []
    real_pass = streamq.block_solve.calibration_pass
    monkeypatch.setattr(
        streamq.block_solve, "calibration_pass", lambda *args: full_passes.append(args[4]) or real_pass(*args)
    )
    one_expert_per_pass = replace(OPTIONS, hessian_budget=1)
    kept = quantize(tiny_checkpoint, tmp_path / "kept", options=one_expert_per_pass)
    kept_passes = len(full_passes)
    full_passes.clear()
    monkeypatch.setattr(streamq.memory, "CACHE_SHARE", 0.0)
    recomputed = quantize(tiny_checkpoint, tmp_path / "recomputed", options=one_expert_per_pass)
    assert kept_passes == 2 < len(full_passes)  # one per MoE block, against one per expert
    plans = [json.loads((out / REPORT_NAME).read_text())["memory_plan"] for out in (kept, recomputed)]
    assert plans[0]["cache_bytes"] > 0 == plans[1]["cache_bytes"]
    shards = {k: v for k, v in output_files(recomputed).items() if k.startswith("model-")}
    assert {k: v for k, v in output_files(kept).items() if k.startswith("model-")} == shards


def test_the_moe_inputs_are_kept_only_within_half_the_solvers_share() -> None:
    cpu = torch.device("cpu")
    budget = 8 << 30
    solver_share = budget - int(budget * 0.375)
    fits = plan_memory(cpu, 0, budget, moe_input_bytes=solver_share // 2)
    assert fits.cache_bytes == solver_share // 2 and fits.solver_bytes == solver_share - solver_share // 2
    too_big = plan_memory(cpu, 0, budget, moe_input_bytes=solver_share // 2 + 1)
    assert too_big.cache_bytes == 0 and too_big.solver_bytes == solver_share
    for plan in (fits, too_big):
        assert plan.budget == plan.hessian_bytes + plan.solver_bytes + plan.cache_bytes
    assert "MoE inputs kept 2.5 GiB" in fits.describe() and "MoE inputs not kept" in too_big.describe()


# -- the output loads ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compressed_tensors_decompresses_every_quantized_weight_as_streamq_reads_it(reference_out: Path) -> None:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    reader = CheckpointReader(reference_out)
    qcfg = json.loads((reference_out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qcfg).config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qcfg["format"])
    cfg = reader.config
    expected = cfg.n_routed_experts * 3 * sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert len(reader.packed) == expected
    for name in sorted(reader.packed):
        module = name.removesuffix(".weight")
        parts = {n.removeprefix(module + "."): reader.raw(n) for n in reader.names(module + ".weight_")}
        theirs = compressor.decompress(parts, scheme)["weight"]
        assert torch.equal(theirs, reader.weight(name, dtype=theirs.dtype)), name


@pytest.mark.slow
@pytest.mark.parametrize("unquantized", ["bf16", "fp8"])
def test_transformers_loads_the_output_and_matches_streamqs_simulated_forward(
    unquantized: str, reference_out: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from streamq.model.deepseek import forward_blocks

    if unquantized == "fp8":  # attention, shared experts and dense MLPs keep DeepSeek's FP8 blocks
        fp8 = Recipe(data=DATA, unquantized="fp8", row_chunks=ROW_CHUNKS)
        reference_out = quantize(tiny_checkpoint, tmp_path / "fp8", fp8)
        kept = CheckpointReader(reference_out).raw("model.layers.0.self_attn.q_a_proj.weight")
        assert kept.dtype == torch.float8_e4m3fn
    torch.manual_seed(0)
    reader = CheckpointReader(reference_out)
    ids = torch.randint(0, reader.config.vocab_size, (2, 24))
    ours = forward_blocks(reader, ids, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        reference_out, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float32
    )
    model.config._attn_implementation = "eager"
    model.float()  # transformers leaves decompressed experts in the scale dtype (bf16)
    with torch.no_grad():
        theirs = model(input_ids=ids).logits.float()
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-2


# -- memory ----------------------------------------------------------------------------------------------------

RSS_SCRIPT = """
import json, math, resource, sys
from pathlib import Path
from streamq.data import DataConfig
from streamq.io.safetensors_stream import CheckpointReader
from streamq.memory import plan_memory
from streamq.pipeline import RunOptions, run
from streamq.recipe import Recipe
from streamq.tui import Reporter

model, out, samples, seq_len, budget = Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:6])
reader = CheckpointReader(model)
layers = range(reader.config.num_hidden_layers)
names = [[n for n in reader.names(reader.layer_prefix(i)) if not n.endswith("_scale_inv")] for i in layers]
block_bf16 = max(sum(math.prod(reader.infos[n].shape) * 2 for n in layer) for layer in names)
del reader
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # streamq, torch and the index imported
with Reporter(None, display="none") as reporter:
    run(model, out, Recipe(data=DataConfig(num_samples=samples, seq_len=seq_len), row_chunks=2),
        RunOptions(device="cpu", dtype="bfloat16", token_budget=budget), reporter)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak, "block_bf16": block_bf16, "layers": len(layers)}))
"""


@pytest.mark.slow
def test_peak_host_memory_stays_about_one_block(tmp_path: Path) -> None:
    from streamq.synth import SynthOptions, write_synthetic_checkpoint

    # Many small experts: blocks of ~200 MB (so that holding all 6 would break the bound) that solve quickly. Six
    # blocks, not eight: the default recipe's refinements make a CPU solve of the down projections ~4x the sweep's,
    # and smaller blocks do not shrink the run's fixed memory (the bound would no longer hold them apart). The
    # output Fisher's pre-pass runs (its memory is in the peak), its row chunks 2 rather than 8 (CPU time).
    overrides = {
        "hidden_size": 512,
        "moe_intermediate_size": 512,
        "intermediate_size": 1024,
        "n_routed_experts": 128,
        "num_hidden_layers": 6,
        "first_k_dense_replace": 1,
        "vocab_size": 1024,
    }
    model = write_synthetic_checkpoint(tmp_path / "m", SynthOptions(overrides=overrides, mtp=False))
    samples, seq_len, budget = 8, 256, 512
    args = [str(model), str(tmp_path / "out"), str(samples), str(seq_len), str(budget)]
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    chunk = budget * overrides["hidden_size"] * 2
    assert stats["layers"] >= 6
    # What the run may hold at once, measured from the RSS after imports: the loaded block, the CPU memory plan's
    # budget for Hessians and solver workspace (2 blocks, memory.py), the block's packed output and one activation
    # chunk, plus 256 MiB for the allocator. Holding every block (6 × block) breaks it; so would keeping the
    # activations in RAM. (Measured on 2 cores: 3.8–4.1 blocks.)
    allowed = 4 * stats["block_bf16"] + chunk + 256 * 2**20
    assert stats["peak"] - stats["base"] < allowed < stats["layers"] * stats["block_bf16"], stats


def test_activations_are_kept_on_a_gpu_only_within_their_share_of_the_solvers() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a budget given: no device is asked for its memory
    budget = 8 << 30
    solver_share = budget - int(budget * 0.375)
    room = int(solver_share * 0.65)
    fits = plan_memory(cuda, 0, budget, activation_bytes=room)
    assert fits.resident_bytes == room and fits.solver_bytes == solver_share - room
    assert "activations kept 3.2 GiB" in fits.describe()
    assert plan_memory(cuda, 0, budget, activation_bytes=room + 1).resident_bytes == 0
    assert plan_memory(cuda, 0, budget, activation_bytes=room, activations="disk").resident_bytes == 0
    assert plan_memory(cpu, 0, budget, activation_bytes=room).resident_bytes == 0  # the CPU: disk unless asked
    assert plan_memory(cpu, 0, budget, activation_bytes=room, activations="device").resident_bytes == room
    # What the kept activations leave of the solver's share is the MoE-input cache's to take, by its rule.
    both = plan_memory(cuda, 0, budget, moe_input_bytes=(solver_share - room) // 2, activation_bytes=room)
    assert both.cache_bytes == (solver_share - room) // 2
    assert both.budget == both.hessian_bytes + both.solver_bytes + both.cache_bytes + both.resident_bytes


def test_the_memory_plan_is_shown_at_the_start_and_kept_in_the_report(tiny_checkpoint: Path, tmp_path: Path) -> None:
    shown = io.StringIO()
    with Reporter(None, display="plain", stream=shown) as reporter:
        run(tiny_checkpoint, tmp_path / "out", Recipe(data=DATA, method="rtn"), OPTIONS, reporter)
    start = shown.getvalue().splitlines()[0]
    assert "streamq: " in start and "| memory plan: " in start and "experts per solver call" in start, start
    plan = json.loads((tmp_path / "out" / REPORT_NAME).read_text())["memory_plan"]
    assert plan["budget"] == plan["hessian_bytes"] + plan["solver_bytes"] + plan["cache_bytes"] > 0
    assert plan["resident_bytes"] == 0  # the CPU keeps the activations on disk unless told otherwise


@pytest.mark.parametrize("extra", [(), ("--scope", "all")], ids=["experts", "all"])
def test_no_block_shows_the_same_stage_twice_in_a_row(
    tiny_checkpoint: Path, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    """Each stage event names new work: a GPTQ block has no trailing unlabelled 'solve' after its last pass."""
    recipe = Recipe(data=DATA, scope="all" if extra else "experts", row_chunks=ROW_CHUNKS)
    events_path = tmp_path / "events.jsonl"
    with Reporter(events_path, display="none") as reporter:
        run(tiny_checkpoint, tmp_path / "out", recipe, OPTIONS, reporter)
    stages: dict[int, list[tuple[str, int | None]]] = {}
    for line in events_path.read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "stage":
            stages.setdefault(event["block"], []).append((event["stage"], event.get("step")))
    assert len(stages) == 4
    for block, seen in stages.items():
        names = [name for name, _ in seen]  # passes alternate calibrate / solve: no name repeats
        assert all(a != b for a, b in itertools.pairwise(names)), (block, seen)
        assert seen[-2:] == [("write", None), ("propagate", None)], (block, seen)


def test_the_automatic_gpu_budget_leaves_room_for_the_block_and_its_packed_output(monkeypatch) -> None:
    from streamq import memory

    gpu, block = torch.device("cuda:0"), 22 << 30  # a DeepSeek-V3 MoE block in bf16
    monkeypatch.setattr(memory, "_device_budget", lambda device: 64 << 30)  # 80% of an 80 GB card's free memory
    plan = plan_memory(gpu, block)
    assert plan.budget == (64 << 30) - int(block * memory.RESIDENT_BLOCKS)
    assert plan_memory(gpu, block, budget=50 << 30).budget == 50 << 30  # a budget given is taken as given
    monkeypatch.setattr(memory, "_device_budget", lambda device: 30 << 30)
    with pytest.raises(StreamqError, match=r"cuda:0: 30\.0 GiB of free memory is usable, but a block and its packed"):
        plan_memory(gpu, block)
