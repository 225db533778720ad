"""Gaussian-mixture inverse problems with exact posteriors (exact_posterior.md §0-§2).

MCGdiff protocol ("mcgdiff"): 25 unit-covariance components with means (-8i, -8j, -8i, -8j, ...) for
(i, j) in {-2..2}^2, weights w_k ∝ eps_k^2 drawn once per dx; per problem A = U S' V^T with the singular values of a
Gaussian matrix replaced by dy sorted U(0, 1) values, sigma_y = u * max(S'), x* ~ prior, y = A x* + sigma_y n.
TMPD variant ("tmpd"): equal weights and a fixed sigma_y.

Seeds: problem i of a (dx, dy) cell has its own stream, seeded by :func:`problem_seed` = ``hash_seed(seed, "gmm",
protocol, dx, dy, i, "problem")`` (sha256, so no two problems share a seed for any number of problems); it draws A,
then u (mcgdiff), then x* and the measurement noise. The seed does not contain sigma_y, so the TMPD variant has the
same A, x* and noise direction for every sigma_y of a (dx, dy) pair. The mixture weights (mcgdiff) are the benchmark's
fixed prior and keep their seed ``seed * 10**6 + dx * 1000`` (unique per (seed, dx) for dx < 1000, which
:func:`grid_prior` enforces), so the prior stays the one of the earlier tables and of the trained GMM denoisers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffinv_pl.errors import UserError
from diffinv_pl.operators.matrix import MatrixOperator, random_svd_matrix
from diffinv_pl.priors.analytic import GaussianMixture
from diffinv_pl.utils.seeding import hash_seed

PROTOCOLS = ("mcgdiff", "tmpd")


def grid_means(dim: int, spacing: float = 8.0) -> Tensor:
    """The 25 component means (-s i, -s j, -s i, -s j, ...) for (i, j) in {-2..2}^2, shape (25, dim), float64."""
    if dim < 2 or dim % 2:
        raise UserError(f"the grid mixture needs an even dimension >= 2, got {dim}")
    ij = torch.tensor([(i, j) for i in range(-2, 3) for j in range(-2, 3)], dtype=torch.float64)
    return (-spacing * ij).repeat(1, dim // 2)


def grid_prior(dim: int, protocol: str, seed: int = 0) -> GaussianMixture:
    """The benchmark prior for one dimension: chi^2_1 weights (mcgdiff) or equal weights (tmpd), identity covariances."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown GMM protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    if protocol == "mcgdiff":
        if dim >= 1000:  # the weight seed seed * 10**6 + dim * 1000 is unique per (seed, dim) below 1000 only
            raise UserError(f"the mcgdiff grid mixture supports dimensions < 1000, got {dim}")
        gen = torch.Generator().manual_seed(seed * 10**6 + dim * 1000)
        weights = torch.randn(25, generator=gen, dtype=torch.float64) ** 2
    else:
        weights = torch.ones(25, dtype=torch.float64)
    return GaussianMixture.isotropic(weights, grid_means(dim), variance=1.0)


def problem_seed(seed: int, protocol: str, dim: int, dim_y: int, index: int) -> int:
    """Seed of problem ``index`` of the (dim, dim_y) cell: one sha256 stream per problem (module docstring)."""
    return hash_seed(seed, "gmm", protocol, dim, dim_y, index, "problem")


@dataclass
class GMMProblemSet:
    """P inverse problems sharing one prior: y[p] = A[p] x_true[p] + sigma_y[p] n."""

    prior: GaussianMixture
    operator: MatrixOperator
    y: Tensor  # (P, 1, dy): broadcasts against (P, n, dy) operator outputs for n samples per problem
    sigma_y: Tensor  # (P,)
    x_true: Tensor  # (P, dx)
    posterior: GaussianMixture  # exact p(x0 | y), batched over the P problems

    @property
    def num_problems(self) -> int:
        return self.x_true.shape[0]


def make_gmm_problems(
    dim: int,
    dim_y: int,
    num_problems: int = 20,
    protocol: str = "mcgdiff",
    sigma_y: float | None = None,
    seed: int = 0,
) -> GMMProblemSet:
    """Build ``num_problems`` problems of one (dx, dy) cell of the MCGdiff or TMPD protocol (module docstring)."""
    if protocol == "tmpd" and (sigma_y is None or sigma_y <= 0):
        raise UserError("the tmpd protocol needs a fixed sigma_y > 0 (the TMPD grid uses 0.01, 0.1, 1.0)")
    if protocol == "mcgdiff" and sigma_y is not None:
        raise UserError("the mcgdiff protocol draws sigma_y = u * max(singular value); leave sigma_y unset")
    if not 0 < dim_y <= dim:
        raise UserError(f"need 0 < dy <= dx, got dx={dim}, dy={dim_y}")
    if num_problems < 1:
        raise UserError(f"num_problems must be >= 1, got {num_problems}")
    prior = grid_prior(dim, protocol, seed)
    mats, ys, noise_levels, xs = [], [], [], []
    for i in range(num_problems):
        gen = torch.Generator().manual_seed(problem_seed(seed, protocol, dim, dim_y, i))
        A = random_svd_matrix(dim_y, dim, gen)
        if protocol == "mcgdiff":
            noise = torch.rand((), generator=gen, dtype=torch.float64) * torch.linalg.matrix_norm(A, ord=2)
        else:
            noise = torch.tensor(float(sigma_y), dtype=torch.float64)
        x = prior.sample(1, gen)[0, 0]
        mats.append(A)
        noise_levels.append(noise)
        xs.append(x)
        ys.append(A @ x + noise * torch.randn(dim_y, generator=gen, dtype=torch.float64))
    A, y, sig = torch.stack(mats), torch.stack(ys), torch.stack(noise_levels)
    return GMMProblemSet(
        prior=prior,
        operator=MatrixOperator(A),
        y=y[:, None, :],
        sigma_y=sig,
        x_true=torch.stack(xs),
        posterior=prior.posterior(A, y, sig),
    )
