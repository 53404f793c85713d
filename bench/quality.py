"""Quantization quality on the trained fixture: held-out perplexity and KL divergence per method.

The fixture (tests/fixtures/tiny-moe-shakespeare, 32 routed experts, top-4, group-limited routing) is quantized
with RTN, GPTQ under the three calibration modes, and AWQ, at 4 and 3 bits (group 128), from a generous and from a
scarce calibration set (the scarce one leaves some experts with few routed tokens, the case all-expert calibration
is for). Each result is scored on the held-out 10% of Tiny Shakespeare against the source model: perplexity,
KL(P_source ‖ P_quantized) per token and top-1 agreement. Runs on the CPU in a few minutes.

    PYTHONPATH=$PWD python3 bench/quality.py --text ../shared/fixtures/text/tinyshakespeare.txt --work /tmp/quality
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from streamq.config import ModelConfig
from streamq.data import DataConfig
from streamq.evaluate import EvalOptions, evaluate
from streamq.pipeline import RunOptions, run
from streamq.recipe import Recipe
from streamq.report import REPORT_NAME
from streamq.solvers.scheme import QuantScheme, SolverConfig
from streamq.tui import Reporter

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-moe-shakespeare"


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    calibration: str = "routed"


VARIANTS = (
    Variant("RTN", "rtn"),
    Variant("GPTQ routed", "gptq", "routed"),
    Variant("GPTQ all-expert", "gptq", "all"),
    Variant("GPTQ hybrid", "gptq", "hybrid"),
    Variant("AWQ", "awq"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, required=True, help="tinyshakespeare.txt")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=FIXTURE)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    eval_data = DataConfig(source=str(args.text), num_samples=args.eval_samples, seq_len=args.seq_len, split="eval")
    calibration_sets = {"generous": 128, "scarce": 8}  # sequences of seq_len tokens
    options, eval_options = RunOptions(device="cpu", dtype="float32"), EvalOptions(device="cpu", dtype="float32")
    rows = []
    baseline = evaluate(args.model, None, eval_data, eval_options)
    rows.append(
        {
            "name": "source (FP8 blocks)",
            "bits": "-",
            "calibration_tokens": "-",
            "perplexity": baseline.model.perplexity,
            "kl": 0.0,
            "top1": 1.0,
        }
    )
    for calib_name, samples in calibration_sets.items():
        for bits in (4, 3):
            for variant in VARIANTS:
                if variant.method == "rtn" and calib_name == "scarce":
                    continue  # RTN uses no calibration data
                recipe = Recipe(
                    method=variant.method,
                    calibration=variant.calibration,
                    min_tokens=even_share(args.model, samples * args.seq_len),
                    solver=SolverConfig(scheme=QuantScheme(bits=bits, group_size=128)),
                    data=DataConfig(source=str(args.text), num_samples=samples, seq_len=args.seq_len),
                )
                rows.append(measure(args, recipe, variant, bits, calib_name, samples, eval_data, options, eval_options))
                print_row(rows[-1])
    print_table(rows, baseline.tokens)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def even_share(model: Path, tokens: int) -> int:
    """hybrid's floor: the tokens an expert would get if routing were perfectly even (so the experts routed less
    than average get every token)."""
    cfg = ModelConfig.load(model)
    return tokens * cfg.num_experts_per_tok // cfg.n_routed_experts


def measure(args, recipe, variant, bits, calib_name, samples, eval_data, options, eval_options) -> dict:
    out = args.work / f"{variant.method}-{variant.calibration}-{bits}-{calib_name}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with Reporter(None, display="none") as reporter:
        run(args.model, out, recipe, options, reporter)
    seconds = time.perf_counter() - start
    blocks = [b for b in json.loads((out / REPORT_NAME).read_text())["blocks"] if b["kind"] == "moe"]
    result = evaluate(args.model, out, eval_data, eval_options)
    assert result.quantized is not None and result.comparison is not None
    return {
        "name": variant.name,
        "bits": bits,
        "calibration": calib_name,
        "calibration_tokens": samples * args.seq_len,
        "perplexity": result.quantized.perplexity,
        "kl": result.comparison.kl_divergence,
        "top1": result.comparison.top1_agreement,
        "min_routed_tokens": min(b["tokens_routed"]["min"] for b in blocks) if blocks[0]["tokens_routed"] else None,
        "fallbacks": sum(sum(b["fallbacks"].values()) for b in blocks),
        "block_error": statistics.fmean(b["rel_error"] for b in blocks),
        "seconds": seconds,
    }


def print_row(row: dict) -> None:
    print(
        f"{row['name']:<18} w{row['bits']} {row.get('calibration', '-'):<9} ppl {row['perplexity']:.4f} "
        f"KL {row['kl']:.5f} top1 {row['top1']:.4f}",
        flush=True,
    )


def print_table(rows: list[dict], tokens: int) -> None:
    print(f"\nHeld-out Tiny Shakespeare, {tokens} predicted tokens; KL(source ‖ quantized) in nats per token")
    print("| method | bits | calibration tokens | perplexity | KL | top-1 agreement | min routed tokens/expert |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        kl = f"{r['kl']:.5f}"
        least = r.get("min_routed_tokens")
        print(
            f"| {r['name']} | {r['bits']} | {r['calibration_tokens']} | {r['perplexity']:.4f} | {kl} | "
            f"{r['top1']:.4f} | {'-' if least is None else least} |"
        )


if __name__ == "__main__":
    main()
