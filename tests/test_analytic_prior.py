"""Analytic Gaussian-mixture prior against finite differences, dense closed forms and Monte Carlo (float64).

Reference values are computed here from dense matrices (torch.distributions, explicit inverses), independently of
the spectral implementation in diffinv_pl.priors.analytic.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffinv_pl.data.gmm_problems import grid_prior
from diffinv_pl.operators import random_svd_matrix
from diffinv_pl.priors import GaussianMixture

F64 = torch.float64
D, K = 6, 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense_params(seed: int = 0):
    g = _gen(seed)
    means = 3 * torch.randn(K, D, generator=g, dtype=F64)
    L = 0.6 * torch.randn(K, D, D, generator=g, dtype=F64)
    covs = L @ L.transpose(-1, -2) + 0.8 * torch.eye(D, dtype=F64)
    weights = torch.rand(K, generator=g, dtype=F64) + 0.1
    return weights / weights.sum(), means, covs


def _mixtures():
    w, mu, covs = _dense_params()
    return {
        "full": (GaussianMixture.from_dense(w, mu, covs), covs),
        "shared_full": (GaussianMixture.from_dense(w, mu, covs[0]), covs[0].expand(K, D, D)),
        "isotropic": (GaussianMixture.isotropic(w, mu, 1.3), 1.3 * torch.eye(D, dtype=F64).expand(K, D, D)),
    }


MIXTURES = list(_mixtures())


def _dense_log_joint(x, sigma, w, mu, covs):
    C = covs + sigma**2 * torch.eye(D, dtype=F64)
    return torch.stack([torch.distributions.MultivariateNormal(mu[k], C[k]).log_prob(x) for k in range(K)], -1) + w.log()


def _fd_grad(f, x, eps=1e-5):
    eye = torch.eye(x.shape[-1], dtype=F64)
    return torch.stack([(f(x + eps * eye[i]) - f(x - eps * eye[i])) / (2 * eps) for i in range(x.shape[-1])], -1)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("sigma", [0.05, 0.7, 4.0])
def test_score_matches_finite_differences_and_log_prob_matches_dense(name, sigma):
    prior, covs = _mixtures()[name]
    w, mu, _ = _dense_params()
    x = 3 * torch.randn(7, D, generator=_gen(1), dtype=F64)
    dense = torch.logsumexp(_dense_log_joint(x, sigma, w, mu, covs), -1)
    assert _rel(prior.log_prob(x, sigma), dense) <= 1e-12
    assert _rel(prior.score(x, sigma), _fd_grad(lambda z: prior.log_prob(z, sigma), x)) <= 1e-8


@pytest.mark.parametrize("name", MIXTURES)
def test_tweedie_mean_is_the_mixture_of_component_posteriors(name):
    prior, covs = _mixtures()[name]
    w, mu, _ = _dense_params()
    sigma = 0.9
    x = 3 * torch.randn(7, D, generator=_gen(2), dtype=F64)
    r = torch.softmax(_dense_log_joint(x, sigma, w, mu, covs), -1)
    C = covs + sigma**2 * torch.eye(D, dtype=F64)
    m = mu + torch.einsum("kde,nke->nkd", covs @ torch.linalg.inv(C), x[:, None] - mu)
    expected = (r[..., None] * m).sum(1)
    assert _rel(prior.denoise(x, sigma), expected) <= 1e-12
    assert _rel(prior.component_means(x, sigma), m) <= 1e-12
    assert _rel(prior.denoise(x, sigma), x + sigma**2 * prior.score(x, sigma)) <= 1e-12


@pytest.mark.parametrize("name", MIXTURES)
def test_posterior_covariance_equals_jacobian_and_hessian_forms(name):
    prior, _ = _mixtures()[name]
    sigma = 0.8
    x = 3 * torch.randn(1, D, generator=_gen(3), dtype=F64)
    cov = prior.denoise_cov(x, sigma)[0]
    jac = torch.autograd.functional.jacobian(lambda z: prior.denoise(z, sigma), x)[0, :, 0, :]
    hess = torch.autograd.functional.hessian(lambda z: prior.log_prob(z, sigma).sum(), x)[0, :, 0, :]
    assert _rel(jac * sigma**2, cov) <= 1e-10
    assert _rel(sigma**2 * (torch.eye(D, dtype=F64) + sigma**2 * hess), cov) <= 1e-10
    v = torch.randn(1, D, generator=_gen(4), dtype=F64)
    assert _rel(prior.denoiser_jvp(x, sigma, v), v @ jac.T) <= 1e-10
    assert torch.linalg.eigvalsh(cov).min() > 0


def _dense_posterior(w, mu, covs, A, y, sy):
    dy = A.shape[0]
    prec = torch.linalg.inv(covs) + A.T @ A / sy**2
    cov = torch.linalg.inv(prec)
    mean = (cov @ (torch.linalg.solve(covs, mu[..., None]) + (A.T @ y / sy**2)[:, None]))[..., 0]
    lik = torch.stack(
        [torch.distributions.MultivariateNormal(A @ mu[k], sy**2 * torch.eye(dy, dtype=F64) + A @ covs[k] @ A.T).log_prob(y) for k in range(K)]
    )
    return torch.log_softmax(w.log() + lik, -1), mean, cov


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("dy", [1, 3])
def test_posterior_matches_the_dense_information_form(name, dy):
    prior, covs = _mixtures()[name]
    w, mu, _ = _dense_params()
    g = _gen(5)
    A = torch.randn(dy, D, generator=g, dtype=F64)
    y = torch.randn(dy, generator=g, dtype=F64)
    post = prior.posterior(A, y, 0.3)
    log_w, mean, cov = _dense_posterior(w, mu, covs, A, y, 0.3)
    assert _rel(post.log_weights[0].exp(), log_w.exp()) <= 1e-10
    assert _rel(post.means[0], mean) <= 1e-10
    assert _rel(post.cov.dense()[0].expand(K, D, D), cov) <= 1e-10
    if name == "isotropic":
        assert post.cov.rank == dy  # isotropic prior: isotropic plus rank-dy posterior covariance


def test_posterior_weights_agree_with_importance_sampling():
    """w_bar_k = E_prior[1{k} p(y|x)] / E_prior[p(y|x)], estimated with 4e5 prior draws."""
    w, mu, covs = _dense_params()
    prior = GaussianMixture.from_dense(w, mu, covs)
    g = _gen(6)
    A = torch.randn(1, D, generator=g, dtype=F64)
    y = A @ mu[1] + 0.5 * torch.randn(1, generator=g, dtype=F64)
    n = 400_000
    comp = torch.multinomial(w, n, replacement=True, generator=g)
    x = mu[comp] + torch.einsum("nde,ne->nd", torch.linalg.cholesky(covs)[comp], torch.randn(n, D, generator=g, dtype=F64))
    lik = torch.exp(-0.5 * ((x @ A.T - y) ** 2).sum(-1) / 2.0**2)
    est = torch.stack([(lik * (comp == k)).sum() for k in range(K)]) / lik.sum()
    exact = prior.posterior(A, y, 2.0).weights[0]
    se = (exact * (1 - exact) / (n * float(lik.mean() ** 2 / (lik**2).mean()))).sqrt()  # effective sample size
    assert bool(((est - exact).abs() <= 5 * se + 1e-4).all())


def test_exact_samples_have_the_mixture_moments():
    w, mu, covs = _dense_params()
    prior = GaussianMixture.from_dense(w, mu, covs)
    x = prior.sample(200_000, _gen(7))[0]
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (covs + mu[:, :, None] * mu[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None]
    n = x.shape[0]
    assert float((x.mean(0) - mean).abs().max()) < 5 * float(cov.diagonal().max().sqrt()) / math.sqrt(n)
    assert _rel(torch.cov(x.T), cov) < 0.02


def test_single_gaussian_likelihood_gradient_matches_finite_differences():
    """grad log p(y | x_t) from the closed forms equals finite differences of log p(y | x_t) (K = 1)."""
    g = _gen(8)
    mu = torch.randn(D, generator=g, dtype=F64)
    L = torch.randn(D, D, generator=g, dtype=F64)
    prior = GaussianMixture.gaussian(mu, L @ L.T + 0.5 * torch.eye(D, dtype=F64))
    A, y = torch.randn(2, D, generator=g, dtype=F64), torch.randn(2, generator=g, dtype=F64)
    x = torch.randn(5, D, generator=g, dtype=F64)
    for sigma in (0.1, 1.0, 10.0):
        exact = prior.likelihood_score(x, sigma, A, y, 0.4)
        fd = _fd_grad(lambda z: prior.log_likelihood(z, sigma, A, y, 0.4), x)
        assert _rel(exact, fd) <= 1e-8
        # K = 1: p(y | x) = N(y; A D(x), sigma_y^2 I + A V A^T)
        V = prior.denoise_cov(x[:1], sigma)[0]
        ref = torch.distributions.MultivariateNormal(prior.denoise(x, sigma) @ A.T, 0.16 * torch.eye(2, dtype=F64) + A @ V @ A.T)
        assert _rel(prior.log_likelihood(x, sigma, A, y, 0.4), ref.log_prob(y)) <= 1e-12


def test_mixture_likelihood_gradient_matches_finite_differences():
    w, mu, covs = _dense_params()
    prior = GaussianMixture.from_dense(w, mu, covs)
    g = _gen(9)
    A, y = torch.randn(2, D, generator=g, dtype=F64), torch.randn(2, generator=g, dtype=F64)
    x = 2 * torch.randn(4, D, generator=g, dtype=F64)
    exact = prior.likelihood_score(x, 0.6, A, y, 0.5)
    assert _rel(exact, _fd_grad(lambda z: prior.log_likelihood(z, 0.6, A, y, 0.5), x)) <= 1e-8


def test_problem_batched_posterior_equals_a_loop_and_large_dx_stays_low_rank():
    prior = grid_prior(800, "mcgdiff", seed=0)
    g = _gen(10)
    A = torch.stack([random_svd_matrix(2, 800, g) for _ in range(3)])
    y = torch.randn(3, 2, generator=g, dtype=F64)
    post = prior.posterior(A, y, torch.tensor([0.1, 0.2, 0.3], dtype=F64))
    assert post.cov.rank == 2 and post.cov.W.shape == (3, 1, 800, 2)  # never 25 dense 800 x 800 matrices
    x = torch.randn(3, 5, 800, generator=g, dtype=F64)
    batched = post.denoise(x, 0.5)
    for p in range(3):
        single = prior.posterior(A[p], y[p], 0.1 * (p + 1))
        assert _rel(batched[p], single.denoise(x[p], 0.5)) <= 1e-12
        assert _rel(post.weights[p], single.weights[0]) <= 1e-12
