"""Weight formats side by side: GPTQ solve time at DeepSeek-V3 expert shapes (GPU), and quality on the trained
fixture (CPU is enough).

    PYTHONPATH=$PWD PYTHONUNBUFFERED=1 python3 bench/formats.py solve-time --out $OUT     # on the GPU
    PYTHONPATH=$PWD python3 bench/formats.py solve-time --smoke                           # tiny shapes, any device
    PYTHONPATH=$PWD python3 bench/formats.py quality --text ../shared/fixtures/text/tinyshakespeare.txt \\
        --work /tmp/formats [--formats nvfp4 mxfp4]

solve-time: int4 (group 128, the reference), NVFP4 and MXFP4, actorder "weight", on the same chunks of fresh
random experts (heavy-tailed Hessians from 8192 tokens, as bench/gptq.py); formats take turns on every chunk so
no format gets a warmer GPU; CUDA events after a warm-up chunk. Reports ms per matrix, the ratio to int4, and
the Hessian-weighted error.

quality: `streamq run` on the fixture with RTN and GPTQ in each format (128 sequences of 256 tokens), each output
decompressed by compressed-tensors into a dense bf16 checkpoint and scored against the source model on held-out
text (perplexity, KL, top-1 agreement).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from streamq.solvers import SolveOptions, SolverConfig, gptq_quantize, hessian_weighted_error
from streamq.solvers.scheme import QuantScheme
from streamq.solvers.synthetic import heavy_tailed_hessians, random_weights

SCHEMES = {
    "int4 g128": QuantScheme(bits=4, group_size=128),
    "nvfp4": QuantScheme.preset("nvfp4"),
    "mxfp4": QuantScheme.preset("mxfp4"),
}
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-moe-shakespeare"
V3_SHAPES = {"gate_up 2048x7168": (2048, 7168, 16), "down 7168x2048": (7168, 2048, 32)}  # out, in, experts/chunk
SMOKE_SHAPES = {"gate_up 64x256": (64, 256, 4), "down 256x128": (256, 128, 4)}


def _ms(device: torch.device, fn) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_formats(w: torch.Tensor, h: torch.Tensor, order: list[str], device: torch.device) -> dict[str, tuple]:
    """ms per matrix and the first matrix's Hessian-weighted error of each format on one chunk."""
    out = {}
    for name in order:
        cfg = SolverConfig(scheme=SCHEMES[name], actorder="weight")
        results: list = []
        ms = _ms(device, lambda c=cfg, r=results: r.append(gptq_quantize(w, h, c, SolveOptions())))
        out[name] = (ms / w.shape[0], float(hessian_weighted_error(w[0], results[0].weight[0], h[0])))
    return out


def solve_time(shapes: dict, chunks: int, tokens: int, device: torch.device) -> dict:
    rows: dict = {}
    for shape, (out, n, count) in shapes.items():
        measured: dict[str, list[tuple]] = {name: [] for name in SCHEMES}
        for chunk in range(chunks + 1):  # chunk 0 warms up
            g = torch.Generator(device=device).manual_seed(2000 + chunk)
            torch.backends.cuda.matmul.allow_tf32 = True
            h = heavy_tailed_hessians(count, n, tokens, g, device)
            w = random_weights(count, out, n, g, device)
            order = list(SCHEMES) if chunk % 2 else list(reversed(SCHEMES))
            for name, row in time_formats(w, h, order, device).items():
                if chunk:
                    measured[name].append(row)
            print(f"  {shape} chunk {chunk}: " + ", ".join(f"{k} {v[-1][0]:.2f}" for k, v in measured.items() if v))
            del h, w
        base = statistics.fmean(ms for ms, _ in measured["int4 g128"])
        rows[shape] = {"experts": chunks * count}
        for name, values in measured.items():
            ms = statistics.fmean(v[0] for v in values)
            err = statistics.fmean(v[1] for v in values)
            rows[shape][name] = {"ms_per_matrix": ms, "ratio_to_int4": ms / base, "error_first_matrix_mean": err}
    return rows


