"""streamq against llm-compressor's GPTQ on the trained fixture, same tokens in, same scorer out, several seeds.

    PYTHONPATH=$PWD python3 bench/peers.py --work /tmp/peers       # the table in bench/RESULTS.md (~1 h on 2 cores)
    python3 bench/peers.py --setup-venv /tmp/peers-venv      # only llm-compressor's virtualenv (the run makes it too)
    PYTHONPATH=$PWD python3 bench/peers.py --work /tmp/peers --streamq-variants default legacy gptaq --llmc-dtypes

``--streamq-variants`` runs streamq recipes other than its default (``VARIANTS``: the earlier defaults, the scale
searches, least-squares scales, a float target, router weighting, damping, code descent, scale candidates);
``--llmc-dtypes`` with no value skips llm-compressor. ``--eval-offset 128`` scores the next 128 held-out windows
instead of the reported ones: the split hyper-parameters are chosen on (bench/RESULTS.md, issue 13).

llm-compressor is never installed next to streamq: the first run that needs it (or ``--setup-venv``) creates
``--venv`` (network for pip only), a virtualenv with the CPU build of
torch 2.13.0 (installed first, so llm-compressor does not pull a CUDA build) and ``llmcompressor==0.14.0.1``, and
``bench/peers_llmcompressor.py`` runs inside it as a subprocess. What each tool is given:

- calibration: for seed s, the token ids ``streamq.data.load_token_batches`` cuts from the first 90% of Tiny
  Shakespeare with ``DataConfig(seed=s)``; streamq reads them itself through the same function and config, and
  llm-compressor gets that very tensor (checked equal here), no shuffling, one window per sample.
- model: streamq reads the FP8 fixture as shipped; llm-compressor cannot load 128x128 FP8 blocks on a CPU, so it
  gets a de-FP8'd copy (each weight dequantized with its block scales in float32, per-expert tensor names, no
  quantization_config) loaded as transformers' ``DeepseekV3ForCausalLM`` in ``--llmc-dtype``.
- scope: routed experts only (streamq's default scope), symmetric int, group 128, activation order by the
  Hessian diagonal with natural groups, damping 0.01: llm-compressor's GPTQ defaults equal streamq's here.

Scoring is shared: one float32 transformers ``DeepseekV3ForCausalLM`` holding the fixture's weights (FP8 blocks
dequantized in float32) is the source; for each result its routed experts are overwritten with that tool's
dequantized weights (streamq's through ``CheckpointReader``, llm-compressor's from its own module weights and
scales) and the same held-out windows (the first ``--eval-samples`` windows of the last 10%, as
``streamq eval`` cuts them) are scored with ``streamq.evaluate.token_sums``: KL(source ‖ quantized) per token,
top-1 agreement and perplexity. Results are cached in ``--work`` (delete a file to redo it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from streamq.config import ModelConfig
from streamq.data import DataConfig, load_token_batches
from streamq.evaluate import TokenSums, token_sums
from streamq.io.packed import dequantize_packed
from streamq.io.safetensors_stream import CheckpointReader
from streamq.pipeline import RunOptions, run
from streamq.recipe import DOWN_REFINED, Recipe, default_solver
from streamq.solvers.scheme import QuantScheme, SolverConfig
from streamq.tui import Reporter

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "tiny-moe-shakespeare"
# The shared fixtures sit next to the main checkout (../shared) or two levels up from a worktree (/work/wt/NAME).
TEXT = next(
    (p for p in (d / "shared" / "fixtures" / "text" / "tinyshakespeare.txt" for d in REPO.parents) if p.is_file()),
    Path("tinyshakespeare.txt"),
)
LLMC_VERSION = "0.14.0.1"
TORCH_VERSION = "2.13.0"
WORKER = Path(__file__).resolve().parent / "peers_llmcompressor.py"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class PeerRecipe:
    name: str
    method: str  # "gptq" or "rtn"
    bits: int
    all_experts: bool = False  # every token into every expert's Hessian (llm-compressor's default)

    @property
    def seeded(self) -> bool:
        return self.method != "rtn"  # RTN uses no calibration data: one run, no spread


RECIPES = {
    "rtn-w4": PeerRecipe("RTN W4 g128", "rtn", 4),
    "gptq-w4": PeerRecipe("GPTQ W4 g128 routed", "gptq", 4),
    "gptq-w3": PeerRecipe("GPTQ W3 g128 routed", "gptq", 3),
    "gptq-w4-all": PeerRecipe("GPTQ W4 g128 all-expert", "gptq", 4, all_experts=True),
}


# streamq recipe variants (``--streamq-variants``, bench/RESULTS.md "issue 13"): "default" is the default recipe;
# every other one is spelled out in full over SolverConfig()'s fields (min-max scales, no refinement), so that a
# later change of the default leaves it, and its cached results, alone.
_MINMAX = {"observer": "minmax"}
_MSE80 = {"observer": "mse", "mse_grid": 100, "mse_max_shrink": 0.8}  # the MSE observer's own 80 ratios
_HMSE80 = {**_MSE80, "mse_hessian": True}
_MSE_FINE = {"observer": "mse", "mse_grid": 100, "mse_max_shrink": 0.2}  # issue 13's first default: 1.00 .. 0.81
VARIANTS: dict[str, dict[str, dict]] = {
    "default": {},  # default_solver(), whatever it is
    "legacy": {"solver": _MINMAX},  # the default before issue 13
    "mse16": {"solver": {"observer": "mse", "mse_grid": 40, "mse_max_shrink": 0.4}},  # 1.000, 0.975, ... 0.625
    "mse": {"solver": _MSE80},
    "mse20": {"solver": {"observer": "mse", "mse_grid": 20, "mse_max_shrink": 0.8}},
    "mse-fine": {"solver": _MSE_FINE},
    "damp001": {"solver": {**_MSE_FINE, "damp": 0.001}},
    "damp003": {"solver": {**_MSE_FINE, "damp": 0.003}},
    "damp03": {"solver": {**_MSE_FINE, "damp": 0.03}},
    "damp1": {"solver": {**_MSE_FINE, "damp": 0.1}},
    "cd1": {"solver": {**_MSE_FINE, "code_rounds": 1}},
    "cd2": {"solver": {**_MSE_FINE, "code_rounds": 2}},
    "cd4": {"solver": {**_MSE_FINE, "code_rounds": 4}},
    "sc3": {"solver": {**_MSE_FINE, "scale_candidates": (0.94, 0.97, 1.03)}},
    "sc3-cd2": {"solver": {**_MSE_FINE, "scale_candidates": (0.94, 0.97, 1.03), "code_rounds": 2}},
    "sc2-cd2": {"solver": {**_MSE_FINE, "scale_candidates": (0.96, 1.04), "code_rounds": 2}},
    "sc2-cd1": {"solver": {**_MSE_FINE, "scale_candidates": (0.95, 1.03), "code_rounds": 1}},
    # Six candidates and two rounds on the down projections alone (the default since issue 13's third round).
    "down6": {"solver": {**_MSE_FINE, **DOWN_REFINED}, "recipe": {"refine": "down"}},
    # down6 with the code descent's output errors across each down projection's column space weighted 0.4.
    "down6-ow4": {"solver": {**_MSE_FINE, **DOWN_REFINED, "outside_weight": 0.4}, "recipe": {"refine": "down"}},
    "down8": {
        "solver": {**_MSE_FINE, "scale_candidates": (0.85, 0.88, 0.91, 0.94, 0.97, 1.03, 1.06, 1.09), "code_rounds": 2},
        "recipe": {"refine": "down"},
    },
    "hmse": {"solver": _HMSE80},
    "ls": {"solver": {**_MINMAX, "scale_rounds": 1}},
    "mse-ls": {"solver": {**_MSE80, "scale_rounds": 1}},
    "hmse-ls": {"solver": {**_HMSE80, "scale_rounds": 1}},
    "hmse-ls2": {"solver": {**_HMSE80, "scale_rounds": 2}},
    "gptaq": {"recipe": {"target": "float"}, "solver": _MINMAX},
    "gptaq-mse": {"recipe": {"target": "float"}, "solver": _MSE80},
    "gptaq-hmse-ls": {"recipe": {"target": "float"}, "solver": {**_HMSE80, "scale_rounds": 1}},
    "rw": {"recipe": {"router_weighted": True}, "solver": _MINMAX},
    "rw-mse": {"recipe": {"router_weighted": True}, "solver": _MSE80},
    "rw-hmse-ls": {"recipe": {"router_weighted": True}, "solver": {**_HMSE80, "scale_rounds": 1}},
    "all": {"recipe": {"router_weighted": True, "target": "float"}, "solver": {**_MSE80, "scale_rounds": 1}},
    "all-h": {"recipe": {"router_weighted": True, "target": "float"}, "solver": {**_HMSE80, "scale_rounds": 1}},
}


@dataclass(frozen=True)
class Tool:
    name: str  # "streamq" or "llm-compressor"
    dtype: str  # compute dtype of the calibration forwards
    variant: str = "default"  # streamq only: a key of VARIANTS

    @property
    def label(self) -> str:
        label = f"{self.name} {'bf16' if self.dtype == 'bfloat16' else 'fp32'}"
        return label if self.variant == "default" else f"{label} {self.variant}"

    @property
    def slug(self) -> str:
        """The cache name: streamq's always names its variant, so that results cached before a change of the
        default recipe are not read as the new default's."""
        label = self.label if self.name != "streamq" or self.variant != "default" else f"{self.label} default"
        return label.replace(" ", "-")


