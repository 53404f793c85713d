"""Weight solvers: GPTQ (batched over experts), RTN, and the textbook GPTQ they are measured against."""

from streamq.solvers.gptq import SolveOptions, gptq_quantize, gptq_solve_prepared
from streamq.solvers.hessian import (
    DampingPolicy,
    FactorOptions,
    PreparedHessians,
    hessian_weighted_error,
    prepare_hessians,
)
from streamq.solvers.reference import gptq_reference
from streamq.solvers.rtn import rtn_quantize
from streamq.solvers.scheme import QuantResult, QuantScheme, SolverConfig

__all__ = [
    "DampingPolicy",
    "FactorOptions",
    "PreparedHessians",
    "QuantResult",
    "QuantScheme",
    "SolveOptions",
    "SolverConfig",
    "gptq_quantize",
    "gptq_reference",
    "gptq_solve_prepared",
    "hessian_weighted_error",
    "prepare_hessians",
    "rtn_quantize",
]
