"""The recipe: everything that decides the bytes of a quantized checkpoint.

It is validated once at the CLI edge, saved as OUT/streamq_recipe.json, and its hash guards resume: a rerun
with a different recipe must not continue somebody else's half-written output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from streamq.data_config import DataConfig
from streamq.errors import StreamqError
from streamq.groups import FAMILIES, Family
from streamq.solvers.scheme import QuantScheme, SolverConfig

Method = Literal["gptq", "rtn", "awq"]
Scope = Literal["experts", "all"]
CalibrationMode = Literal["routed", "all", "hybrid"]
Target = Literal["layer", "float"]
Refine = Literal["all", "down"]
UnquantizedDtype = Literal["bf16", "fp8"]
SourceExperts = Literal["requantize", "keep"]
# A family left unquantized: dequantized to bf16, the release's FP8 blocks, or (routed experts of a pack-quantized
# source, --source-experts keep) the source's packed tensors copied as shipped.
Kept = Literal["bf16", "fp8", "keep"]
# What one family of Linears becomes: a quantized scheme, or kept.
GroupScheme = QuantScheme | Kept

RECIPE_NAME = "streamq_recipe.json"
SCHEME_SPECS = "nvfp4, mxfp4, wNa16 (N = 2, 3, 4, 8; groups of 128, or -gG, -g0 per channel, -asym), fp8 or bf16"
_INT_SPEC = re.compile(r"^w(\d+)a16(?:-g(\d+))?(-asym)?$")


def parse_scheme(spec: str) -> GroupScheme:
    """A ``--scheme`` value: ``nvfp4``, ``mxfp4``, ``wNa16`` (compressed-tensors 0.20's WNA16 presets: N-bit
    symmetric integers in groups of 128, N = 2, 3, 4, 8), ``wNa16-gG`` (G = 0: one scale per channel),
    ``wNa16[-gG]-asym``, ``fp8`` (the source's FP8 blocks kept as shipped) or ``bf16`` (dequantized)."""
    spec = spec.strip().lower()
    if spec in ("bf16", "fp8"):
        return spec  # type: ignore[return-value]
    if spec in ("nvfp4", "mxfp4"):
        return QuantScheme.preset(spec)  # type: ignore[arg-type]
    match = _INT_SPEC.match(spec)
    if match is None:
        raise StreamqError(f"--scheme: {spec!r} is not a scheme; use {SCHEME_SPECS}")
    bits = int(match[1])
    group = int(match[2]) if match[2] is not None else 128
    try:
        return QuantScheme(bits=bits, group_size=group, symmetric=match[3] is None)
    except ValueError as exc:
        raise StreamqError(f"--scheme {spec}: {exc}") from None


def scheme_spec(scheme: GroupScheme) -> str:
    """The canonical ``--scheme`` value of ``scheme`` (``parse_scheme`` inverts it)."""
    if isinstance(scheme, str):
        return scheme
    if scheme.format != "int":
        return scheme.format
    group = "" if scheme.group_size == 128 else f"-g{scheme.group_size}"
    return f"w{scheme.bits}a16{group}{'' if scheme.symmetric else '-asym'}"


@dataclass(frozen=True)
class Plan:
    """What each family of decoder Linears becomes in one run, in ``FAMILIES`` order."""

    schemes: tuple[tuple[Family, GroupScheme], ...]

    def of(self, family: Family) -> GroupScheme:
        return dict(self.schemes)[family]

    def quantized(self) -> dict[Family, QuantScheme]:
        return {f: s for f, s in self.schemes if isinstance(s, QuantScheme)}

    def kept(self, dtype: Kept) -> list[Family]:
        """The families left unquantized as ``dtype``."""
        return [f for f, s in self.schemes if s == dtype]

    def by_scheme(self) -> dict[QuantScheme, list[Family]]:
        """The quantized families grouped by scheme, in order of first appearance (routed experts first)."""
        out: dict[QuantScheme, list[Family]] = {}
        for family, scheme in self.quantized().items():
            out.setdefault(scheme, []).append(family)
        return out


# The output Fisher pre-pass's default budget: 8 sequences of 4096 tokens (bench/RESULTS.md, "The output Fisher").
FISHER_TOKENS = 32768

# Solver fields written to the recipe only when not at these values (see Recipe.to_dict).
_SOLVER_OPTIONAL = {"code_rounds": 0, "scale_candidates": (), "outside_weight": 1.0}


def default_solver() -> SolverConfig:
    """The default recipe's solver: GPTQ with MSE-searched group scales over 20 clipping ratios 1.00, 0.99, ...
    0.81 (llm-compressor's MSE observer range; bench/RESULTS.md "issue 13": the direction that paid against
    llm-compressor's GPTQ, and 20 ratios rather than 80 keep its cost small at DeepSeek-V3 width), then the
    refinements after the sweep: six scale candidates and two rounds of code descent, which the default recipe
    (``Recipe.refine`` "down") applies to the down projections alone: they carry ~90% of an expert's output error
    on the trained fixture, and at DeepSeek-V3 width they are the cheap matrices (2048 columns against gate/up's
    7168), so the refinement costs a fraction of refining every Linear for most of its gain (bench/RESULTS.md,
    "Refinements where the error is"). The down projections' output errors are weighed by the model's output Fisher
    (``Recipe.fisher_tokens``), which replaced the descent's column-space weighting (``--outside-weight 0.4
    --fisher-tokens 0`` is the default before it); ``--observer absmax --scale-candidates none --code-rounds 0
    --fisher-tokens 0`` the default before issue 13, byte for byte."""
    return SolverConfig(observer="mse", mse_grid=100, mse_max_shrink=0.2, **DOWN_REFINED)


# The refinements after the sweep that measured best on the trained fixture (bench/RESULTS.md, issue 13): REFINED
# for every Linear (``--refine all``), DOWN_REFINED, the default, for the down projections (``--refine down``).
REFINED = {"scale_candidates": (0.94, 0.97, 1.03), "code_rounds": 2}
DOWN_REFINED = {"scale_candidates": (0.88, 0.91, 0.94, 0.97, 1.03, 1.06), "code_rounds": 2}


@dataclass(frozen=True)
class Recipe:
    """``scope``: "experts" quantizes the routed experts only; "all" also the shared experts, the dense MLPs
    and the attention projections. ``calibration``: "routed" feeds each expert's Hessian only the tokens the
    router sends it; "all" feeds every token to every expert's Hessian; "hybrid" does that only for experts that
    were routed fewer than ``min_tokens`` tokens. The block's output always follows the real top-k routing.
    ``unquantized``: how Linears that are not quantized are written (bf16, or DeepSeek's FP8 blocks as shipped).
    ``schemes``: per-family overrides (family name, ``--scheme`` value) of what scope, unquantized and the solver's
    scheme give each family (see ``plan``); empty for a recipe of one scheme, and then not serialised, so such a
    recipe has the file and digest it had before mixed recipes existed.
    ``source_experts``: routed experts a source ships packed (Kimi-K2-Thinking's INT4) are dequantized and
    quantized again ("requantize"), or copied as shipped ("keep"; then only the other families the plan quantizes
    are solved). Serialised only when "keep", like ``schemes``.
    ``target``: what a routed expert's solve matches: "layer" its own output on its quantized input (GPTQ),
    "float" the unquantized model's output (GPTAQ's asymmetric calibration, see solvers/gptaq.py).
    ``router_weighted``: a routed expert's calibration tokens weigh their router weight squared, as its error
    reaches the block's output scaled by that weight (all-token calibration's extra tokens stay unweighted).
    ``fisher_tokens``: calibration tokens (whole sequences, from the first) of the pre-pass that measures each
    block's output Fisher (streamq/fisher.py); the down projections are then solved ``row_chunks`` chunks of rows
    at a time, each towards what makes up for the earlier chunks' errors under the metric ``fisher_weight`` ·
    Fisher + (1 - ``fisher_weight``) · I (solvers/row_chunks.py). 0 turns it off; GPTQ only. Not serialised when
    off, so recipes from before it keep their file and digest.
    """

    method: Method = "gptq"
    solver: SolverConfig = field(default_factory=default_solver)
    scope: Scope = "experts"
    calibration: CalibrationMode = "routed"
    min_tokens: int = 256
    tie_gate_up: bool = True
    unquantized: UnquantizedDtype = "bf16"
    source_experts: SourceExperts = "requantize"
    target: Target = "layer"
    router_weighted: bool = False
    refine: Refine = "down"
    fisher_tokens: int = FISHER_TOKENS
    fisher_weight: float = 0.5
    row_chunks: int = 8
    data: DataConfig = field(default_factory=DataConfig)
    schemes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "schemes", _normalized_schemes(self.schemes))
        _one_of("method", self.method, ("gptq", "rtn", "awq"))
        _one_of("scope", self.scope, ("experts", "all"))
        _one_of("calibration", self.calibration, ("routed", "all", "hybrid"))
        _one_of("unquantized", self.unquantized, ("bf16", "fp8"))
        _one_of("source_experts", self.source_experts, ("requantize", "keep"))
        self._check_kept_experts()
        _one_of("target", self.target, ("layer", "float"))
        _one_of("refine", self.refine, ("all", "down"))
        if not (self.solver.scale_candidates or self.solver.code_rounds):
            object.__setattr__(self, "refine", "all")  # nothing to apply: one canonical form, one digest
        if not 0 < self.solver.outside_weight <= 1:
            raise StreamqError(f"--outside-weight must be in (0, 1], not {self.solver.outside_weight:g}")
        if not self.solver.code_rounds and self.solver.outside_weight != 1:
            # It weighs the descent's objective: without rounds it changes nothing (so, like refine, one form).
            object.__setattr__(self, "solver", dataclasses.replace(self.solver, outside_weight=1.0))
        self._check_fisher()
        _one_of("actorder", self.solver.actorder, ("none", "weight"))
        _one_of("observer", self.solver.observer, ("minmax", "mse"))
        if self.min_tokens < 0:
            raise StreamqError(f"--min-tokens must be >= 0, not {self.min_tokens}")
        if not 0 <= self.solver.damp < 1:
            raise StreamqError(f"--damp must be in [0, 1), not {self.solver.damp}")
        self._check_scale_rounds()
        self._check_refinements()
        if self.method == "awq":
            _check_awq(self.plan())

    def plan(self, fp8_source: bool = True) -> Plan:
        """Each family's scheme: the old options' (the routed experts get the solver's scheme; ``scope`` "all"
        gives it to every family, otherwise the rest stay ``unquantized``, FP8 only where the source has FP8
        blocks), then the ``schemes`` overrides."""
        kept: UnquantizedDtype = "fp8" if self.unquantized == "fp8" and fp8_source else "bf16"
        base: dict[Family, GroupScheme] = {f: self.scheme if self.scope == "all" else kept for f in FAMILIES}
        base[Family.EXPERTS] = self.scheme
        base.update({Family(f): parse_scheme(spec) for f, spec in self.schemes})
        if self.source_experts == "keep":
            base[Family.EXPERTS] = "keep"
        return Plan(tuple(base.items()))

    def solver_for(self, scheme: QuantScheme) -> SolverConfig:
        """The solver's settings with ``scheme`` as its grid."""
        return dataclasses.replace(self.solver, scheme=scheme)

    def _check_kept_experts(self) -> None:
        if self.source_experts != "keep":
            return
        if Family.EXPERTS.value in dict(self.schemes):
            raise StreamqError(
                "--source-experts keep copies the routed experts as shipped, which contradicts --scheme experts=...: "
                "drop one of them"
            )
        if not self.plan().quantized():
            raise StreamqError(
                "--source-experts keep copies the routed experts as shipped, so this recipe would quantize nothing: "
                "use --scope all or --scheme FAMILY=SPEC (attention, shared, dense), or --source-experts requantize"
            )
        if self.method == "awq":
            raise StreamqError(
                "--method awq folds its scales into the norm the routed experts read, which experts kept as shipped "
                "cannot absorb: use --method gptq or rtn, or --source-experts requantize"
            )

    def _check_scale_rounds(self) -> None:
        rounds = self.solver.scale_rounds
        if rounds < 0:
            raise StreamqError(f"--scale-rounds must be >= 0, not {rounds}")
        schemes = [self.scheme, *self.plan().quantized().values()]
        fp4 = next((s.format for s in schemes if s.format != "int"), None)
        if rounds and fp4 is not None:
            raise StreamqError(
                f"--scale-rounds fits integer scales: add --scale-rounds 0 to --format {fp4} (or a --scheme of {fp4})"
            )
        if rounds and any(s.group_size for s in schemes) and self.solver.actorder != "weight":
            raise StreamqError("--scale-rounds needs scales fixed before the sweep: --act-order, or --scale-rounds 0")

    def _check_fisher(self) -> None:
        if self.fisher_tokens < 0:
            raise StreamqError(f"--fisher-tokens must be >= 0 (0: off), not {self.fisher_tokens}")
        if not 0 < self.fisher_weight < 1:
            raise StreamqError(f"--fisher-weight must be in (0, 1), not {self.fisher_weight:g}")
        if self.row_chunks < 1:
            raise StreamqError(f"--row-chunks must be >= 1, not {self.row_chunks}")
        if self.method != "gptq" or self.row_chunks == 1:
            object.__setattr__(self, "fisher_tokens", 0)  # nothing would use it: one form, one digest
        if not self.fisher_tokens:
            object.__setattr__(self, "fisher_weight", 0.5)
            object.__setattr__(self, "row_chunks", 8)

    def _check_refinements(self) -> None:
        rounds, candidates = self.solver.code_rounds, self.solver.scale_candidates
        if rounds < 0:
            raise StreamqError(f"--code-rounds must be >= 0, not {rounds}")
        if any(not (0 < m < 2) or m == 1 for m in candidates):
            listed = ",".join(f"{m:g}" for m in candidates)
            raise StreamqError(f"--scale-candidates {listed}: each must be in (0, 2) and not 1 (the scales as fitted)")

    @property
    def scheme(self) -> QuantScheme:
        return self.solver.scheme

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["schemes"]
        if self.schemes:
            d["schemes"] = dict(self.schemes)
        if self.source_experts == "requantize":
            del d["source_experts"]
        if self.refine == "all":
            del d["refine"]
        if not self.fisher_tokens:
            for name in ("fisher_tokens", "fisher_weight", "row_chunks"):
                del d[name]
        for name, off in _SOLVER_OPTIONAL.items():  # off: not serialised, so older recipes keep their digest
            if d["solver"][name] == off:
                del d["solver"][name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        solver = dict(d["solver"])
        solver["scheme"] = QuantScheme(**solver["scheme"])
        solver["scale_candidates"] = tuple(solver.get("scale_candidates", ()))
        schemes = tuple(dict(d.get("schemes") or {}).items())
        d = {"refine": "all", "fisher_tokens": 0, **d}  # written only when "down" / when on (see the class)
        return cls(**{**d, "solver": SolverConfig(**solver), "data": DataConfig(**d["data"]), "schemes": schemes})

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
    solver, data = recipe.solver, recipe.data
    if recipe.schemes:  # one scheme per family, in the order of FAMILIES
        plan = ", ".join(f"{f.value} {_label(s)}" for f, s in recipe.plan().schemes)
        parts = [f"{recipe.method.upper()} {plan}"]
    else:
        parts = [f"{recipe.method.upper()} {_label(recipe.scheme)}"]
    if recipe.method != "rtn":
        parts += {"weight": ["act-order"], "group": ["group act-order"]}.get(solver.actorder, [])
    if solver.observer == "mse":
        parts.append("Hessian-weighted MSE scales" if solver.mse_hessian and recipe.method == "gptq" else "MSE scales")
    if solver.scale_rounds and recipe.method == "gptq":
        parts.append(f"least-squares scales ×{solver.scale_rounds}")
    if recipe.method == "gptq":
        parts += _refinements(solver, recipe.refine)
        if recipe.fisher_tokens:
            parts.append("output Fisher" + _fisher_settings(recipe))
    if not recipe.schemes:
        parts.append("routed experts" if recipe.scope == "experts" else "all Linears")
        if recipe.source_experts == "keep":
            parts[-1] = "all Linears but the routed experts, kept as shipped"
    if recipe.method != "rtn":
        parts += {
            "all": ["every token to every expert"],
            "hybrid": [f"every token to experts under {recipe.min_tokens} tokens"],
        }.get(recipe.calibration, [])
        parts.append("float target" if recipe.target == "float" else "")
        parts.append("router-weighted" if recipe.router_weighted else "")
    parts.append("unquantized Linears in FP8" if recipe.unquantized == "fp8" and not recipe.schemes else "")
    source = "" if data.source == "builtin" else f" of {data.source}"
    parts.append(f"{data.num_samples}×{data.seq_len} tokens{source}")
    return ", ".join(p for p in parts if p)


def _refinements(solver: SolverConfig, refine: Refine) -> list[str]:
    """GPTQ's refinements after the sweep: which Linears they refine, and the candidates and rounds where they are
    not the default's (six scale candidates, two rounds of code descent)."""
    default = default_solver()
    parts = []
    if solver.scale_candidates != default.scale_candidates:
        listed = ",".join(f"{m:g}" for m in solver.scale_candidates)
        parts.append(f"scale candidates {listed}" if listed else "no scale candidates")
    rounds = solver.code_rounds
    if rounds != default.code_rounds:
        parts.append(f"code descent ×{rounds}" if rounds else "no code descent")
    if solver.outside_weight != default.outside_weight:
        parts.append(f"errors across W's span ×{solver.outside_weight:g}")
    if solver.scale_candidates or rounds:
        parts.append("every Linear refined" if refine == "all" else "down projections refined")
    return parts


def _fisher_settings(recipe: Recipe) -> str:
    """The output Fisher's settings where they are not the default's, e.g. `` (65536 tokens, 16 row chunks)``."""
    default = Recipe()
    parts = [
        f"{recipe.fisher_tokens} tokens" if recipe.fisher_tokens != default.fisher_tokens else "",
        f"weight {recipe.fisher_weight:g}" if recipe.fisher_weight != default.fisher_weight else "",
        f"{recipe.row_chunks} row chunks" if recipe.row_chunks != default.row_chunks else "",
    ]
    listed = ", ".join(p for p in parts if p)
    return f" ({listed})" if listed else ""


def _label(scheme: GroupScheme) -> str:
    """``W4 g128 sym``, ``NVFP4``, ``MXFP4``, ``FP8 blocks`` or ``bf16``."""
    if isinstance(scheme, str):
        return {"fp8": "FP8 blocks", "keep": "kept as shipped"}.get(scheme, scheme)
    if scheme.format != "int":
        return scheme.format.upper()
    grid = f"g{scheme.group_size}" if scheme.group_size else "per-channel"
    return f"W{scheme.bits} {grid} {'sym' if scheme.symmetric else 'asym'}"


def _normalized_schemes(schemes: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Family and canonical spec per override, in FAMILIES order; an unknown family or spec is refused here."""
    given: dict[Family, str] = {}
    names = ", ".join(f.value for f in FAMILIES)
    for name, spec in schemes:
        if name not in {f.value for f in FAMILIES}:
            raise StreamqError(f"--scheme {name}={spec}: unknown family {name!r}; choose one of {names}")
        scheme = parse_scheme(spec)
        if name == Family.EXPERTS.value and not isinstance(scheme, QuantScheme):
            raise StreamqError(
                f"--scheme experts={spec}: the routed experts are what streamq quantizes; give them a quantized "
                "scheme (nvfp4, mxfp4 or wNa16)"
            )
        given[Family(name)] = scheme_spec(scheme)
    return tuple((f.value, given[f]) for f in FAMILIES if f in given)


def _check_awq(plan: Plan) -> None:
    """AWQ searches one scale per input for one grid, and folds into the shared experts when they are not
    quantized (see smooth.py): both must be possible."""
    if plan.of(Family.SHARED) == "fp8":
        raise StreamqError(
            "--method awq folds its scales into the shared experts' weights, which then cannot stay FP8: "
            "use --unquantized bf16 or --scope all (or --scheme shared=bf16 or a quantized scheme)"
        )
    if len(plan.by_scheme()) > 1:
        schemes = ", ".join(scheme_spec(s) for s in plan.by_scheme())
        raise StreamqError(
            f"--method awq searches its scales for one grid, but this recipe quantizes with {schemes}; use "
            "--method gptq or rtn for mixed schemes, or give every quantized family the same --scheme"
        )


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise StreamqError(f"--{name.replace('_', '-')} {value!r} is not supported; choose one of {', '.join(allowed)}")
