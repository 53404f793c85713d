"""Our codes, scales and zero points mean in compressed-tensors 0.20 exactly what they mean to us.

Packed into its pack-quantized format and decompressed by its own code, a solver result must give back our
dequantized weight bit for bit; its observer formulas must give our scales; its quantizer, run on our
dequantized weight, must give back our codes (an exporter may re-quantize instead of packing codes).
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams

from streamq.solvers import SolverConfig, gptq_quantize, rtn_quantize
from streamq.solvers.observers import column_params
from streamq.solvers.rtn import static_qparams
from streamq.solvers.scheme import QuantResult, QuantScheme
from streamq.solvers.synthetic import random_problem


def _args(scheme: QuantScheme) -> QuantizationArgs:
    if scheme.group_size == 0:
        return QuantizationArgs(num_bits=scheme.bits, symmetric=scheme.symmetric, strategy="channel")
    return QuantizationArgs(num_bits=scheme.bits, symmetric=scheme.symmetric, group_size=scheme.group_size)


def _decompress(r: QuantResult, scheme: QuantScheme) -> torch.Tensor:
    """Pack our codes as an exporter would and let compressed-tensors decompress them."""
    state = {
        "weight_packed": pack_to_int32(r.q, scheme.bits),
        "weight_scale": r.scale,
        "weight_shape": torch.tensor(r.q.shape),
    }
    if r.zero_point is not None:
        state["weight_zero_point"] = pack_to_int32(r.zero_point, scheme.bits, packed_dim=0)
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=_args(scheme))
    return PackedQuantizationCompressor.decompress(state, ct_scheme)["weight"]


SCHEMES = [QuantScheme(bits, gs, sym) for bits in (2, 3, 4, 8) for gs in (0, 32) for sym in (True, False)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"w{s.bits}g{s.group_size}{'s' if s.symmetric else 'a'}")
@pytest.mark.parametrize("actorder", ["none", "weight"])
def test_pack_and_decompress_gives_our_weight_bit_exactly(scheme: QuantScheme, actorder: str) -> None:
    w, h = random_problem(1, 16, 64, seed=1015)
    r = gptq_quantize(w[0], h[0], SolverConfig(scheme=scheme, actorder=actorder))
    assert r.g_idx is None
    assert torch.equal(_decompress(r, scheme), r.weight)


@pytest.mark.parametrize("symmetric", [True, False])
def test_activation_order_groups_dequantize_exactly_through_g_idx(symmetric: bool) -> None:
    """compressed-tensors 0.20 dropped g_idx from ``dequantize``; a g_idx checkpoint dequantizes with each
    column's own scale, which its per-group code does when handed one group per column."""
    scheme = QuantScheme(bits=4, group_size=32, symmetric=symmetric)
    w, h = random_problem(1, 16, 128, seed=1016)
    r = gptq_quantize(w[0], h[0], SolverConfig(scheme=scheme, actorder="group"))
    per_column = QuantizationArgs(num_bits=4, symmetric=symmetric, group_size=1)
    scale = column_params(r.scale, 32, r.g_idx, 128)
    zero = None if r.zero_point is None else column_params(r.zero_point, 32, r.g_idx, 128)
    assert torch.equal(dequantize(r.q, scale, zero, per_column), r.weight)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"w{s.bits}g{s.group_size}{'s' if s.symmetric else 'a'}")
def test_our_minmax_scales_and_codes_are_compressed_tensors_own(scheme: QuantScheme) -> None:
    w, _ = random_problem(2, 8, 64, seed=1017)
    # compressed-tensors computes scales in the weight's dtype: float32 here, so compare float32 scales.
    scheme = replace(scheme, scale_dtype="float32")
    cfg = SolverConfig(scheme=scheme)
    args = _args(scheme)
    groups = w.unsqueeze(-2) if scheme.group_size == 0 else w.unflatten(-1, (-1, scheme.group_size))
    ct_scale, ct_zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    scale, zero = static_qparams(w, cfg)
    assert torch.equal(scale, ct_scale)
    if zero is not None:
        assert torch.equal(zero.to(torch.int8), ct_zero)

    rtn = rtn_quantize(w[0], cfg)
    zero_point = None if rtn.zero_point is None else rtn.zero_point
    assert torch.equal(quantize(w[0], rtn.scale, zero_point, args, dtype=torch.int8), rtn.q)


@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_requantizes_our_weight_to_our_codes(symmetric: bool) -> None:
    scheme = QuantScheme(bits=4, group_size=32, symmetric=symmetric)
    w, h = random_problem(1, 16, 64, seed=1018)
    r = gptq_quantize(w[0], h[0], SolverConfig(scheme=scheme))
    assert torch.equal(quantize(r.weight, r.scale, r.zero_point, _args(scheme), dtype=torch.int8), r.q)


@pytest.mark.parametrize("symmetric", [True, False])
def test_scales_are_rounded_to_the_stored_dtype_before_codes_are_chosen(symmetric: bool) -> None:
    w, _ = random_problem(1, 16, 64, seed=1019)
    exact = QuantScheme(bits=4, group_size=32, symmetric=symmetric, scale_dtype="float32")
    stored = replace(exact, scale_dtype="bfloat16")
    full, rounded = rtn_quantize(w[0], SolverConfig(scheme=exact)), rtn_quantize(w[0], SolverConfig(scheme=stored))
    assert torch.equal(rounded.scale, rounded.scale.bfloat16().float())
    if symmetric:
        assert torch.equal(rounded.scale, full.scale.bfloat16().float())
    # The codes are the ones for the rounded scale, so (q - z) * s in bf16 scales is the solved weight.
    assert torch.equal(quantize(w[0], rounded.scale, rounded.zero_point, _args(stored), dtype=torch.int8), rounded.q)
    assert torch.equal(_decompress(rounded, stored), rounded.weight)
