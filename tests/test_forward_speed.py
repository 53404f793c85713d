"""The faster compute paths compute exactly what the straightforward ones did: routed tokens grouped by one sort
instead of a device round trip per expert, Hessians through ``accumulate_gram_``, and activation files read ahead
and written behind in threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamq.io.activations import ActivationReader, ActivationSpec, ActivationWriter, microbatches
from streamq.io.safetensors_stream import CheckpointReader
from streamq.model.deepseek import MoE, load_block, route_order
from streamq.solvers.hessian import accumulate_gram_


def where_loop_slots(moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The expert loop as it was: one ``torch.where`` (a host synchronisation on a GPU) per expert."""
    slots = torch.zeros((*indices.shape, x.shape[-1]), dtype=torch.float32)
    for e in range(len(moe.experts)):
        tokens, slot = torch.where(indices == e)
        if tokens.numel():
            slots[tokens, slot] = moe.experts[e](x[tokens]).float() * weights[tokens, slot, None]
    return slots


def test_route_order_lists_each_experts_tokens_in_ascending_order() -> None:
    gen = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(12, generator=gen)[:3] for _ in range(50)])
    order, offsets = route_order(indices, 12)
    assert len(offsets) == 13 and offsets[-1] == indices.numel()
    for e in range(12):
        pos = order[offsets[e] : offsets[e + 1]]
        tokens, slots = torch.where(indices == e)
        assert torch.equal(pos // 3, tokens) and torch.equal(pos % 3, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_slots_are_bitwise_the_where_loop(tiny_checkpoint: Path, dtype: torch.dtype) -> None:
    reader = CheckpointReader(tiny_checkpoint)
    block = load_block(reader, reader.config.first_k_dense_replace, "cpu", dtype)
    moe = block.mlp
    assert isinstance(moe, MoE)
    x = torch.randn(96, reader.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    weights, indices = moe.gate(x)
    expected = where_loop_slots(moe, x, weights, indices)
    assert expected.abs().sum() > 0
    assert torch.equal(moe.expert_slots(x, weights, indices, range(len(moe.experts))), expected)
    # A rank's share of the experts fills exactly those experts' slots.
    share = range(4, 11)
    mine = moe.expert_slots(x, weights, indices, share)
    owned = (indices >= share.start) & (indices < share.stop)
    assert torch.equal(mine[owned], expected[owned]) and not mine[~owned].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_gram_accumulation_is_the_float32_product(dtype: torch.dtype) -> None:
    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(2)).to(dtype)
    total, expected = torch.ones(40, 40), torch.ones(40, 40)
    accumulate_gram_(total, x)
    expected.addmm_(x.float().t(), x.float())
    assert torch.equal(total, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core path needs a GPU")
def test_gpu_gram_accumulation_is_close_to_float64() -> None:
    x = (torch.randn(20000, 256, device="cuda") * torch.logspace(-1, 1, 256, device="cuda")).bfloat16()
    total = torch.zeros(256, 256, device="cuda")
    accumulate_gram_(total, x)
    ref = x.double().t() @ x.double()
    assert ((total.double() - ref).norm() / ref.norm()).item() < 1e-4


def write_all(path: Path, spec: ActivationSpec, data: torch.Tensor, order: list[tuple[int, int]], behind: bool) -> None:
    writer = ActivationWriter(path, spec, pin=False, behind=behind)
    for first, stop in order:
        writer.write(first, data[first:stop])
    writer.commit()


@pytest.mark.parametrize("threaded", [False, True])
def test_activation_files_round_trip_with_read_ahead_and_write_behind(tmp_path: Path, threaded: bool) -> None:
    spec = ActivationSpec(samples=7, seq_len=5, hidden=6)
    data = torch.randn(7, 5, 6, generator=torch.Generator().manual_seed(3)).bfloat16()
    batches = microbatches(7, 2)
    path = tmp_path / "acts.bin"
    write_all(path, spec, data, list(reversed(batches)), behind=threaded)
    assert path.read_bytes() == data.view(torch.uint8).numpy().tobytes()
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file must be renamed"
    reader = ActivationReader(path, spec, pin=False, ahead=threaded)
    try:
        # Two passes in order (the second starts where the read-ahead wraps round), then out of order.
        for first, stop in [*batches, *batches, (3, 6), (0, 1), (1, 7)]:
            got = reader.read(first, stop)
            assert torch.equal(got, data[first:stop])
            got.fill_(0)  # a caller writing into what it was given must not change later reads
    finally:
        reader.close()


def test_write_behind_copies_the_values_before_the_caller_reuses_them(tmp_path: Path) -> None:
    spec = ActivationSpec(samples=4, seq_len=3, hidden=8)
    writer = ActivationWriter(tmp_path / "acts.bin", spec, pin=False, behind=True)
    buffer = torch.zeros(2, 3, 8, dtype=torch.bfloat16)
    for first in (0, 2):
        buffer.fill_(first + 1)
        writer.write(first, buffer)
    writer.commit()
    back = ActivationReader(tmp_path / "acts.bin", spec, pin=False, ahead=False).read(0, 4)
    assert back[:2].eq(1).all() and back[2:].eq(3).all()


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_activations_kept_on_the_device_reach_their_file_whole(
    tmp_path: Path, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file written behind the compute holds exactly the values computed last before ``spill`` (on a GPU the
    copies run on a stream of their own, after the kernels queued before), in pieces of any size."""
    import streamq.resident
    from streamq.resident import ResidentActivations

    spec = ActivationSpec(samples=7, seq_len=5, hidden=6)
    monkeypatch.setattr(streamq.resident, "PIECE_BYTES", 3 * spec.sample_bytes)  # 3 pieces, the last short
    kept = ResidentActivations(spec, torch.device(device))
    data = torch.randn(7, 5, 6, generator=torch.Generator().manual_seed(4)).bfloat16().to(device)
    for first, stop in microbatches(7, 2):
        kept.write(first, data[first:stop] * 3 + 1)  # computed on the device, in the caller's stream
    done = kept.spill(tmp_path / "acts.bin", layer=5)
    done.result()
    kept.shutdown()
    assert kept.holds(5) and not kept.holds(4)
    expected = (data * 3 + 1).cpu()
    back = ActivationReader(tmp_path / "acts.bin", spec, pin=False, ahead=False).read(0, 7)
    assert torch.equal(back, expected)
    assert torch.equal(kept.read(2, 4).cpu(), expected[2:4])
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file must be renamed"