# -- llm-compressor's environment -----------------------------------------------------------------------------------


def setup_venv(venv: Path) -> None:
    """A virtualenv of its own, torch first so that llm-compressor's torch requirement is met by it: where pip
    finds no local CPU wheel, run with PIP_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU build."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, f"llmcompressor=={LLMC_VERSION}"], check=True)


def venv_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{venv}: no virtualenv; create it with: python3 bench/peers.py --setup-venv {venv}")
    return python


# -- inputs ---------------------------------------------------------------------------------------------------------


def write_source_copy(model: Path, out: Path) -> Path:
    """The fixture with every FP8 weight dequantized (float32, block scales applied) under its own name, and the
    quantization_config removed: a checkpoint transformers loads on a CPU."""
    from safetensors.torch import save_file

    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with CheckpointReader(model) as reader:
        names = [n for n in reader.infos if not n.endswith("_scale_inv")]
        state = {n: reader.weight(n, dtype=torch.float32).contiguous() for n in names}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model / name).is_file():
            (out / name).write_bytes((model / name).read_bytes())
    return out


def calibration_config(args: argparse.Namespace, seed: int) -> DataConfig:
    return DataConfig(source=str(args.text), num_samples=args.calib_samples, seq_len=args.seq_len, seed=seed)


def calibration_ids(args: argparse.Namespace, seed: int) -> Path:
    path = args.work / f"calib-{args.calib_samples}x{args.seq_len}-seed{seed}.pt"
    if not path.is_file():
        torch.save(load_token_batches(calibration_config(args, seed), args.model), path)
    return path


# -- the two tools --------------------------------------------------------------------------------------------------


def expert_names(cfg: ModelConfig) -> Iterator[str]:
    for layer in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(layer):
            for expert in range(cfg.n_routed_experts):
                for proj in PROJECTIONS:
                    yield f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def run_streamq(args: argparse.Namespace, recipe: PeerRecipe, tool: Tool, seed: int, out: Path) -> float:
    """Quantize with streamq's own pipeline, then keep only the dequantized expert weights (float32)."""
    from safetensors.torch import save_file

    overrides = VARIANTS[tool.variant]
    base = default_solver() if tool.variant == "default" else replace(SolverConfig(), **overrides.get("solver", {}))
    streamq_recipe = Recipe(
        method=recipe.method,
        calibration="all" if recipe.all_experts else "routed",
        solver=replace(base, scheme=QuantScheme(bits=recipe.bits, group_size=128)),
        data=calibration_config(args, seed),
        # Spelled-out variants refine every Linear unless they say otherwise, as before ``refine`` existed.
        **({} if tool.variant == "default" else {"refine": "all", **overrides.get("recipe", {})}),
    )
    ckpt = args.work / "streamq-out" / out.stem
    start = time.perf_counter()
    with Reporter(None, display="none") as reporter:
        run(args.model, ckpt, streamq_recipe, RunOptions(device="cpu", dtype=tool.dtype), reporter)
    seconds = time.perf_counter() - start
    with CheckpointReader(ckpt) as reader:
        tensors = {n: exact_dequant(reader, n) for n in expert_names(reader.config)}
    save_file(tensors, str(out), metadata={"seconds": f"{seconds:.1f}"})
    return seconds


