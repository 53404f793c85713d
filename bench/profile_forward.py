"""Where a block's forward, calibration and activation I/O spend their time, at DeepSeek-V3 width, on one GPU.

Builds one dense and one MoE block (hidden 7168, 256 experts of 2048, MLA) from random bf16 weights in GPU
memory (no checkpoint needed) and times, per micro-batch of ``--micro`` × ``--seq-len`` tokens, with
``torch.cuda.synchronize`` around each piece: the attention (and SDPA alone under each backend), the dense MLP,
the router, the routed-expert loop (as it was: one ``torch.where`` per expert; as it is: tokens sorted once;
a grouped matrix product over stacked weights), the Hessian accumulations (float32 CUDA cores as they were,
bf16 tensor cores with float32 accumulation as they are, with the error against float64), and the activation
file I/O (pageable and synchronous as it was, pinned with read-ahead and a background writer as it is). Then the
propagate stage end to end (read → block → write) over all ``--samples`` sequences, old and new, and
``torch.profiler`` tables of one micro-batch. Each figure has its floor beside it: FLOPs over the measured bf16
(or fp32) matrix rate, bytes over the measured bandwidth.

    PYTHONPATH=$PWD python3 bench/profile_forward.py --out $OUT --io-dir /tmp/prof
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from streamq.calibrate import Accumulators, Hessians, accumulate_experts, count_routes, expert_down_input, mlp_input
from streamq.config import ModelConfig
from streamq.io.activations import ActivationReader, ActivationSpec, ActivationWriter, microbatches
from streamq.model.deepseek import Block, MoE, build_module, rope_cos_sin, route_order
from streamq.passes import PassPlan
from streamq.solvers.hessian import accumulate_gram_
from streamq.synth import SynthOptions, synth_config

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU only for a smoke test
BF16 = torch.bfloat16


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def sync_time(fn: Callable[[], object], reps: int = 3) -> float:
    """Median seconds of ``fn`` over ``reps`` runs after one warm-up, synchronised."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def random_block(cfg: ModelConfig, layer: int, seed: int) -> Block:
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in Block(cfg, layer).state_dict().items()}
    gen = torch.Generator(device=DEV).manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("e_score_correction_bias"):
            tensors[name] = torch.zeros(shape, dtype=torch.float32, device=DEV)
        elif len(shape) == 1:
            tensors[name] = torch.ones(shape, dtype=BF16, device=DEV)
        else:
            tensors[name] = torch.randn(shape, dtype=BF16, device=DEV, generator=gen) / math.sqrt(shape[1])
    return build_module(lambda: Block(cfg, layer), tensors, f"random layer {layer}")


# -- the code as it was (a850aba), to time against -------------------------------------------------------------------


