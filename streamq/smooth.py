"""Where AWQ's input scales go in a DeepSeek-V3 block.

Each quantized Linear group reads an input produced by an RMSNorm or by the rows of another Linear. Dividing that
producer's output channels by s and multiplying the readers' input columns by s leaves the block's function
unchanged; the readers are then quantized in the scaled space. A "fold site" lists, for one input:

  * the quantized groups that read it (their errors choose s),
  * the producer: an RMSNorm weight, or some rows of a Linear (the v rows of kv_b_proj produce o_proj's input),
  * unquantized Linears that also read it and must absorb s exactly (the router reads the MoE input; so do the
    shared experts when only routed experts are quantized).

All routed experts and the shared experts read the post-attention norm's output, so they share one s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from streamq.config import ModelConfig
from streamq.distributed import Dist
from streamq.groups import MOE_INPUT, LinearGroup, Role
from streamq.solvers.awq import activation_rms, alphas, quantize_scaled, scales, search_losses, weight_magnitude
from streamq.solvers.scheme import QuantResult, SolverConfig


@dataclass(frozen=True)
class FoldSite:
    key: str  # the shared input
    consumers: tuple[str, ...]  # keys of the quantized groups reading it
    producer: str  # module whose output channels are divided by s
    rows: tuple[int, ...] | None = None  # the producer's rows that make the input (None: all / a norm)
    compensate: tuple[str, ...] = ()  # unquantized Linears reading the input: their columns absorb s
    expert: int | None = None


def fold_sites(cfg: ModelConfig, layer: int, groups: list[LinearGroup]) -> list[FoldSite]:
    """The fold sites of the quantized ``groups`` of block ``layer`` (as ``linear_groups`` makes them)."""
    sites: list[FoldSite] = []
    moe = cfg.is_moe_layer(layer)
    mlp_readers = [g.key for g in groups if g.role is Role.MLP_INPUT]
    if mlp_readers:
        compensate = ["mlp.gate"] if moe else []
        if moe and cfg.n_shared_experts and not any(g.mlp == "mlp.shared_experts" for g in groups):
            compensate += ["mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"]
        sites.append(FoldSite(MOE_INPUT, tuple(mlp_readers), "post_attention_layernorm", None, tuple(compensate)))
    for group in groups:
        if group.role is Role.DOWN:
            sites.append(FoldSite(group.key, (group.key,), f"{group.mlp}.up_proj", None, (), group.expert))
    if any(g.role is Role.KV_B for g in groups):
        attention_readers = tuple(g.key for g in groups if g.role is Role.ATTENTION_INPUT)
        # DeepSeek-V3.2's indexer reads the same inputs as q_a/kv_a (wk, weights_proj) and q_b (wq_b), unquantized.
        indexer = cfg.indexer is not None
        readers = ("self_attn.indexer.wk", "self_attn.indexer.weights_proj") if indexer else ()
        sites.append(FoldSite("attention.input", attention_readers, "input_layernorm", None, readers))
        if cfg.q_lora_rank:
            readers = ("self_attn.indexer.wq_b",) if indexer else ()
            sites.append(
                FoldSite("self_attn.q_b_proj", ("self_attn.q_b_proj",), "self_attn.q_a_layernorm", None, readers)
            )
        sites.append(FoldSite("self_attn.kv_b_proj", ("self_attn.kv_b_proj",), "self_attn.kv_a_layernorm"))
        sites.append(FoldSite("self_attn.o_proj", ("self_attn.o_proj",), "self_attn.kv_b_proj", _value_rows(cfg)))
    return sites


def _value_rows(cfg: ModelConfig) -> tuple[int, ...]:
    """kv_b_proj rows holding the values, in o_proj's input order (head-major, then value dimension)."""
    per_head = cfg.qk_nope_head_dim + cfg.v_head_dim
    return tuple(
        h * per_head + cfg.qk_nope_head_dim + d for h in range(cfg.num_attention_heads) for d in range(cfg.v_head_dim)
    )