def exact_dequant(reader: CheckpointReader, name: str) -> torch.Tensor:
    """codes × scale in float32: the exact quantized weight (the reader's bf16 product, as vLLM computes it,
    rounds q·s again, and llm-compressor's weights are scored as exact products too)."""
    zero = name + "_zero_point"
    return dequantize_packed(
        reader.raw(name + "_packed"),
        reader.raw(name + "_scale").float(),
        reader.raw(name + "_shape"),
        reader.raw(zero) if zero in reader.infos else None,
        reader.packed_bits or 4,
        torch.float32,
    ).contiguous()


def run_llmcompressor(args: argparse.Namespace, recipe: PeerRecipe, tool: Tool, seed: int, out: Path) -> float:
    command = [
        str(venv_python(args.venv)),
        str(WORKER),
        "--model",
        str(args.work / "source-hf"),
        "--calib",
        str(calibration_ids(args, seed)),
        "--out",
        str(out),
        "--method",
        recipe.method,
        "--bits",
        str(recipe.bits),
        "--dtype",
        tool.dtype,
        "--threads",
        str(args.threads),
        *(["--all-experts"] if recipe.all_experts else []),
    ]
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with log.open("w") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"llm-compressor failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def quantized_experts(args: argparse.Namespace, recipe: PeerRecipe, tool: Tool, seed: int) -> Path:
    out = args.work / "experts" / f"{tool.slug}-{recipe.method}-w{recipe.bits}{'-all' if recipe.all_experts else ''}"
    out = out.with_name(out.name + (f"-seed{seed}" if recipe.seeded else "") + ".safetensors")
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    runner = run_streamq if tool.name == "streamq" else run_llmcompressor
    seconds = runner(args, recipe, tool, seed, out)
    print(f"  {tool.label:<22} {recipe.name:<26} seed {seed}: quantized in {seconds:.0f} s", flush=True)
    return out


