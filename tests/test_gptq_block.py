"""The Triton column sweep against its torch reference, on fresh random inputs.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set before the kernel module is
imported), so shapes stay tiny; with one, the same tests run the compiled kernel.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from streamq.kernels.gptq_block import gptq_block_ref, gptq_block_triton
from streamq.solvers.scheme import FP4_E2M1, Grid, QuantScheme

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POISON = 111  # outside every grid: a code left unwritten shows
INT4 = QuantScheme(bits=4).grid
GRIDS = {"int4": INT4, "fp4": FP4_E2M1}


def _inputs(seed: int, experts: int, rows: int, cols: int, groups: int, asym: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=DEVICE)

    # The block sits inside wider buffers, as in the solver: views with a row stride > cols.
    work = randn(experts, rows, cols + 7)[:, :, 3 : 3 + cols]
    orig = (work + 0.1 * randn(experts, rows, cols)).contiguous()
    m = 0.3 * torch.triu(randn(experts, cols, cols), diagonal=1)
    scale = 0.2 + torch.rand(experts, rows, groups, generator=g, device=DEVICE)
    zero = torch.randint(-8, 8, (experts, rows, groups), generator=g, device=DEVICE).float() if asym else None
    gidx = torch.randint(0, groups, (experts, cols), generator=g, device=DEVICE, dtype=torch.int32)
    return {"work": work, "orig": orig, "m": m, "scale": scale, "zero": zero, "gidx": gidx}


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("babai", [True, False], ids=["cholesky-form", "inverse-form"])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize(("rows", "cols", "block_r", "seed"), [(40, 24, 32, 11), (17, 32, 64, 12)])
def test_kernel_matches_reference(
    grid: str, babai: bool, asym: bool, rows: int, cols: int, block_r: int, seed: int
) -> None:
    q = GRIDS[grid]
    x = _inputs(seed, experts=2, rows=rows, cols=cols, groups=3, asym=asym)
    outs = {}
    for name, sweep in (("ref", gptq_block_ref), ("triton", gptq_block_triton)):
        work, orig = x["work"].clone(), x["orig"].clone()
        codes = torch.full((2, rows, cols), POISON, dtype=torch.int8, device=DEVICE)
        kwargs = {"block_r": block_r} if name == "triton" else {}
        sweep(work, orig, x["m"], x["scale"], x["zero"], x["gidx"], codes, q, babai, **kwargs)
        outs[name] = (codes, orig, work)

    (codes_ref, d_ref, deq_ref), (codes_tri, d_tri, deq_tri) = outs["ref"], outs["triton"]
    assert codes_tri.min() >= q.code_min and codes_tri.max() <= q.code_max, f"unwritten codes (seed {seed})"
    assert _on_grid(codes_tri, q) and _on_grid(codes_ref, q), f"seed {seed}"
    # Summation order differs (left- vs right-looking), so a code may flip on a near-tie; none should here.
    assert (codes_ref != codes_tri).float().mean() <= 1e-3, f"seed {seed}"
    same_rows = (codes_ref == codes_tri).all(-1, keepdim=True)
    torch.testing.assert_close(d_tri * same_rows, d_ref * same_rows, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    # Both leave compressed-tensors' dequantized value (q - z) * s in ``work``, bit for bit.
    g = x["gidx"].long().unsqueeze(1).expand(-1, rows, -1)
    s = x["scale"].gather(2, g)
    for codes, deq in ((codes_ref, deq_ref), (codes_tri, deq_tri)):
        value = codes.float() * q.unit
        expected = value * s if x["zero"] is None else (value - x["zero"].gather(2, g)) * s
        assert torch.equal(deq, expected), f"seed {seed}"


def _on_grid(codes: torch.Tensor, grid: Grid) -> bool:
    values = codes.float() * grid.unit
    return torch.equal(grid.round(values), values)


def test_fp4_grid_rounds_like_compressed_tensors() -> None:
    """E2M1 rounding, ties included (to the even mantissa), is compressed-tensors' ``cast_to_fp4``."""
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0])
    x = torch.cat([torch.linspace(-7.5, 7.5, 30001), ties, -ties])
    assert torch.equal(FP4_E2M1.round(x), cast_to_fp4(x.clone()))
    assert sorted(set(FP4_E2M1.round(x).abs().tolist())) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_kernel_rounds_exact_grid_points_and_ties_like_the_reference(grid: str) -> None:
    """Every grid value, every midpoint between neighbours and values past the ends, with M = 0 and scale 1:
    the kernel's bit-built steps must agree with the reference's frexp ones exactly."""
    q = GRIDS[grid]
    points = torch.arange(q.code_min, q.code_max + 1, dtype=torch.float32) * q.unit
    values = torch.cat([points, (points[1:] + points[:-1]) / 2, torch.tensor([q.lo - 3, q.hi + 3, 1e-30])])
    cols = values.numel()
    work = values.view(1, 1, cols).repeat(1, 4, 1).to(DEVICE)
    scale = torch.ones(1, 4, 1, device=DEVICE)
    gidx = torch.zeros(1, cols, dtype=torch.int32, device=DEVICE)
    m = torch.zeros(1, cols, cols, device=DEVICE)
    codes = {}
    for name, sweep in (("ref", gptq_block_ref), ("triton", gptq_block_triton)):
        codes[name] = torch.full((1, 4, cols), POISON, dtype=torch.int8, device=DEVICE)
        sweep(work.clone(), work.clone(), m, scale, None, gidx, codes[name], q, True)
    assert torch.equal(codes["triton"], codes["ref"])
    assert torch.equal(codes["ref"][0, 0].float().cpu() * q.unit, q.round(values))


def test_kernel_writes_only_its_block() -> None:
    seed = 21
    x = _inputs(seed, experts=1, rows=8, cols=16, groups=1, asym=False)
    parent = x["work"]._base  # the wider buffer the block is a view of
    before = parent.clone()
    codes = torch.zeros(1, 8, 16, dtype=torch.int8, device=DEVICE)
    gptq_block_triton(x["work"], x["orig"].clone(), x["m"], x["scale"], None, x["gidx"], codes, INT4, True)
    outside = torch.ones_like(parent, dtype=torch.bool)
    outside[:, :, 3:19] = False
    assert torch.equal(parent[outside], before[outside]), f"seed {seed}"
    assert not torch.equal(parent[~outside], before[~outside])


def test_reference_sweep_is_rtn_without_feedback() -> None:
    """M = 0 leaves nothing to propagate: every column is rounded on its own, d = w - deq."""
    seed = 22
    x = _inputs(seed, experts=2, rows=12, cols=8, groups=1, asym=False)
    work, orig = x["work"].clone(), x["work"].clone()
    codes = torch.empty(2, 12, 8, dtype=torch.int8, device=DEVICE)
    gptq_block_ref(work, orig, torch.zeros_like(x["m"]), x["scale"], None, x["gidx"], codes, INT4, True)
    expected = torch.clamp(torch.round(x["work"] / x["scale"]), -8, 7)
    assert torch.equal(codes.float(), expected), f"seed {seed}"
    torch.testing.assert_close(orig, x["work"] - expected * x["scale"])
    assert torch.equal(work, expected * x["scale"])