def fold(block: nn.Module, site: FoldSite, s: torch.Tensor, stored_dtype: Callable[[str], torch.dtype]) -> list[str]:
    """Divide the producer's output by ``s`` and multiply the compensated readers' columns by ``s``. A changed
    tensor that is written as is (a norm, the router) is rounded to the dtype it is stored in, so that the block
    computes with what the checkpoint will hold. Returns the names of the parameters changed."""
    modules = dict(block.named_modules())
    name = f"{site.producer}.weight"
    weight = modules[site.producer].weight
    work = torch.promote_types(weight.dtype, torch.float32)
    updated, s = weight.data.to(work), s.to(work)
    if updated.dim() == 1:
        updated = updated / s
    else:
        rows = torch.tensor(site.rows, device=updated.device) if site.rows is not None else slice(None)
        updated[rows] = updated[rows] / s[:, None]
    weight.data = updated.to(stored_dtype(name)).to(weight.dtype)
    changed = [name]
    for reader in site.compensate:
        name = f"{reader}.weight"
        weight = modules[reader].weight
        weight.data = (weight.data.to(work) * s).to(stored_dtype(name)).to(weight.dtype)
        changed.append(name)
    return changed


class BlockAWQ:
    """AWQ for one block, fed chunk by chunk as the expert Hessians are collected.

    An expert's down projection is solved with its chunk: its site (the expert's up rows) is its own. The MoE
    input's scale is shared by all experts: its grid losses are summed over chunks and ranks, and it is applied at
    the end together with the non-expert sites, which rank 0 solves (as for GPTQ). Each consumer is quantized
    after every fold that touches its weights (an expert's up is scaled by rows for its down and by columns for
    the MoE input)."""

    def __init__(
        self,
        block: nn.Module,
        sites: list[FoldSite],
        mine: list[LinearGroup],
        solver: SolverConfig,
        dist: Dist,
        stored_dtype: Callable[[str], torch.dtype],
    ) -> None:
        self.block, self.sites, self.solver, self.dist, self.stored_dtype = block, sites, solver, dist, stored_dtype
        self.modules = dict(block.named_modules())
        self.mine = {g.key: g for g in mine}
        self.site_of = {c: site for site in sites for c in site.consumers}
        self.mlp_site = next((site for site in sites if site.key == MOE_INPUT), None)
        self.losses: dict[str, torch.Tensor] = {}  # the MoE input's grid losses, by reader
        self.mlp_act: torch.Tensor | None = None
        self.mlp_weights = self._reader_magnitude() if self.mlp_site else None
        self.changed: set[str] = set()

    def weights(self, group: LinearGroup) -> torch.Tensor:
        return torch.cat([self.modules[m].weight.float() for m in group.members])

    def _reader_magnitude(self) -> torch.Tensor:
        """AWQ's weight statistic over every reader of the MoE input, whichever rank holds it. Summed reader by
        reader in key order, on every rank: the result does not depend on how readers are spread over ranks."""
        assert self.mlp_site is not None
        group_size = self.solver.scheme.group_size
        mine = {}
        for key in self.mlp_site.consumers:
            if key in self.mine:
                w = self.weights(self.mine[key])
                mine[key] = (weight_magnitude([w], group_size).cpu() * w.shape[0], w.shape[0])
        total, rows = _sum_in_key_order(self.dist.gather_objects(mine))
        device = self.modules[self.mlp_site.producer].weight.device
        return (total / max(rows, 1)).to(device)

    def chunk(
        self, groups: list[LinearGroup], hessian: Callable[[LinearGroup], torch.Tensor]
    ) -> dict[str, QuantResult]:
        """Add this chunk's experts to the MoE input's losses; solve their down projections."""
        results: dict[str, QuantResult] = {}
        for group in groups:
            site = self.site_of[group.key]
            if site is self.mlp_site:
                self._add_mlp_losses(group, hessian(group))
            else:
                results[group.key] = quantize_scaled(
                    self.weights(group), self._search_and_fold(site, [(group, hessian(group))]), self.solver
                )
        return results

    def finish(
        self, groups: list[LinearGroup], hessian: Callable[[LinearGroup], torch.Tensor]
    ) -> dict[str, QuantResult]:
        """The MoE input's scale, then the non-expert sites, then every consumer not quantized yet: this rank's
        experts' gate/up and (on rank 0) the non-expert ``groups``."""
        scale_of: dict[str, torch.Tensor] = {}
        for group in groups:
            if self.site_of[group.key] is self.mlp_site:
                self._add_mlp_losses(group, hessian(group))
        if self.mlp_site is not None and self.mlp_act is not None:
            everyone = [self.losses]
            if self._shared_across_ranks(self.mlp_site):
                # Every rank holds some of the routed experts reading the MoE input: they choose together. (A
                # dense MLP's readers are all on rank 0, the only rank with their input statistics.)
                everyone = self.dist.gather_objects(self.losses)
            losses, _ = _sum_in_key_order([{k: (v, 0) for k, v in part.items()} for part in everyone])
            chosen = scales(self.mlp_act, self.mlp_weights, alphas()[int(torch.argmin(losses))])
            scale_of[self.mlp_site.key] = self._fold(self.mlp_site, chosen)
        for group in groups:
            site = self.site_of[group.key]
            if site is not self.mlp_site and site.key not in scale_of:
                readers = [(self.mine[k], hessian(self.mine[k])) for k in site.consumers if k in self.mine]
                scale_of[site.key] = self._search_and_fold(site, readers)
        results = {}
        for key, group in self.mine.items():
            site = self.site_of[key]
            if site.key in scale_of and (group.expert is None or site is self.mlp_site):
                results[key] = quantize_scaled(self.weights(group), scale_of[site.key], self.solver)
        return results

    @staticmethod
    def _shared_across_ranks(site: FoldSite) -> bool:
        return any(".experts." in key for key in site.consumers)

    def _add_mlp_losses(self, group: LinearGroup, h: torch.Tensor) -> None:
        if self.mlp_act is None:
            raise ValueError("set mlp_act (the MoE input's RMS) before the first chunk")
        losses = search_losses(self.weights(group)[None], h[None], self.mlp_act, self.mlp_weights, self.solver)
        self.losses[group.key] = losses.cpu()

    def _search_and_fold(self, site: FoldSite, readers: list[tuple[LinearGroup, torch.Tensor]]) -> torch.Tensor:
        weights = [self.weights(g) for g, _ in readers]
        act = activation_rms(readers[0][1])
        magnitude = weight_magnitude(weights, self.solver.scheme.group_size)
        losses = sum(
            search_losses(w[None], h[None], act, magnitude, self.solver)
            for w, (_, h) in zip(weights, readers, strict=True)
        )
        return self._fold(site, scales(act, magnitude, alphas()[int(torch.argmin(losses))]))

    def _fold(self, site: FoldSite, s: torch.Tensor) -> torch.Tensor:
        self.changed.update(fold(self.block, site, s, self.stored_dtype))
        return s


def _sum_in_key_order(parts: list[dict[str, tuple[torch.Tensor, int]]]) -> tuple[torch.Tensor, int]:
    """Sum (tensor, count) pairs from every rank in the order of their keys, so that the floating-point result is
    the same however the keys were split across ranks."""
    merged = {k: v for part in parts for k, v in part.items()}
    keys = sorted(merged, key=_natural)
    total = merged[keys[0]][0].clone()
    for key in keys[1:]:
        total += merged[key][0]
    return total, sum(merged[k][1] for k in keys)


def _natural(key: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key with numbers compared as numbers (expert 10 after expert 9)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in key.split("."))
