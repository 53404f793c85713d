"""Do streamq's and llm-compressor's GPTQ solvers agree when given the same weight, Hessian and scales?

    PYTHONPATH=$PWD /tmp/peers-venv/bin/python bench/peers_solver_check.py   # llm-compressor's venv (peers.py)

Two routed experts of the trained fixture (bf16 weights), Hessians from heavy-tailed random inputs (log-normal
channel scales, 4 outlier channels x10), streamq's min-max group scales handed to both. Prints the fraction of
equal codes and each result's Hessian-weighted relative error tr(D H Dᵀ) / tr(W H Wᵀ). Equal codes mean that any
difference between the two tools on the same calibration text comes from the Hessians (the calibration forwards),
not from the solve.
"""

from __future__ import annotations

from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

from streamq.io.safetensors_stream import CheckpointReader
from streamq.solvers.gptq import gptq_quantize
from streamq.solvers.scheme import QuantScheme, SolverConfig

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-moe-shakespeare"
NAMES = ("model.layers.1.mlp.experts.0.gate_proj.weight", "model.layers.2.mlp.experts.5.down_proj.weight")


def hessian(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(4096, n, generator=gen) * torch.exp(0.7 * torch.randn(n, generator=gen))
    x[:, :4] *= 10
    return x.T @ x / x.shape[0]


def relative_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    d = wq - w
    return (torch.trace(d @ h @ d.T) / torch.trace(w @ h @ w.T)).item()


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128, actorder="weight")
    with CheckpointReader(FIXTURE) as reader:
        for name in NAMES:
            w = reader.weight(name, dtype=torch.bfloat16).float()
            h = hessian(w.shape[1], gen)
            ours = gptq_quantize(w, h, SolverConfig(scheme=QuantScheme(bits=4, group_size=128)))
            scale = ours.scale.float()
            wq = ours.q.float() * scale.repeat_interleave(128, dim=1)
            zero = torch.zeros_like(scale, dtype=torch.int8)
            theirs = quantize_weight(w[None].clone(), h[None].clone(), scale[None], zero[None], None, args, 128, 0.01)
            wq_llmc = theirs[0][0].float()
            print(
                f"{name}: codes equal {(wq == wq_llmc).float().mean().item():.4f}, error streamq "
                f"{relative_error(w, wq, h):.6f}, llm-compressor {relative_error(w, wq_llmc, h):.6f}"
            )


if __name__ == "__main__":
    main()
