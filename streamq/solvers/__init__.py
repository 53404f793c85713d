"""Weight solvers: GPTQ (batched over experts), RTN, and the textbook GPTQ they are measured against."""

from streamq.solvers.gptq import SolveOptions, gptq_quantize
from streamq.solvers.hessian import DampingPolicy, hessian_weighted_error
from streamq.solvers.reference import gptq_reference
from streamq.solvers.rtn import rtn_quantize
from streamq.solvers.scheme import QuantResult, QuantScheme, SolverConfig

__all__ = [
    "DampingPolicy",
    "QuantResult",
    "QuantScheme",
    "SolveOptions",
    "SolverConfig",
    "gptq_quantize",
    "gptq_reference",
    "hessian_weighted_error",
    "rtn_quantize",
]
