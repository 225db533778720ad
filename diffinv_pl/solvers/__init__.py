"""Posterior samplers on one contract (see :mod:`diffinv_pl.solvers.base`) and their registry."""

from diffinv_pl.solvers.base import (
    InverseProblem,
    Solver,
    SolverCost,
    SolverResult,
    check_solver_arguments,
    check_solver_setup,
    needs_linear_operator,
    needs_prior,
)
from diffinv_pl.solvers.classical import bicubic_upsampling, pseudo_inverse, tv_least_squares
from diffinv_pl.solvers.codps import codps, codps_plus
from diffinv_pl.solvers.daps import daps
from diffinv_pl.solvers.diffusion_posterior_sampling import dps
from diffinv_pl.solvers.exact_oracle import oracle
from diffinv_pl.solvers.padis import padis_dps, padis_langevin, padis_pc
from diffinv_pl.solvers.resample import resample

SOLVERS: dict[str, Solver] = {
    "bicubic": bicubic_upsampling,
    "codps": codps,
    "codps_plus": codps_plus,
    "daps": daps,
    "dps": dps,
    "oracle": oracle,
    "padis_dps": padis_dps,
    "padis_langevin": padis_langevin,
    "padis_pc": padis_pc,
    "pinv": pseudo_inverse,
    "resample": resample,
    "tv": tv_least_squares,
}


def get_solver(name: str) -> Solver:
    """Solver function by registry name; unknown names raise with the list of valid ones."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(sorted(SOLVERS))}") from None


__all__ = [
    "SOLVERS",
    "InverseProblem",
    "Solver",
    "SolverCost",
    "SolverResult",
    "bicubic_upsampling",
    "codps",
    "codps_plus",
    "daps",
    "dps",
    "check_solver_arguments",
    "check_solver_setup",
    "get_solver",
    "needs_linear_operator",
    "needs_prior",
    "oracle",
    "padis_dps",
    "padis_langevin",
    "padis_pc",
    "pseudo_inverse",
    "resample",
    "tv_least_squares",
]
