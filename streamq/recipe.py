"""The recipe: everything that decides the bytes of a quantized checkpoint.

It is validated once at the CLI edge, saved as OUT/streamq_recipe.json, and its hash guards resume: a rerun
with a different recipe must not continue somebody else's half-written output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from streamq.data_config import DataConfig
from streamq.errors import StreamqError
from streamq.solvers.scheme import QuantScheme, SolverConfig

Method = Literal["gptq", "rtn", "awq"]
Scope = Literal["experts", "all"]
CalibrationMode = Literal["routed", "all", "hybrid"]
Target = Literal["layer", "float"]
UnquantizedDtype = Literal["bf16", "fp8"]

RECIPE_NAME = "streamq_recipe.json"


def default_solver() -> SolverConfig:
    """The default recipe's solver: GPTQ with MSE-searched group scales over 20 clipping ratios 1.00, 0.99, ...
    0.81 (llm-compressor's MSE observer range; bench/RESULTS.md "issue 13": the direction that paid against
    llm-compressor's GPTQ, and 20 ratios rather than 80 keep its cost small at DeepSeek-V3 width).
    ``--observer absmax`` is the earlier default, byte for byte."""
    return SolverConfig(observer="mse", mse_grid=100, mse_max_shrink=0.2)


@dataclass(frozen=True)
class Recipe:
    """``scope``: "experts" quantizes the routed experts only; "all" also the shared experts, the dense MLPs
    and the attention projections. ``calibration``: "routed" feeds each expert's Hessian only the tokens the
    router sends it; "all" feeds every token to every expert's Hessian; "hybrid" does that only for experts that
    were routed fewer than ``min_tokens`` tokens. The block's output always follows the real top-k routing.
    ``unquantized``: how Linears that are not quantized are written (bf16, or DeepSeek's FP8 blocks as shipped).
    ``target``: what a routed expert's solve matches: "layer" its own output on its quantized input (GPTQ),
    "float" the unquantized model's output (GPTAQ's asymmetric calibration, see solvers/gptaq.py).
    ``router_weighted``: a routed expert's calibration tokens weigh their router weight squared, as its error
    reaches the block's output scaled by that weight (all-token calibration's extra tokens stay unweighted).
    """

    method: Method = "gptq"
    solver: SolverConfig = field(default_factory=default_solver)
    scope: Scope = "experts"
    calibration: CalibrationMode = "routed"
    min_tokens: int = 256
    tie_gate_up: bool = True
    unquantized: UnquantizedDtype = "bf16"
    target: Target = "layer"
    router_weighted: bool = False
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        _one_of("method", self.method, ("gptq", "rtn", "awq"))
        _one_of("scope", self.scope, ("experts", "all"))
        _one_of("calibration", self.calibration, ("routed", "all", "hybrid"))
        _one_of("unquantized", self.unquantized, ("bf16", "fp8"))
        _one_of("target", self.target, ("layer", "float"))
        _one_of("actorder", self.solver.actorder, ("none", "weight"))
        _one_of("observer", self.solver.observer, ("minmax", "mse"))
        if self.min_tokens < 0:
            raise StreamqError(f"--min-tokens must be >= 0, not {self.min_tokens}")
        if self.method == "awq" and self.unquantized == "fp8" and self.scope == "experts":
            raise StreamqError(
                "--method awq folds its scales into the shared experts' weights, which then cannot stay FP8: "
                "use --unquantized bf16 or --scope all"
            )
        if not 0 <= self.solver.damp < 1:
            raise StreamqError(f"--damp must be in [0, 1), not {self.solver.damp}")
        self._check_scale_rounds()

    def _check_scale_rounds(self) -> None:
        rounds, scheme = self.solver.scale_rounds, self.solver.scheme
        if rounds < 0:
            raise StreamqError(f"--scale-rounds must be >= 0, not {rounds}")
        if rounds and scheme.format != "int":
            raise StreamqError(f"--scale-rounds fits integer scales: add --scale-rounds 0 to --format {scheme.format}")
        if rounds and scheme.group_size and self.solver.actorder != "weight":
            raise StreamqError("--scale-rounds needs scales fixed before the sweep: --act-order, or --scale-rounds 0")

    @property
    def scheme(self) -> QuantScheme:
        return self.solver.scheme

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        solver = dict(d["solver"])
        solver["scheme"] = QuantScheme(**solver["scheme"])
        return cls(**{**d, "solver": SolverConfig(**solver), "data": DataConfig(**d["data"])})

    def digest(self) -> str:
        """Stable across runs and machines: sorted JSON of every field."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, out_dir: Path) -> None:
        (Path(out_dir) / RECIPE_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> Recipe:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise StreamqError(f"{path}: not a streamq recipe ({exc}); pass a file written by `streamq run`") from None


def describe(recipe: Recipe) -> str:
    """The recipe in one line for people, e.g. ``GPTQ W4 g128 sym, act-order, routed experts, 128×2048 tokens``:
    what decides the result, in the order one would say it; defaults that change nothing are left out."""
    scheme, solver, data = recipe.scheme, recipe.solver, recipe.data
    grid = f"g{scheme.group_size}" if scheme.group_size else "per-channel"
    parts = [f"{recipe.method.upper()} W{scheme.bits} {grid} {'sym' if scheme.symmetric else 'asym'}"]
    if recipe.method != "rtn":
        parts += {"weight": ["act-order"], "group": ["group act-order"]}.get(solver.actorder, [])
    if solver.observer == "mse":
        parts.append("Hessian-weighted MSE scales" if solver.mse_hessian and recipe.method == "gptq" else "MSE scales")
    if solver.scale_rounds and recipe.method == "gptq":
        parts.append(f"least-squares scales ×{solver.scale_rounds}")
    parts.append("routed experts" if recipe.scope == "experts" else "all Linears")
    if recipe.method != "rtn":
        parts += {
            "all": ["every token to every expert"],
            "hybrid": [f"every token to experts under {recipe.min_tokens} tokens"],
        }.get(recipe.calibration, [])
        parts.append("float target" if recipe.target == "float" else "")
        parts.append("router-weighted" if recipe.router_weighted else "")
    parts.append("unquantized Linears in FP8" if recipe.unquantized == "fp8" else "")
    source = "" if data.source == "builtin" else f" of {data.source}"
    parts.append(f"{data.num_samples}×{data.seq_len} tokens{source}")
    return ", ".join(p for p in parts if p)


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise StreamqError(f"--{name.replace('_', '-')} {value!r} is not supported; choose one of {', '.join(allowed)}")