# -- the shared scorer ----------------------------------------------------------------------------------------------


class Scorer:
    """transformers' DeepseekV3ForCausalLM in float32 with the source weights; ``score`` swaps in a result's routed
    experts, scores the held-out windows against the source's log-probabilities, and swaps the source back."""

    def __init__(self, source_hf: Path, windows: torch.Tensor, batch: int) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(source_hf, dtype=torch.float32).eval()
        self.windows, self.batch = windows, batch
        self.source = [self._logits(chunk) for chunk in windows.split(batch)]
        self.original = {n: t.clone() for n, t in self._experts().items()}

    def _experts(self) -> dict[str, torch.Tensor]:
        return {n: p.data for n, p in self.model.named_parameters() if ".mlp.experts." in n and n.endswith("_proj")}

    @torch.no_grad()
    def _logits(self, chunk: torch.Tensor) -> torch.Tensor:
        return self.model(chunk).logits[:, :-1].flatten(0, 1).float()

    @torch.no_grad()
    def _install(self, weights: dict[str, torch.Tensor]) -> None:
        """Per-expert weights into transformers' fused tensors: gate_up_proj [E, 2I, H] (gate rows first) and
        down_proj [E, H, I]."""
        fused = self._experts()
        for name, weight in weights.items():
            if not name.endswith(".weight") or ".experts." not in name:
                continue
            layer_experts, expert, proj = name.removesuffix(".weight").rsplit(".", 2)
            e = int(expert)
            if proj == "down_proj":
                fused[f"{layer_experts}.down_proj"][e].copy_(weight)
            else:
                target = fused[f"{layer_experts}.gate_up_proj"][e]
                half = target.shape[0] // 2
                (target[:half] if proj == "gate_proj" else target[half:]).copy_(weight)

    @torch.no_grad()
    def score(self, weights: dict[str, torch.Tensor]) -> TokenSums:
        self._install(weights)
        try:
            sums = TokenSums()
            for chunk, source in zip(self.windows.split(self.batch), self.source, strict=True):
                sums = sums + token_sums(source, chunk[:, 1:].flatten(), self._logits(chunk))
            return sums
        finally:
            for name, tensor in self._experts().items():
                tensor.copy_(self.original[name])


def metrics(sums: TokenSums) -> dict[str, float]:
    return {
        "kl": sums.kl / sums.tokens,
        "top1": sums.agreements / sums.tokens,
        "perplexity": math.exp(sums.nll_quantized / sums.tokens),
        "source_perplexity": math.exp(sums.nll / sums.tokens),
    }