def old_expert_slots(moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    slots = torch.zeros((*indices.shape, x.shape[-1]), dtype=torch.float32, device=x.device)
    for e in range(len(moe.experts)):
        tokens, slot = torch.where(indices == e)
        if tokens.numel():
            slots[tokens, slot] = moe.experts[e](x[tokens]).float() * weights[tokens, slot, None]
    return slots


def old_gram_(total: torch.Tensor, x: torch.Tensor) -> None:
    xf = x.float()
    total.addmm_(xf.t(), xf)


def old_accumulate_experts(moe: MoE, x: torch.Tensor, indices: torch.Tensor, experts: range, sums: dict) -> None:
    for e in experts:
        tokens = (indices == e).any(dim=-1).nonzero().flatten()
        if tokens.numel() == 0:
            continue
        xe = x[tokens]
        old_gram_(sums[e][0], xe)
        old_gram_(sums[e][1], expert_down_input(moe.experts[e], xe))


def old_block_forward(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x + block.self_attn(block.input_layernorm(x), cos, sin)
    m = block.post_attention_layernorm(h)
    if not isinstance(block.mlp, MoE):
        return h + block.mlp(m)
    local = m.reshape(-1, m.shape[-1])
    weights, indices = block.mlp.gate(local)
    return h + block.mlp.combine(local, old_expert_slots(block.mlp, local, weights, indices)).view(m.shape)


def new_block_forward(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return block(x, cos, sin)


# -- a grouped-GEMM prototype over stacked expert weights --------------------------------------------------------------


def grouped_mm_fn() -> Callable | None:
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def stack_experts(moe: MoE) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in moe.experts])
    down = torch.stack([e.down_proj.weight for e in moe.experts])
    return gate_up, down


def grouped_slots(
    moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, stacks: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """No host synchronisation: offsets stay on the device."""
    gmm = grouped_mm_fn()
    gate_up, down = stacks
    k, inter = indices.shape[1], down.shape[2]
    flat = indices.flatten()
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=len(moe.experts)), 0).to(torch.int32)
    xs = x[order // k]
    gu = gmm(xs, gate_up.transpose(1, 2), offs=offs)
    h = F.silu(gu[:, :inter]) * gu[:, inter:]
    out = gmm(h, down.transpose(1, 2), offs=offs)
    slots = torch.zeros((flat.numel(), x.shape[-1]), dtype=torch.float32, device=x.device)
    slots[order] = out.float() * weights.reshape(-1, 1)[order]
    return slots.view(*indices.shape, x.shape[-1])


# -- measurements ---------------------------------------------------------------------------------------------------


def ceilings() -> dict[str, float]:
    n = 8192 if DEV.type == "cuda" else 256
    a = torch.randn(n, n, dtype=BF16, device=DEV)
    b = torch.randn(n, n, dtype=BF16, device=DEV)
    bf16 = 2 * n**3 / sync_time(lambda: a @ b, 5)
    af, bfl = a.float()[: n // 2, : n // 2], b.float()[: n // 2, : n // 2]
    fp32 = 2 * (n // 2) ** 3 / sync_time(lambda: af @ bfl, 3)
    big = torch.empty(2**30 if DEV.type == "cuda" else 2**20, dtype=torch.uint8, device=DEV)
    other = torch.empty_like(big)
    copy = 2 * big.numel() / sync_time(lambda: other.copy_(big), 5)
    if DEV.type != "cuda":
        return {"bf16_flops": bf16, "fp32_flops": fp32, "dev_copy_Bps": copy}
    host = torch.empty(2**29, dtype=torch.uint8, pin_memory=True)
    h2d = host.numel() / sync_time(lambda: big[: host.numel()].copy_(host), 3)
    pageable = torch.empty(2**29, dtype=torch.uint8)
    h2d_pageable = pageable.numel() / sync_time(lambda: big[: pageable.numel()].copy_(pageable), 3)
    return {
        "bf16_flops": bf16,
        "fp32_flops": fp32,
        "dev_copy_Bps": copy,
        "h2d_pinned_Bps": h2d,
        "h2d_pageable_Bps": h2d_pageable,
    }


def flops(cfg: ModelConfig, tokens: int, seq: int) -> dict[str, float]:
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    proj = (
        h * cfg.q_lora_rank
        + cfg.q_lora_rank * heads * cfg.qk_head_dim
        + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        + heads * cfg.v_head_dim * h
    )
    sdpa = 2 * tokens * heads * (seq / 2) * (cfg.qk_head_dim + cfg.v_head_dim)  # causal: half the scores
    k, inter = cfg.num_experts_per_tok, cfg.moe_intermediate_size
    return {
        "attn_proj": 2 * tokens * proj,
        "sdpa": sdpa,
        "attention": 2 * tokens * proj + sdpa,
        "dense_mlp": 2 * tokens * 3 * h * cfg.intermediate_size,
        "routed": 2 * tokens * k * 3 * h * inter,
        "shared": 2 * tokens * 3 * h * inter * cfg.n_shared_experts,
        "hess_expert_gate_up": 2 * tokens * k * h * h,
        "hess_expert_down": 2 * tokens * k * inter * inter,
        "expert_down_input": 2 * tokens * k * 2 * h * inter,
        "hess_dense": 2
        * tokens
        * (
            h * h
            + cfg.q_lora_rank**2
            + cfg.kv_lora_rank**2
            + (heads * cfg.v_head_dim) ** 2
            + h * h
            + cfg.intermediate_size**2
        ),
    }


def sdpa_backends(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> dict[str, float | str]:
    """SDPA alone on the block's q/k/v, under each backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attn, cfg = block.self_attn, block.self_attn.cfg
    captured: dict[str, torch.Tensor] = {}
    real = F.scaled_dot_product_attention

    def capture(q, k, v, **kw):
        captured.update(q=q, k=k, v=v)
        return real(q, k, v, **kw)

    F.scaled_dot_product_attention = capture
    try:
        attn(block.input_layernorm(x), cos, sin)
    finally:
        F.scaled_dot_product_attention = real
    q, k, v = captured["q"], captured["k"], captured["v"]
    out: dict[str, float | str] = {
        "q_shape": str(tuple(q.shape)),
        "q_stride": str(q.stride()),
        "v_shape": str(tuple(v.shape)),
    }

    def run() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=cfg.softmax_scale)

    out["default"] = sync_time(run)
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                out[name] = sync_time(run)
        except Exception as exc:  # a backend that refuses these shapes is a finding
            out[name] = f"refused: {str(exc).splitlines()[0][:160]}"
    # Contiguous copies: does the layout matter?
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    out["default_contiguous"] = sync_time(
        lambda: F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=cfg.softmax_scale)
    )
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def hessian_checks(x: torch.Tensor, dims: dict[str, int], results: dict) -> None:
    """Old fp32 vs new tensor-core Gram accumulation: time per micro-batch and error against float64."""
    tokens = x.shape[0]
    gen = torch.Generator(device=DEV).manual_seed(5)
    for name, n in dims.items():
        # Heavy-tailed inputs like real activations: per-channel scales over two decades, bf16 like the real ones.
        scales = torch.exp(torch.randn(n, device=DEV, generator=gen) * 1.2)
        xi = (torch.randn(tokens, n, device=DEV, generator=gen) * scales).to(BF16)
        old, new = torch.zeros(n, n, device=DEV), torch.zeros(n, n, device=DEV)
        t_old = sync_time(lambda o=old, a=xi: old_gram_(o, a), 2)
        t_new = sync_time(lambda o=new, a=xi: accumulate_gram_(o, a), 2)
        old.zero_(), new.zero_()
        old_gram_(old, xi), accumulate_gram_(new, xi)
        sub = xi[:8192].double()
        ref = sub.t() @ sub
        o8, n8 = torch.zeros(n, n, device=DEV), torch.zeros(n, n, device=DEV)
        old_gram_(o8, xi[:8192]), accumulate_gram_(n8, xi[:8192])
        results[f"hessian_{name}_{n}"] = {
            "old_fp32_s": t_old,
            "new_tc_s": t_new,
            "rel_new_vs_old": rel(new, old),
            "rel_old_vs_fp64_8k": rel(o8, ref),
            "rel_new_vs_fp64_8k": rel(n8, ref),
        }
        del old, new, o8, n8, ref


def gram_variants(x: torch.Tensor, results: dict) -> None:
    """The tensor-core Gram matrix over all of ``x``'s tokens: in one product, in chunks, without cuBLAS's reduced
    precision reductions; relative error against float64."""
    import streamq.solvers.hessian as hs

    ref = x.double().t() @ x.double()
    out: dict[str, float] = {}
    for label, chunk, reduced in (
        ("one_product", x.shape[0], True),
        ("chunks_8192", 8192, True),
        ("chunks_4096", 4096, True),
        ("one_product_no_reduced_precision", x.shape[0], False),
    ):
        saved_chunk, saved_flag = hs.GRAM_CHUNK, torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        hs.GRAM_CHUNK = chunk
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
        try:
            total = torch.zeros(x.shape[1], x.shape[1], device=DEV)
            out[f"{label}_s"] = sync_time(lambda t=total: accumulate_gram_(t.zero_(), x), 2)
            total.zero_()
            accumulate_gram_(total, x)
            out[f"{label}_rel_fp64"] = rel(total, ref)
        finally:
            hs.GRAM_CHUNK, torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = saved_chunk, saved_flag
    fp32 = torch.zeros(x.shape[1], x.shape[1], device=DEV)
    old_gram_(fp32, x)
    out["fp32_rel_fp64"] = rel(fp32, ref)
    results["gram_variants"] = out


def expert_calibration(moe: MoE, m: torch.Tensor, n_experts: int, results: dict) -> None:
    """One micro-batch of a calibration pass over ``n_experts`` experts: old loop (fp32, a sync per expert) vs new."""
    _, indices = moe.gate(m)
    experts = range(n_experts)
    sums = {
        e: (
            torch.zeros(m.shape[1], m.shape[1], device=DEV),
            torch.zeros(moe.cfg.moe_intermediate_size, moe.cfg.moe_intermediate_size, device=DEV),
        )
        for e in experts
    }
    t_old = sync_time(lambda: old_accumulate_experts(moe, m, indices, experts, sums), 1)
    hess = Hessians()
    spec = PassPlan(tuple(experts), ())
    t_new = sync_time(lambda: accumulate_experts(moe, m, indices, spec, Accumulators(hess)), 1)
    errs = [rel(hess.sums[f"mlp.experts.{e}.gate_up"], sums[e][0]) for e in list(experts)[:4]]
    results["expert_hessians"] = {
        "experts": n_experts,
        "old_s": t_old,
        "new_s": t_new,
        "rel_gate_up_new_vs_old_first4": errs,
    }


def io_stage(
    spec: ActivationSpec,
    per_batch: int,
    work: Path,
    forward: Callable[[torch.Tensor], torch.Tensor],
    new_io: bool,
    limit: int,
) -> dict[str, float]:
    """Propagate as the pipeline does: read a micro-batch, move it to the GPU, forward, write the result."""
    src, dst = work / f"in-{new_io}.bin", work / f"out-{new_io}.bin"
    io_opts = {"pin": new_io and DEV.type == "cuda"}
    batches = microbatches(spec.samples, per_batch)[:limit]
    part = ActivationSpec(batches[-1][1], spec.seq_len, spec.hidden, spec.dtype)
    writer = ActivationWriter(src, part, **io_opts, behind=new_io)
    gen = torch.Generator(device=DEV).manual_seed(11)
    for first, stop in batches:
        writer.write(first, torch.randn(stop - first, spec.seq_len, spec.hidden, dtype=BF16, device=DEV, generator=gen))
    writer.commit()
    reader = ActivationReader(src, part, **io_opts, ahead=new_io)
    out = ActivationWriter(dst, part, **io_opts, behind=new_io)
    t = {"read": 0.0, "h2d": 0.0, "forward": 0.0, "write": 0.0}
    sync()
    start = time.perf_counter()
    for first, stop in batches:
        t0 = time.perf_counter()
        host = reader.read(first, stop)
        t1 = time.perf_counter()
        x = host.to(DEV)
        sync()
        t2 = time.perf_counter()
        y = forward(x)
        sync()
        t3 = time.perf_counter()
        out.write(first, y)
        t4 = time.perf_counter()
        t["read"] += t1 - t0
        t["h2d"] += t2 - t1
        t["forward"] += t3 - t2
        t["write"] += t4 - t3
    t_commit = time.perf_counter()
    out.commit()
    t["commit"] = time.perf_counter() - t_commit
    t["total"] = time.perf_counter() - start
    t["batches"] = len(batches)
    reader.close()
    src.unlink()
    dst.unlink()
    return t


def profile_table(fn: Callable[[], object], path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--io-dir", type=Path, default=Path("/tmp/streamq-profile"))
    parser.add_argument("--preset", default="v3", help="v3, or tiny for a CPU smoke test")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro", type=int, default=8, help="sequences per micro-batch (the pipeline's 32768 tokens)")
    parser.add_argument("--old-batches", type=int, default=4, help="micro-batches of the old MoE propagate (slow)")
    parser.add_argument("--hessian-experts", type=int, default=32)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: io,profile,grouped")
    args = parser.parse_args()
    skip = set(args.skip.split(",")) if args.skip else set()
    args.out.mkdir(parents=True, exist_ok=True)
    args.io_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    cfg = ModelConfig.from_dict(synth_config(SynthOptions(preset=args.preset, num_layers=2, dense_layers=1, mtp=False)))
    seq, micro = args.seq_len, args.micro
    tokens = micro * seq
    scale = args.samples / micro
    res: dict[str, object] = {
        "device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tokens_per_microbatch": tokens,
        "total_tokens": args.samples * seq,
        "grouped_mm": grouped_mm_fn() is not None,
    }
    ceil = ceilings()
    res["ceilings"] = ceil
    print(json.dumps(res, indent=1), flush=True)
    fl = flops(cfg, tokens, seq)
    res["flops_per_microbatch"] = fl
    cos, sin = rope_cos_sin(cfg, seq, DEV)
    dense = random_block(cfg, 0, 1)
    moe_block = random_block(cfg, 1, 2)
    moe = moe_block.mlp
    assert isinstance(moe, MoE)
    gen = torch.Generator(device=DEV).manual_seed(3)
    xs = [torch.randn(micro, seq, cfg.hidden_size, dtype=BF16, device=DEV, generator=gen) for _ in range(2)]
    x = xs[0]
    pieces: dict[str, float] = {}
    pieces["input_layernorm"] = sync_time(lambda: dense.input_layernorm(x))
    normed = dense.input_layernorm(x)
    pieces["attention"] = sync_time(lambda: dense.self_attn(normed, cos, sin))
    res["sdpa"] = sdpa_backends(dense, x, cos, sin)
    print(json.dumps(res["sdpa"], indent=1), flush=True)
    m_dense = mlp_input(dense, x, cos, sin)
    pieces["dense_mlp"] = sync_time(lambda: dense.mlp(m_dense))
    pieces["dense_block_old"] = sync_time(lambda: old_block_forward(dense, x, cos, sin))
    pieces["dense_block_new"] = sync_time(lambda: new_block_forward(dense, x, cos, sin))
    m = mlp_input(moe_block, x, cos, sin)
    pieces["gate"] = sync_time(lambda: moe.gate(m))
    weights, indices = moe.gate(m)
    pieces["route_order"] = sync_time(lambda: route_order(indices, len(moe.experts)))
    pieces["experts_old_loop"] = sync_time(lambda: old_expert_slots(moe, m, weights, indices), 2)
    pieces["experts_new_loop"] = sync_time(lambda: moe.expert_slots(m, weights, indices, range(len(moe.experts))), 2)
    slots_old = old_expert_slots(moe, m, weights, indices)
    slots_new = moe.expert_slots(m, weights, indices, range(len(moe.experts)))
    res["slots_new_equal_old"] = bool(torch.equal(slots_old, slots_new))
    if "grouped" not in skip and grouped_mm_fn() is not None:
        try:
            stacks = stack_experts(moe)
            pieces["experts_grouped"] = sync_time(lambda: grouped_slots(moe, m, weights, indices, stacks), 2)
            res["slots_grouped_rel_vs_old"] = rel(grouped_slots(moe, m, weights, indices, stacks), slots_old)
            del stacks
        except Exception as exc:  # record and go on
            res["grouped_error"] = str(exc).splitlines()[0][:300]
    del slots_old, slots_new
    pieces["combine_shared"] = sync_time(lambda: moe.combine(m, torch.zeros(m.shape[0], 8, m.shape[1], device=DEV)))
    pieces["moe_block_old"] = sync_time(lambda: old_block_forward(moe_block, x, cos, sin), 2)
    pieces["moe_block_new"] = sync_time(lambda: new_block_forward(moe_block, x, cos, sin), 2)
    pieces["count_routes"] = sync_time(lambda: count_routes(moe, m))
    res["pieces_per_microbatch_s"] = pieces
    print(json.dumps(pieces, indent=1), flush=True)
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    hessian_checks(
        m_dense,
        {
            "attn_in": cfg.hidden_size,
            "o_proj_in": cfg.num_attention_heads * cfg.v_head_dim,
            "dense_down_in": cfg.intermediate_size,
        },
        res,
    )
    gram_variants(m_dense, res)
    print(json.dumps(res["gram_variants"], indent=1), flush=True)
    expert_calibration(moe, m, args.hessian_experts, res)
    print(json.dumps({k: v for k, v in res.items() if k.startswith(("hessian", "expert_h"))}, indent=1), flush=True)
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    spec = ActivationSpec(args.samples, seq, cfg.hidden_size)
    n_all = len(microbatches(args.samples, micro))
    if "io" not in skip:
        stages = {}
        for label, block, fwd, new_io, limit in (
            ("dense_old", dense, old_block_forward, False, n_all),
            ("dense_new", dense, new_block_forward, True, n_all),
            ("moe_old", moe_block, old_block_forward, False, args.old_batches),
            ("moe_new", moe_block, new_block_forward, True, n_all),
        ):
            stages[label] = io_stage(
                spec, micro, args.io_dir, lambda t, b=block, f=fwd: f(b, t, cos, sin), new_io, limit
            )
            print(label, json.dumps(stages[label]), flush=True)
        res["propagate"] = stages
    if "profile" not in skip:
        profile_table(lambda: old_block_forward(dense, x, cos, sin), args.out / "profile_dense.txt")
        profile_table(lambda: old_block_forward(moe_block, x, cos, sin), args.out / "profile_moe_old.txt")
        profile_table(lambda: new_block_forward(moe_block, x, cos, sin), args.out / "profile_moe_new.txt")
    res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if DEV.type == "cuda" else 0.0
    (args.out / "profile_forward.json").write_text(json.dumps(res, indent=1))
    summary(res, fl, ceil, scale)
    shutil.rmtree(args.io_dir, ignore_errors=True)


def summary(res: dict, fl: dict[str, float], ceil: dict[str, float], scale: float) -> None:
    """Seconds for the whole token count (per micro-batch × micro-batches) with the floor beside each."""
    p = res["pieces_per_microbatch_s"]
    bf = ceil["bf16_flops"]
    rows = [
        ("attention (MLA)", p["attention"], fl["attention"] / bf),
        ("dense MLP", p["dense_mlp"], fl["dense_mlp"] / bf),
        ("dense block fwd", p["dense_block_new"], (fl["attention"] + fl["dense_mlp"]) / bf),
        ("router", p["gate"], 0.0),
        ("experts, old loop", p["experts_old_loop"], fl["routed"] / bf),
        ("experts, new loop", p["experts_new_loop"], fl["routed"] / bf),
        ("experts, grouped mm", p.get("experts_grouped", float("nan")), fl["routed"] / bf),
        ("MoE block fwd old", p["moe_block_old"], (fl["attention"] + fl["routed"] + fl["shared"]) / bf),
        ("MoE block fwd new", p["moe_block_new"], (fl["attention"] + fl["routed"] + fl["shared"]) / bf),
    ]
    print(f"\nper {res['total_tokens']} tokens (per micro-batch x {scale:g})")
    print(f"floor = FLOPs / measured bf16 rate {bf / 1e12:.0f} TFLOP/s")
    print("| piece | seconds | floor |\n|---|---|---|")
    for name, sec, floor in rows:
        print(f"| {name} | {sec * scale:.2f} | {floor * scale:.2f} |")
    for key, v in res.items():
        if key.startswith("hessian_"):
            print(
                f"| {key} | fp32 {v['old_fp32_s'] * scale:.2f} s | tensor cores {v['new_tc_s'] * scale:.2f} s | "
                f"rel. err vs fp64: fp32 {v['rel_old_vs_fp64_8k']:.1e}, tensor cores {v['rel_new_vs_fp64_8k']:.1e} |"
            )
    eh = res.get("expert_hessians")
    if eh:
        f = 256 / eh["experts"] * scale
        floor = (fl["hess_expert_gate_up"] + fl["hess_expert_down"] + fl["expert_down_input"]) / bf * scale
        print(
            f"| expert Hessians, 256 experts | old {eh['old_s'] * f:.2f} s | new {eh['new_s'] * f:.2f} s "
            f"| floor {floor:.2f} s |"
        )
    for label, t in res.get("propagate", {}).items():
        k = scale / t["batches"]
        parts = " + ".join(f"{name} {t[name] * k:.2f}" for name in ("read", "h2d", "forward", "write"))
        print(f"| propagate {label} | total {t['total'] * k:.2f} s = {parts} (commit {t['commit']:.2f}) |")


if __name__ == "__main__":
    main()