def solve_time_table(rows: dict, device: str) -> str:
    lines = [
        f"device: {device}",
        "",
        "| shape | experts timed | format | ms/matrix | × int4 | Hessian-weighted error (first matrix of each chunk) |",
        "|---|---|---|---|---|---|",
    ]
    for shape, by_format in rows.items():
        for name, r in by_format.items():
            if name == "experts":
                continue
            lines.append(
                f"| {shape} | {by_format['experts']} | {name} | {r['ms_per_matrix']:.2f} | {r['ratio_to_int4']:.2f} | "
                f"{r['error_first_matrix_mean']:.5f} |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- quality


def dense_copy(quantized: Path, dense: Path) -> None:
    """``quantized`` with every compressed Linear decompressed by compressed-tensors to a bf16 ``weight``."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file, save_file

    shutil.rmtree(dense, ignore_errors=True)
    shutil.copytree(quantized, dense)
    config = json.loads((quantized / "config.json").read_text())
    qcfg = QuantizationConfig.model_validate(config.pop("quantization_config"))
    group = qcfg.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(group.format)
    index = json.loads((quantized / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(quantized / shard)
        modules = {n.removesuffix(".weight_packed") for n in tensors if n.endswith(".weight_packed")}
        out = {n: t for n, t in tensors.items() if not any(n.startswith(m + ".weight_") for m in modules)}
        for m in modules:
            parts = {n.removeprefix(m + "."): t for n, t in tensors.items() if n.startswith(m + ".weight_")}
            out[m + ".weight"] = compressor.decompress(parts, group)["weight"].to(torch.bfloat16)
        save_file(out, dense / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard))
    (dense / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dense / "config.json").write_text(json.dumps(config, indent=2))


def quality(args: argparse.Namespace) -> list[dict]:
    from streamq.data import DataConfig
    from streamq.evaluate import EvalOptions, evaluate
    from streamq.pipeline import RunOptions, run
    from streamq.recipe import Recipe
    from streamq.tui import Reporter

    eval_data = DataConfig(source=str(args.text), num_samples=args.eval_samples, seq_len=256, split="eval")
    calibration = DataConfig(source=str(args.text), num_samples=args.samples, seq_len=256)
    options, eval_options = RunOptions(device="cpu", dtype="float32"), EvalOptions(device="cpu", dtype="float32")
    baseline = evaluate(args.model, None, eval_data, eval_options)
    rows = [{"format": "source (FP8 blocks)", "method": "-", "perplexity": baseline.model.perplexity, "kl": 0.0,
             "top1": 1.0, "seconds": 0.0}]  # fmt: skip
    for name in args.formats:
        scheme = SCHEMES[name]
        for method in ("rtn", "gptq"):
            out = args.work / f"{name.replace(' ', '-')}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            recipe = Recipe(method=method, solver=SolverConfig(scheme=scheme), data=calibration)  # type: ignore[arg-type]
            start = time.perf_counter()
            with Reporter(None, display="none") as reporter:
                run(args.model, out, recipe, options, reporter)
            seconds = time.perf_counter() - start
            dense_copy(out, out.with_name(out.name + "-dense"))
            result = evaluate(args.model, out.with_name(out.name + "-dense"), eval_data, eval_options)
            assert result.quantized is not None and result.comparison is not None
            rows.append({"format": name, "method": method.upper(), "perplexity": result.quantized.perplexity,
                         "kl": result.comparison.kl_divergence, "top1": result.comparison.top1_agreement,
                         "seconds": seconds})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nHeld-out Tiny Shakespeare, {baseline.tokens} predicted tokens; KL(source ‖ quantized) nats/token")
    print("| format | method | perplexity | KL | top-1 agreement | run s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['method']} | {r['perplexity']:.4f} | {r['kl']:.5f} | {r['top1']:.4f} | "
              f"{r['seconds']:.0f} |")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("solve-time")
    st.add_argument("--out", type=Path, default=None)
    st.add_argument("--smoke", action="store_true")
    st.add_argument("--chunks", type=int, default=4)
    q = sub.add_parser("quality")
    q.add_argument("--text", type=Path, required=True)
    q.add_argument("--work", type=Path, required=True)
    q.add_argument("--model", type=Path, default=FIXTURE)
    q.add_argument("--samples", type=int, default=128)
    q.add_argument("--eval-samples", type=int, default=64)
    q.add_argument("--formats", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    args = parser.parse_args()
    if args.command == "quality":
        args.work.mkdir(parents=True, exist_ok=True)
        (args.work / "formats_quality.json").write_text(json.dumps(quality(args), indent=2))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("solve-time at V3 shapes needs a GPU; use --smoke elsewhere")
    shapes = SMOKE_SHAPES if args.smoke else V3_SHAPES
    tokens = 512 if args.smoke else 8192
    rows = solve_time(shapes, 1 if args.smoke else args.chunks, tokens, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table = solve_time_table(rows, name)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "formats_solve_time.json").write_text(json.dumps(rows, indent=2))
        (args.out / "formats_solve_time.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
