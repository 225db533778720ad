"""How well do the seed solvers' likelihood approximations point along the exact grad_x log p(y | x_sigma)?

On the MCGdiff GMM problems (20 problems of one cell), at states x ~ p_sigma(x | y) (where a correct posterior
sampler is at noise level sigma; EDM form x = x0 + sigma n), compare with the exact likelihood score
g = grad_x log p(y | x) (closed form, exact_posterior.md §3.6):

* ``codps``: the covariance-corrected Gaussian likelihood of CoDPS+ (methods.md §6), in EDM units:
  v = (1/sigma^2 + inv_var)^-1, J = v / sigma^2 (the scalar Jacobian), g ~ J A^T (sigma_y^2 I + v A A^T)^-1 (y - A D(x)),
  for the released inv_var (0.1 FFHQ deblur CoDPS, 1 CoDPS+) and for 1/128 (the prior's per-coordinate variance);
* ``dps_exact_jacobian``: the DPS form with the exact Tweedie Jacobian and no covariance term,
  g ~ (dD/dx)^T A^T (y - A D(x)) / sigma_y^2;
* ``tweedie_gaussian``: the Gaussian approximation N(D(x), Cov[x0 | x]) with the exact Tweedie mean and covariance
  and the exact Jacobian -- the best any one-Gaussian likelihood can do (what DAPS's and CoDPS's Gaussian
  approximations aim at; multimodal p(x0 | x) breaks it).

Printed per sigma: the median over all (problem, sample) pairs of the cosine between the approximation and g, the
share of pairs whose cosine is below 0.9, and the median of log10(|approx| / |g|) (0 = right size). Command:

    python experiments/gmm_posterior/guidance_alignment.py [--dx 8] [--dy 1] [--samples 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffinv_pl.data.gmm_problems import make_gmm_problems  # noqa: E402

SIGMAS = (20.0, 10.0, 5.0, 2.0, 1.0, 0.5, 0.2, 0.1)


def _solve_gram(A: torch.Tensor, r: torch.Tensor, sigma_y: torch.Tensor, v: torch.Tensor | float) -> torch.Tensor:
    """(sigma_y^2 I + v A A^T)^-1 r per problem: A (P, dy, d), r (P, n, dy), sigma_y (P,)."""
    dy = A.shape[1]
    C = sigma_y[:, None, None] ** 2 * torch.eye(dy, dtype=A.dtype) + v * A @ A.transpose(1, 2)
    return torch.linalg.solve(C[:, None], r[..., None])[..., 0]


def approximations(problems, x: torch.Tensor, sigma: float) -> dict[str, torch.Tensor]:
    prior, A, y, sy = problems.prior, problems.operator.matrix, problems.y, problems.sigma_y
    D = prior.denoise(x, sigma)
    r = y - D @ A.transpose(1, 2)  # (P, n, dy)
    out = {}
    for label, inv_var in (("codps inv_var 0.1", 0.1), ("codps inv_var 1", 1.0), ("codps inv_var 1/128", 1 / 128)):
        v = 1.0 / (1.0 / sigma**2 + inv_var)
        out[label] = (v / sigma**2) * _solve_gram(A, r, sy, v) @ A
    back = r @ A / sy[:, None, None] ** 2  # A^T r / sigma_y^2
    out["dps_exact_jacobian"] = prior.denoiser_jvp(x, sigma, back)
    # N(y; A D(x), sigma_y^2 I + A Cov A^T), differentiated with the exact Jacobian, the covariance held fixed
    cov_At = torch.stack([prior.cov_matvec(x, sigma, A[:, e, None, :].expand_as(x)) for e in range(A.shape[1])], -1)
    S = sy[:, None, None, None] ** 2 * torch.eye(A.shape[1], dtype=x.dtype) + A[:, None] @ cov_At
    out["tweedie_gaussian"] = prior.denoiser_jvp(x, sigma, (torch.linalg.solve(S, r[..., None])[..., 0]) @ A)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dx", type=int, default=8)
    parser.add_argument("--dy", type=int, default=1)
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.dx < 2 or args.dx % 2 or not 0 < args.dy <= args.dx or args.samples < 1 or args.problems < 1:
        parser.error("need an even dx >= 2, 0 < dy <= dx, and positive --problems/--samples")
    problems = make_gmm_problems(args.dx, args.dy, args.problems, "mcgdiff", None, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for sigma in SIGMAS:
        x = problems.posterior.noised(sigma).sample(args.samples, gen)  # (P, n, d)
        exact = problems.prior.likelihood_score(x, sigma, problems.operator.matrix, problems.y[:, 0], problems.sigma_y)
        for label, g in approximations(problems, x, sigma).items():
            cos = torch.nn.functional.cosine_similarity(g, exact, dim=-1)
            ratio = torch.log10(g.norm(dim=-1) / exact.norm(dim=-1))
            rows.append((sigma, label, float(cos.median()), float((cos < 0.9).double().mean()), float(ratio.median())))
    print(f"dx = {args.dx}, dy = {args.dy}, {args.problems} MCGdiff problems, {args.samples} states x ~ p_sigma(x | y) "
          "each; medians over all states\n")
    print("| sigma | approximation | cosine with exact (median) | share with cosine < 0.9 | log10 norm ratio (median) |")
    print("|---|---|---|---|---|")
    for sigma, label, cos, bad, ratio in rows:
        print(f"| {sigma:g} | {label} | {cos:.3f} | {bad:.2f} | {ratio:+.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