def load_experts(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# -- report ---------------------------------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.5f}"
    return f"{statistics.fmean(values):.5f} ± {statistics.stdev(values):.5f}"


def print_table(rows: list[dict], tokens: int, source_ppl: float) -> None:
    print(f"\nHeld-out Tiny Shakespeare, {tokens} predicted tokens, source perplexity {source_ppl:.4f}.")
    print("KL(source ‖ quantized) nats/token, mean ± sample std over seeds; last column: mean KL over")
    print("llm-compressor's (first llm-compressor dtype) on the seeds both have\n")
    print("| recipe | tool | seeds | KL | KL by seed | top-1 | perplexity | KL / llm-compressor's |")
    print("|---|---|---|---|---|---|---|---|")
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for row in rows:
        groups.setdefault((row["recipe"], row["tool"]), {})[row["seed"]] = row
    for (recipe, tool), by_seed in groups.items():
        kls = [r["kl"] for r in by_seed.values()]
        peer = next((g for (rc, t), g in groups.items() if rc == recipe and t.startswith("llm-compressor")), {})
        common = [s for s in by_seed if s in peer]
        ratio = "-"
        if common and not tool.startswith("llm-compressor"):
            ours = statistics.fmean(by_seed[s]["kl"] for s in common)
            ratio = f"{ours / statistics.fmean(peer[s]['kl'] for s in common):.3f}"
        print(
            f"| {recipe} | {tool} | {len(kls)} | {spread(kls)} | {', '.join(f'{k:.5f}' for k in kls)} | "
            f"{statistics.fmean(r['top1'] for r in by_seed.values()):.4f} | "
            f"{statistics.fmean(r['perplexity'] for r in by_seed.values()):.4f} | {ratio} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup-venv", type=Path, default=None, help="create llm-compressor's virtualenv and exit")
    parser.add_argument("--work", type=Path, default=Path("/tmp/peers"))
    parser.add_argument("--venv", type=Path, default=Path("/tmp/peers-venv"))
    parser.add_argument("--model", type=Path, default=FIXTURE)
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    parser.add_argument("--streamq-dtypes", nargs="*", choices=("bfloat16", "float32"), default=["bfloat16", "float32"])
    parser.add_argument("--streamq-variants", nargs="+", choices=sorted(VARIANTS), default=["default"])
    parser.add_argument("--llmc-dtypes", nargs="*", choices=("bfloat16", "float32"), default=["bfloat16"])
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument(
        "--eval-offset",
        type=int,
        default=0,
        help="score held-out windows [offset, offset + eval-samples): a tuning split apart from the reported one",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.setup_venv is not None:
        setup_venv(args.setup_venv)
        return
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    write_source_copy(args.model, args.work / "source-hf")
    tools = [Tool("streamq", d, v) for d in args.streamq_dtypes for v in args.streamq_variants]
    tools += [Tool("llm-compressor", d) for d in args.llmc_dtypes]
    if any(t.name == "llm-compressor" for t in tools) and not (args.venv / "bin" / "python").is_file():
        print(f"creating llm-compressor {LLMC_VERSION}'s virtualenv in {args.venv} (pip, network)", flush=True)
        setup_venv(args.venv)
    check_calibration_ids(args)

    scorer = Scorer(args.work / "source-hf", eval_windows(args), batch=16)
    identity = metrics(scorer.score(load_experts_from_source(args.model)))
    if identity["kl"] > 1e-9:
        raise SystemExit(f"scorer check failed: the source's own experts give KL {identity['kl']:.3g}")
    rows = []
    for key in args.recipes:
        recipe = RECIPES[key]
        for seed in args.seeds if recipe.seeded else args.seeds[:1]:
            for tool in tools:
                path = quantized_experts(args, recipe, tool, seed)
                scores = metrics(scorer.score(load_experts(path)))
                row = {"recipe": recipe.name, "tool": tool.label, "seed": seed, **scores}
                rows.append(row)
                print(
                    f"{recipe.name:<26} {tool.label:<20} seed {seed}: KL {row['kl']:.5f} top1 {row['top1']:.4f} "
                    f"ppl {row['perplexity']:.4f}",
                    flush=True,
                )
    tokens = args.eval_samples * (args.seq_len - 1)
    print_table(rows, tokens, identity["source_perplexity"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def eval_windows(args: argparse.Namespace) -> torch.Tensor:
    """The held-out windows scored: the first ``--eval-samples`` of the evaluation split (the reported numbers), or
    with ``--eval-offset`` the next ones, never seen by the reported table, for choosing hyper-parameters."""
    total = args.eval_offset + args.eval_samples
    cfg = DataConfig(source=str(args.text), num_samples=total, seq_len=args.seq_len, split="eval")
    windows = load_token_batches(cfg, args.model)
    if len(torch.unique(windows, dim=0)) < total:
        raise SystemExit(f"the evaluation split has fewer than {total} windows of {args.seq_len} tokens")
    return windows[args.eval_offset :]


def load_experts_from_source(model: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(model) as reader:
        return {n: reader.weight(n, dtype=torch.float32) for n in expert_names(reader.config)}


def check_calibration_ids(args: argparse.Namespace) -> None:
    """llm-compressor's ids are streamq's: the saved tensor is what load_token_batches gives for that seed."""
    for seed in args.seeds:
        saved = torch.load(calibration_ids(args, seed))
        if not torch.equal(saved, load_token_batches(calibration_config(args, seed), args.model)):
            raise SystemExit(f"{calibration_ids(args, seed)} is stale: delete it")


if __name__ == "__main__":
    main()
