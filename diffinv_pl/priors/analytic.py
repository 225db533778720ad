"""Analytic priors with exact noisy scores: Gaussian mixtures (a Gaussian is the K = 1 case) on vectors, and
:class:`StationaryGaussianPrior`, a Gaussian on images with a periodic stationary covariance (FFT denoiser).

Formulas: shared/reference/exact_posterior.md §3, in the variance-exploding form x = x0 + sigma n (s = 1; a VP state
x_t = s x is handled by the caller dividing by s, see :mod:`diffinv_pl.diffusion.preconditioning`).

Prior  p0(x) = sum_k w_k N(x; mu_k, Sigma_k).
Noisy  p_sigma(x) = sum_k w_k N(x; mu_k, Sigma_k + sigma^2 I).

Covariances are held in spectral form, ``Sigma_k = lam_perp_k (I - W_k W_k^T) + W_k diag(lam_k) W_k^T`` with
``W_k`` a (d, r) matrix of orthonormal columns. ``r = d`` is a full covariance (``lam_perp`` unused), ``r = 0`` an
isotropic one, and small r the "isotropic plus low rank" form that the posterior of an isotropic prior under a rank-dy
operator takes (§3.5, SVD form). Adding sigma^2 I, inverting, taking square roots, and every other matrix function
only maps the eigenvalues, so a dx = 800 posterior costs O(n K d r) per call instead of 25 dense 800 x 800 inverses.
One covariance may be shared by all components (leading size 1) or given per component.

Batching over problems: every parameter has a leading problem dimension P (P = 1 for a single prior). A mixture with
P = 1 accepts x of any shape (..., d); with P > 1, x must be (P, ..., d) and row p uses problem p's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from diffinv_pl.errors import UserError
from diffinv_pl.priors.base import Prior
from diffinv_pl.utils.random import GeneratorLike, randn

EigenFn = Callable[[Tensor], Tensor]


def _identity(lam: Tensor) -> Tensor:
    return lam


def _posterior_variance(lam: Tensor, c: Tensor) -> Tensor:
    """V_k = (Sigma_k^-1 + sigma^-2 I)^-1 on the eigenvalues: with lam = lambda + sigma^2 and c = sigma^2,
    lambda sigma^2 / (lambda + sigma^2) = c (lam - c) / lam."""
    return c * (lam - c) / lam


@dataclass(frozen=True)
class SpectralCovariance:
    """Covariances Sigma_k = lam_perp_k (I - W_k W_k^T) + W_k diag(lam_k) W_k^T.

    Attributes:
        lam_perp: (P, Kc) eigenvalue on the orthogonal complement of range(W_k) (unused when r = d).
        W: (P, Kc, d, r) orthonormal columns.
        lam: (P, Kc, r) eigenvalues on range(W_k).
    Kc is 1 (shared by all components) or K.
    """

    lam_perp: Tensor
    W: Tensor
    lam: Tensor

    @property
    def dim(self) -> int:
        return self.W.shape[-2]

    @property
    def rank(self) -> int:
        return self.W.shape[-1]

    @property
    def full(self) -> bool:
        return self.rank == self.dim

    @property
    def shared(self) -> bool:
        return self.W.shape[1] == 1

    def shifted(self, c: Tensor | float) -> SpectralCovariance:
        """Sigma + c I (c a scalar or a (P,) tensor)."""
        c = torch.as_tensor(c, dtype=self.lam.dtype, device=self.lam.device).reshape(-1, 1)
        return replace(self, lam_perp=self.lam_perp + c, lam=self.lam + c[..., None])

    def matmul(self, fn: EigenFn, V: Tensor) -> Tensor:
        """fn(Sigma_k) @ V for columns V of shape (P, Kv, d, n) with Kv in {1, Kc}: returns (P, max(Kv, Kc), d, n)."""
        k = max(V.shape[1], self.W.shape[1])
        W = self.W.expand(-1, k, -1, -1)
        V = V.expand(-1, k, -1, -1)
        proj = torch.einsum("pkdr,pkdn->pkrn", W, V)
        g_range = fn(self.lam).expand(-1, k, -1)
        if self.full:
            return torch.einsum("pkdr,pkrn->pkdn", W, g_range[..., None] * proj)
        g_perp = fn(self.lam_perp).expand(-1, k)
        delta = (g_range - g_perp[..., None])[..., None] * proj
        return g_perp[..., None, None] * V + torch.einsum("pkdr,pkrn->pkdn", W, delta)

    def dense(self, fn: EigenFn = _identity) -> Tensor:
        """fn(Sigma_k) as dense (P, Kc, d, d) matrices (small d only)."""
        eye = torch.eye(self.dim, dtype=self.W.dtype, device=self.W.device).expand(self.W.shape[0], 1, -1, -1)
        return self.matmul(fn, eye)

    def to(self, *args, **kwargs) -> SpectralCovariance:
        return SpectralCovariance(*(t.to(*args, **kwargs) for t in (self.lam_perp, self.W, self.lam)))


def spectral_from_dense(cov: Tensor) -> SpectralCovariance:
    """Spectral form of dense covariances (P, Kc, d, d); raises if one is not symmetric positive definite."""
    if not torch.allclose(cov, cov.transpose(-1, -2), rtol=1e-10, atol=1e-12):
        raise ValueError("covariance matrices must be symmetric")
    lam, W = torch.linalg.eigh(cov)
    if bool((lam <= 0).any()):
        raise ValueError(f"covariance matrices must be positive definite (smallest eigenvalue {float(lam.min()):.3g})")
    return SpectralCovariance(lam_perp=torch.zeros(cov.shape[:2], dtype=cov.dtype, device=cov.device), W=W, lam=lam)


def _as_problem_batch(t: Tensor, event_ndim: int, name: str) -> Tensor:
    """Add the leading problem dimension P = 1 when t has only its event dimensions."""
    if t.ndim == event_ndim:
        return t.unsqueeze(0)
    if t.ndim == event_ndim + 1:
        return t
    raise ValueError(f"{name} must have {event_ndim} or {event_ndim + 1} dimensions, got shape {tuple(t.shape)}")


@dataclass(frozen=True)
class GaussianMixture(Prior):
    """Gaussian-mixture prior with exact noisy marginals, scores, Tweedie means, covariances and posteriors.

    Attributes:
        log_weights: (P, K) normalised log mixture weights.
        means: (P, K, d).
        cov: :class:`SpectralCovariance` with Kc in {1, K}.

    It is a :class:`~diffinv_pl.priors.base.Prior` on flat vectors (state = data, no data range); calling the mixture
    is its denoiser ``D(x, sigma) = E[x0 | x0 + sigma n = x]``.
    """

    log_weights: Tensor
    means: Tensor
    cov: SpectralCovariance

    def __post_init__(self) -> None:
        P, K, d = self.means.shape
        if self.log_weights.shape != (P, K):
            raise ValueError(f"log_weights must have shape {(P, K)}, got {tuple(self.log_weights.shape)}")
        if self.cov.W.shape[0] != P or self.cov.W.shape[1] not in (1, K) or self.cov.dim != d:
            raise ValueError(f"covariance of shape {tuple(self.cov.W.shape)} does not match means {(P, K, d)}")

    # ----------------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_dense(cls, weights: Tensor, means: Tensor, covs: Tensor, dtype: torch.dtype = torch.float64):
        """Mixture from weights (K,), means (K, d) and dense covariances (K, d, d) or one shared (d, d).

        A leading problem dimension P is accepted on all three.
        """
        weights, means, covs = (torch.as_tensor(t, dtype=dtype) for t in (weights, means, covs))
        means = _as_problem_batch(means, 2, "means")
        weights = _as_problem_batch(weights, 1, "weights")
        if covs.ndim == 2 or (covs.ndim == 3 and covs.shape[0] != means.shape[1]):
            covs = covs.unsqueeze(-3)  # one shared covariance
        covs = _as_problem_batch(covs, 3, "covs")
        return cls(_normalised_log_weights(weights), means, spectral_from_dense(covs))

    @classmethod
    def isotropic(cls, weights: Tensor, means: Tensor, variance: float = 1.0, dtype: torch.dtype = torch.float64):
        """Mixture with the shared covariance variance * I (the MCGdiff benchmark has variance 1)."""
        if variance <= 0:
            raise ValueError(f"variance must be > 0, got {variance}")
        means = _as_problem_batch(torch.as_tensor(means, dtype=dtype), 2, "means")
        weights = _as_problem_batch(torch.as_tensor(weights, dtype=dtype), 1, "weights")
        P, _, d = means.shape
        cov = SpectralCovariance(
            lam_perp=torch.full((P, 1), float(variance), dtype=dtype),
            W=torch.zeros(P, 1, d, 0, dtype=dtype),
            lam=torch.zeros(P, 1, 0, dtype=dtype),
        )
        return cls(_normalised_log_weights(weights), means, cov)

    @classmethod
    def gaussian(cls, mean: Tensor, cov: Tensor, dtype: torch.dtype = torch.float64):
        """A single Gaussian N(mean, cov) as a one-component mixture."""
        mean = torch.as_tensor(mean, dtype=dtype)
        return cls.from_dense(torch.ones(mean.shape[:-1] + (1,), dtype=dtype), mean.unsqueeze(-2), cov, dtype)

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def num_problems(self) -> int:
        return self.means.shape[0]

    @property
    def num_components(self) -> int:
        return self.means.shape[1]

    @property
    def dim(self) -> int:
        return self.means.shape[2]

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    def to(self, *args, **kwargs) -> GaussianMixture:
        return GaussianMixture(self.log_weights.to(*args, **kwargs), self.means.to(*args, **kwargs), self.cov.to(*args, **kwargs))

    def noised(self, sigma: float | Tensor) -> GaussianMixture:
        """The marginal of x0 + sigma n: the same mixture with Sigma_k + sigma^2 I."""
        sigma = torch.as_tensor(sigma, dtype=self.means.dtype)
        if bool((sigma < 0).any()):
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        return replace(self, cov=self.cov.shifted(sigma**2))

    # ------------------------------------------------------------------------------------------------- helpers
    def _flatten(self, x: Tensor) -> Tensor:
        """x (..., d) -> (P, M, d) following the problem-batch rule of the module docstring."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has last dimension {x.shape[-1]}, the mixture has dimension {self.dim}")
        if x.dtype != self.means.dtype:
            raise ValueError(f"x has dtype {x.dtype}, the mixture {self.means.dtype}: convert one with .to()")
        if self.num_problems == 1:
            return x.reshape(1, -1, self.dim)
        if x.ndim < 2 or x.shape[0] != self.num_problems:
            raise ValueError(f"a mixture batched over {self.num_problems} problems needs x of shape (P, ..., d), got {tuple(x.shape)}")
        return x.reshape(self.num_problems, -1, self.dim)

    def _sigma2(self, sigma: Tensor | float, x: Tensor, xf: Tensor, allow_zero: bool) -> Tensor:
        """sigma broadcast to x.shape[:-1], squared and flattened to (P, M)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()) or (not allow_zero and bool((sigma == 0).any())):
            raise ValueError(f"sigma must be finite and {'>=' if allow_zero else '>'} 0, got {sigma}")
        try:
            sigma = sigma.expand(x.shape[:-1])
        except RuntimeError as err:
            raise ValueError(f"sigma of shape {tuple(sigma.shape)} does not broadcast to x.shape[:-1] = {tuple(x.shape[:-1])}") from err
        return (sigma**2).reshape(xf.shape[:2])

    def _projections(self, xf: Tensor) -> tuple[Tensor, Tensor]:
        """(W_k^T (x - mu_k), ||x - mu_k||^2) of shapes (P, M, K, r) and (P, M, K)."""
        W = self.cov.W
        if self.cov.shared:
            proj = torch.einsum("pmd,pdr->pmr", xf, W[:, 0])[:, :, None] - torch.einsum("pkd,pdr->pkr", self.means, W[:, 0])[:, None]
        else:
            proj = torch.einsum("pmd,pkdr->pmkr", xf, W) - torch.einsum("pkd,pkdr->pkr", self.means, W)[:, None]
        sq = (
            torch.linalg.vector_norm(xf, dim=-1, keepdim=True) ** 2
            - 2 * torch.einsum("pmd,pkd->pmk", xf, self.means)
            + (self.means**2).sum(-1)[:, None]
        )
        return proj, sq

    def _log_joint(self, xf: Tensor, s2: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """log w_k + log N(x; mu_k, Sigma_k + sigma^2 I), shape (P, M, K), plus projections and shifted eigenvalues."""
        lam = self.cov.lam[:, None] + s2[..., None, None]  # (P, M, Kc, r)
        lam_perp = self.cov.lam_perp[:, None] + s2[..., None]  # (P, M, Kc)
        proj, sq = self._projections(xf)  # proj is empty for isotropic covariances (r = 0)
        quad = (proj**2 / lam).sum(-1)
        logdet = lam.log().sum(-1)
        if not self.cov.full:
            perp_sq = (sq - (proj**2).sum(-1)).clamp(min=0)
            quad = quad + perp_sq / lam_perp
            logdet = logdet + (self.dim - self.cov.rank) * lam_perp.log()
        log_norm = -0.5 * (quad + logdet + self.dim * math.log(2 * math.pi))
        return self.log_weights[:, None] + log_norm, proj, (lam_perp, lam)

    def _mix_affine(
        self, fn: EigenFn, resp: Tensor, proj: Tensor, eig: tuple[Tensor, Tensor], scale: Tensor
    ) -> tuple[Tensor, Tensor | float]:
        """scale * sum_k r_k fn(Sigma_k + sigma^2 I) (x - mu_k) written as c * x + lin with c of shape (P, M, 1).

        Works through projections on W_k and the means only, never forming (P, M, K, d) tensors; ``scale`` (P, M)
        is folded into the small coefficients so that callers combine with x in a single elementwise pass.
        """
        lam_perp, lam = eig
        resp = resp * scale[..., None]
        if self.cov.full:
            coef = resp[..., None] * fn(lam) * proj
            c, lin = torch.zeros_like(scale)[..., None], 0.0
        else:  # the complement of range(W_k) contributes fn(lam_perp) (x - mu_k)
            g_perp = fn(lam_perp)
            rg = resp * g_perp
            coef = resp[..., None] * (fn(lam) - g_perp[..., None]) * proj
            c, lin = rg.sum(-1, keepdim=True), torch.einsum("pmk,pkd->pmd", -rg, self.means)
        if self.cov.rank > 0:
            W = self.cov.W
            back = torch.einsum("pmkr,pdr->pmd", coef, W[:, 0]) if self.cov.shared else torch.einsum("pmkr,pkdr->pmd", coef, W)
            lin = back + lin
        return c, lin

    # --------------------------------------------------------------------------------------------- public API
    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """log p_sigma(x), shape x.shape[:-1]."""
        xf = self._flatten(x)
        log_joint, _, _ = self._log_joint(xf, self._sigma2(sigma, x, xf, allow_zero=True))
        return torch.logsumexp(log_joint, -1).reshape(x.shape[:-1])

    def responsibilities(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """r_k(x) = w_k N(x; mu_k, Sigma_k + sigma^2 I) / p_sigma(x), shape x.shape[:-1] + (K,)."""
        xf = self._flatten(x)
        log_joint, _, _ = self._log_joint(xf, self._sigma2(sigma, x, xf, allow_zero=True))
        return torch.softmax(log_joint, -1).reshape(*x.shape[:-1], self.num_components)

    def score(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """grad log p_sigma(x) = -sum_k r_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)."""
        xf = self._flatten(x)
        s2 = self._sigma2(sigma, x, xf, allow_zero=True)
        log_joint, proj, eig = self._log_joint(xf, s2)
        c, lin = self._mix_affine(torch.reciprocal, torch.softmax(log_joint, -1), proj, eig, -torch.ones_like(s2))
        return (c * xf + lin).reshape(x.shape)

    def denoise(self, x: Tensor, sigma: Tensor | float, *, generator: GeneratorLike = None) -> Tensor:
        """Tweedie mean E[x0 | x] = x + sigma^2 grad log p_sigma(x) = sum_k r_k m_k(x) (exact: ``generator`` unused)."""
        xf = self._flatten(x)
        s2 = self._sigma2(sigma, x, xf, allow_zero=False)
        log_joint, proj, eig = self._log_joint(xf, s2)
        c, lin = self._mix_affine(torch.reciprocal, torch.softmax(log_joint, -1), proj, eig, -s2)
        return torch.addcmul(lin, xf, 1.0 + c).reshape(x.shape)

    __call__ = denoise

    def check_data_shape(self, data_shape: tuple[int, ...]) -> None:
        if tuple(data_shape) != (self.dim,):
            raise ValueError(f"this Gaussian mixture is a prior on vectors of shape ({self.dim},), got data of shape {tuple(data_shape)}")

    def component_means(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """m_k(x) = mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k), shape x.shape[:-1] + (K, d)."""
        xf = self._flatten(x)
        s2 = self._sigma2(sigma, x, xf, allow_zero=False)
        diff = xf[:, :, None] - self.means[:, None]
        m = self.means[:, None] + self._component_apply(diff, s2, lambda lam, c: (lam - c) / lam)
        return m.reshape(*x.shape[:-1], self.num_components, self.dim)

    def _component_apply(self, v: Tensor, s2: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """fn(Sigma_k + s2 I, s2) v_k for v of shape (P, M, K, d) and s2 of shape (P, M): returns (P, M, K, d)."""
        c = s2[..., None]
        lam = self.cov.lam[:, None] + c[..., None]
        W = self.cov.W
        proj = torch.einsum("pmkd,pdr->pmkr", v, W[:, 0]) if self.cov.shared else torch.einsum("pmkd,pkdr->pmkr", v, W)
        g_range = fn(lam, c[..., None])
        if self.cov.full:
            coef, base = g_range * proj, 0.0
        else:
            g_perp = fn(self.cov.lam_perp[:, None] + c, c)
            coef, base = (g_range - g_perp[..., None]) * proj, g_perp[..., None] * v
        back = torch.einsum("pmkr,pdr->pmkd", coef, W[:, 0]) if self.cov.shared else torch.einsum("pmkr,pkdr->pmkd", coef, W)
        return base + back

    def denoise_cov(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Cov[x0 | x] = sum_k r_k [V_k + (m_k - D)(m_k - D)^T], V_k = (Sigma_k^-1 + sigma^-2 I)^-1.

        Dense, shape x.shape[:-1] + (d, d): meant for small d. For products use :meth:`cov_matvec`.
        """
        d = self.dim
        eye = torch.eye(d, dtype=x.dtype, device=x.device).expand(*x.shape[:-1], d, d)
        return torch.stack([self.cov_matvec(x, sigma, eye[..., i]) for i in range(d)], -1)

    def cov_matvec(self, x: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
        """Cov[x0 | x] v, shape x.shape. The denoiser Jacobian is dD/dx = Cov[x0 | x] / sigma^2 (symmetric)."""
        if v.shape != x.shape:
            raise ValueError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
        xf, vf = self._flatten(x), self._flatten(v)
        s2 = self._sigma2(sigma, x, xf, allow_zero=False)
        K = self.num_components
        resp = self.responsibilities(x, sigma).reshape(*xf.shape[:2], K)
        m = self.component_means(x, sigma).reshape(*xf.shape[:2], K, self.dim)
        centred = m - (resp[..., None] * m).sum(-2, keepdim=True)
        spread = (resp * (centred * vf[:, :, None]).sum(-1))[..., None] * centred
        post_var = self._component_apply(vf[:, :, None].expand(-1, -1, K, -1), s2, _posterior_variance)
        return (resp[..., None] * post_var + spread).sum(-2).reshape(x.shape)

    def denoiser_jvp(self, x: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
        """Jacobian-vector product (dD/dx) v = Cov[x0 | x] v / sigma^2 (equal to the VJP: the Jacobian is symmetric)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        return self.cov_matvec(x, sigma, v) / sigma.expand(x.shape[:-1])[..., None] ** 2

    def sample(self, num_samples: int, generator: GeneratorLike = None) -> Tensor:
        """Exact samples, shape (P, num_samples, d) (P = 1 included): draw k ~ w, then mu_k + Sigma_k^{1/2} n.

        ``generator`` is one ``torch.Generator`` (or None) for all rows, or a sequence with one generator per problem
        row: row p then draws its components and its noise from generator p alone, so it does not depend on the other
        rows. A single mixture (P = 1) with Q generators gives Q independent rows, shape (Q, num_samples, d).
        """
        P, K, d = self.means.shape
        if generator is None or isinstance(generator, torch.Generator):
            comp = torch.multinomial(self.weights, num_samples, replacement=True, generator=generator)  # (P, n)
            noise = torch.randn(P, num_samples, d, generator=generator, dtype=self.means.dtype).to(self.means.device)
        else:
            generators = list(generator)
            if P not in (1, len(generators)):
                raise ValueError(f"{len(generators)} generators for a mixture batched over {P} problems: need one per problem")
            if P == 1 and len(generators) != 1:
                return self._expand(len(generators)).sample(num_samples, generators)
            weights = self.weights
            rows = [
                (
                    torch.multinomial(weights[p].to(g.device), num_samples, replacement=True, generator=g),
                    torch.randn(num_samples, d, generator=g, dtype=self.means.dtype, device=g.device),
                )
                for p, g in enumerate(generators)
            ]
            comp = torch.stack([c for c, _ in rows]).to(self.means.device)
            noise = torch.stack([n for _, n in rows]).to(self.means.device)
        if self.cov.shared:
            colored = self.cov.matmul(torch.sqrt, noise.transpose(1, 2)[:, None])[:, 0].transpose(1, 2)
        else:
            full = self.cov.matmul(torch.sqrt, noise.transpose(1, 2)[:, None].expand(-1, K, -1, -1))  # (P, K, d, n)
            colored = torch.gather(full.permute(0, 3, 1, 2), 2, comp[..., None, None].expand(-1, -1, 1, d))[:, :, 0]
        return torch.gather(self.means, 1, comp[..., None].expand(-1, -1, d)) + colored

    def posterior(self, A: Tensor, y: Tensor, sigma_y: Tensor | float) -> GaussianMixture:
        """Exact posterior p(x0 | y) for y = A x0 + sigma_y n (exact_posterior.md §3.5), again a Gaussian mixture.

        A is (dy, d) or (P, dy, d), y is (dy,) or (P, dy), sigma_y a scalar or (P,). Kalman form per component:
        G_k = A Sigma_k A^T + sigma_y^2 I, mean mu_k + Sigma_k A^T G_k^-1 (y - A mu_k), weight w_k N(y; A mu_k, G_k).
        The covariance is computed in the span Q of [W_k, A^T] (Sigma_k is a multiple of I on its complement, where A
        vanishes), so an isotropic prior gives an isotropic-plus-rank-dy posterior.
        """
        dtype = self.means.dtype
        A = _as_problem_batch(torch.as_tensor(A, dtype=dtype, device=self.means.device), 2, "A")
        y = _as_problem_batch(torch.as_tensor(y, dtype=dtype, device=self.means.device), 1, "y")
        sigma_y = torch.as_tensor(sigma_y, dtype=dtype, device=self.means.device).reshape(-1)
        P = max(A.shape[0], y.shape[0], sigma_y.shape[0], self.num_problems)
        dy, d = A.shape[-2:]
        if d != self.dim or y.shape[-1] != dy:
            raise ValueError(f"A of shape {tuple(A.shape)} and y of shape {tuple(y.shape)} do not fit dimension {self.dim}")
        if not bool(torch.isfinite(y).all()):
            raise ValueError("measurement y contains non-finite values")
        if bool((sigma_y <= 0).any()):
            raise ValueError(f"sigma_y must be > 0 for the closed-form posterior, got {sigma_y}")
        for name, t in (("A", A), ("y", y), ("sigma_y", sigma_y), ("prior", self.means)):
            if t.shape[0] not in (1, P):
                raise ValueError(f"{name} has {t.shape[0]} problems, expected 1 or {P}")
        A, y, sigma_y = A.expand(P, -1, -1), y.expand(P, -1), sigma_y.expand(P)
        prior = self if self.num_problems == P else self._expand(P)
        cov = prior.cov
        noise_var = (sigma_y**2)[:, None, None, None] * torch.eye(dy, dtype=dtype, device=A.device)
        At = A.transpose(1, 2)[:, None]  # (P, 1, d, dy)
        gain_cols = cov.matmul(_identity, At)  # Sigma_k A^T, (P, Kc, d, dy)
        G = A[:, None] @ gain_cols + noise_var  # (P, Kc, dy, dy)
        chol = torch.linalg.cholesky(G)
        resid = y[:, None] - torch.einsum("ped,pkd->pke", A, prior.means)  # (P, K, dy)
        white = torch.linalg.solve_triangular(chol, resid[..., None], upper=False)[..., 0]
        log_lik = -0.5 * (white**2).sum(-1) - torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1) - 0.5 * dy * math.log(2 * math.pi)
        update = torch.cholesky_solve(resid[..., None], chol)[..., 0]  # G_k^-1 (y - A mu_k)
        means = prior.means + torch.einsum("pkde,pke->pkd", gain_cols, update)
        log_w = torch.log_softmax(prior.log_weights + log_lik, -1)

        basis = torch.linalg.qr(torch.cat([cov.W, At.expand(-1, cov.W.shape[1], -1, -1)], -1)).Q  # (P, Kc, d, q)
        cov_q = basis.transpose(-1, -2) @ cov.matmul(_identity, basis)  # Q^T Sigma Q
        AQ = A[:, None] @ basis
        gain_q = cov_q @ AQ.transpose(-1, -2)
        post_q = cov_q - gain_q @ torch.cholesky_solve(gain_q.transpose(-1, -2), chol)
        lam, E = torch.linalg.eigh(0.5 * (post_q + post_q.transpose(-1, -2)))
        post_cov = SpectralCovariance(lam_perp=cov.lam_perp, W=basis @ E, lam=lam)
        return GaussianMixture(log_w, means, post_cov)

    def _expand(self, P: int) -> GaussianMixture:
        c = self.cov
        return GaussianMixture(
            self.log_weights.expand(P, -1),
            self.means.expand(P, -1, -1),
            SpectralCovariance(c.lam_perp.expand(P, -1), c.W.expand(P, -1, -1, -1), c.lam.expand(P, -1, -1)),
        )

    def log_likelihood(self, x: Tensor, sigma: Tensor | float, A: Tensor, y: Tensor, sigma_y: Tensor | float) -> Tensor:
        """Exact log p(y | x0 + sigma n = x) = log sum_k r_k(x) N(y; A m_k(x), sigma_y^2 I + A V_k A^T) (§3.6).

        Shape x.shape[:-1]. Forms per-sample, per-component dy x dy covariances: meant for tests and small problems.
        """
        xf = self._flatten(x)
        P, M, _ = xf.shape
        K = self.num_components
        s2 = self._sigma2(sigma, x, xf, allow_zero=False)
        A = _as_problem_batch(torch.as_tensor(A, dtype=x.dtype, device=x.device), 2, "A").expand(P, -1, -1)
        y = _as_problem_batch(torch.as_tensor(y, dtype=x.dtype, device=x.device), 1, "y").expand(P, -1)
        dy = A.shape[1]
        sigma_y = torch.as_tensor(sigma_y, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1, 1)
        log_r = torch.log_softmax(self._log_joint(xf, s2)[0], -1)
        m = self.component_means(x, sigma).reshape(P, M, K, self.dim)
        post_var_At = torch.stack(
            [
                self._component_apply(A[:, e][:, None, None].expand(-1, M, K, -1), s2, _posterior_variance)
                for e in range(dy)
            ],
            -1,
        )  # V_k A^T, (P, M, K, d, dy)
        S = A[:, None, None] @ post_var_At + sigma_y**2 * torch.eye(dy, dtype=x.dtype, device=x.device)
        resid = y[:, None, None] - torch.einsum("ped,pmkd->pmke", A, m)
        chol = torch.linalg.cholesky(S)
        white = torch.linalg.solve_triangular(chol, resid[..., None], upper=False)[..., 0]
        log_n = -0.5 * (white**2).sum(-1) - torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1) - 0.5 * dy * math.log(2 * math.pi)
        return torch.logsumexp(log_r + log_n, -1).reshape(x.shape[:-1])

    def likelihood_score(self, x: Tensor, sigma: Tensor | float, A: Tensor, y: Tensor, sigma_y: Tensor | float) -> Tensor:
        """Exact grad_x log p(y | x) = grad log p_sigma(x | y) - grad log p_sigma(x) (§3.6)."""
        return self.posterior(A, y, sigma_y).score(x, sigma) - self.score(x, sigma)

    def effective_num_modes(self) -> Tensor:
        """n_eff = 1 / sum_k w_k^2 per problem, shape (P,)."""
        return 1.0 / (self.weights**2).sum(-1)


def _normalised_log_weights(weights: Tensor) -> Tensor:
    if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise ValueError("mixture weights must be finite and >= 0")
    total = weights.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("mixture weights must not all be zero")
    return (weights / total).log()


class StationaryGaussianPrior(Prior):
    """Gaussian prior on (C, H, W) images with a periodic, stationary spatial covariance and a channel correlation.

    Model (x flattened channel-major, N = H W pixels per channel):

        x ~ N(mu, Sigma),   Sigma = std^2 C_rho (x) K      ((x): Kronecker product),
        C_rho = (1 - rho) I_C + rho 1 1^T        (unit diagonal: channel correlation rho),
        K = F^H diag(s) F                          (circulant: periodic, stationary; F the unitary 2-D DFT),
        s(f) = S(f) / mean_f S(f),   S(f) = (1 + |f|^2 / f0^2)^(-alpha),

    with f = (f_y, f_x) the DFT frequencies in cycles per pixel (``torch.fft.fftfreq``). ``mean_f s = 1`` makes the
    per-pixel variance diag(K) = mean_f s(f) = 1, so every pixel has standard deviation ``std`` and two channels of
    one pixel have correlation ``rho``. C_rho = E diag(m) E^T (eigenvectors E, eigenvalues m: 1 + (C - 1) rho once
    and 1 - rho (C - 1) times), so Sigma has eigenvalues lam_{j,f} = std^2 m_j s(f) with eigenvectors e_j (x) F^H.
    Sigma is positive definite iff rho in (-1/(C - 1), 1) and std > 0.

    Exact denoiser (Gaussian posterior mean, x = x0 + sigma n):

        D(x, sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu)
                    = mu + E F^-1[ lam / (lam + sigma^2) * F(E^T (x - mu)) ],

    an O(C^2 N + C N log N) closed form. Samples are mu + E F^-1[ sqrt(lam) F(n) ] with n ~ N(0, I).

    Args:
        mean: scalar, or one value per channel.
        std: per-pixel standard deviation (> 0).
        alpha: spectral decay exponent (> 0): larger means smoother images.
        f0: corner frequency in cycles per pixel (> 0): below it the spectrum is flat.
        channel_correlation: rho, the correlation between two channels of one pixel.
        channels: C, the number of image channels the prior is for.
        image_size: the image side H = W it is for (None: any size; :meth:`sample` then needs ``image_size``).
        data_range: the declared image range (lo, hi) (must equal the operator's input range in an evaluation).
    """

    def __init__(
        self,
        mean: float | list[float] = 0.0,
        std: float = 0.5,
        alpha: float = 2.0,
        f0: float = 0.05,
        channel_correlation: float = 0.0,
        channels: int = 3,
        image_size: int | None = None,
        data_range: tuple[float, float] | list[float] = (-1.0, 1.0),
    ) -> None:
        if not (isinstance(channels, int) and channels >= 1):
            raise UserError(
                f"StationaryGaussianPrior: channels must be an int >= 1, got {channels!r}; set prior.channels"
            )
        if image_size is not None and not (isinstance(image_size, int) and image_size >= 1):
            raise UserError(f"StationaryGaussianPrior: image_size must be an int >= 1 or null, got {image_size!r}")
        for name, value in (("std", std), ("alpha", alpha), ("f0", f0)):
            if not (math.isfinite(float(value)) and float(value) > 0):
                raise UserError(
                    f"StationaryGaussianPrior: {name} must be finite and > 0, got {value}; set prior.{name} > 0"
                )
        lo_rho = -1.0 / (channels - 1) if channels > 1 else -math.inf
        rho = float(channel_correlation)
        if not (lo_rho < rho < 1.0):
            raise UserError(
                f"StationaryGaussianPrior: channel_correlation must lie in ({lo_rho:g}, 1) for {channels} channel(s) "
                f"(otherwise the channel covariance is not positive definite), got {rho}; set prior.channel_correlation"
            )
        means = [float(mean)] * channels if isinstance(mean, (int, float)) else [float(m) for m in mean]
        if len(means) != channels or not all(math.isfinite(m) for m in means):
            raise UserError(
                f"StationaryGaussianPrior: mean must be one finite number or {channels} (one per channel), got {mean!r}"
            )
        lo, hi = (float(v) for v in data_range)
        if not lo < hi:
            raise UserError(
                f"StationaryGaussianPrior: data_range must be [lo, hi] with lo < hi, got {list(data_range)}"
            )
        self.channels, self.image_size = channels, image_size
        self.std, self.alpha, self.f0, self.rho = float(std), float(alpha), float(f0), rho
        self.mean = torch.tensor(means, dtype=torch.float64)
        self.data_range = (lo, hi)
        self.sigma_range = (0.0, math.inf)
        corr = (1.0 - rho) * torch.eye(channels, dtype=torch.float64) + rho
        self.channel_eigenvalues, self.channel_basis = torch.linalg.eigh(corr)  # (C,), (C, C) columns e_j

    # ------------------------------------------------------------------------------------------------ spectrum
    def spectrum(self, height: int, width: int) -> Tensor:
        """s(f) on the (height, width) DFT grid, normalised to mean 1 (float64)."""
        fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
        fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
        s = (1.0 + (fy**2 + fx**2) / self.f0**2) ** (-self.alpha)
        return s / s.mean()

    def eigenvalues(self, height: int, width: int) -> Tensor:
        """lam_{j,f} = std^2 m_j s(f), shape (C, height, width) (float64)."""
        return self.std**2 * self.channel_eigenvalues[:, None, None] * self.spectrum(height, width)

    def covariance(self, height: int, width: int) -> Tensor:
        """Dense Sigma of shape (C H W, C H W), channel-major, column by column through the FFT form (tiny images)."""
        lam = self.eigenvalues(height, width)
        eye = torch.eye(self.channels * height * width, dtype=torch.float64).reshape(-1, self.channels, height, width)
        return self._apply(eye, lam).reshape(eye.shape[0], -1).T

    # --------------------------------------------------------------------------------------------- operations
    def _apply(self, z: Tensor, gain: Tensor) -> Tensor:
        """E F^-1[ gain * F(E^T z) ] for z of shape (..., C, H, W); gain broadcasts against (..., C, H, W)."""
        basis = self.channel_basis.to(z)
        coeff = torch.einsum("cj,...chw->...jhw", basis, z)
        filtered = torch.fft.ifft2(gain.to(z.dtype) * torch.fft.fft2(coeff, norm="ortho"), norm="ortho").real
        return torch.einsum("cj,...jhw->...chw", basis, filtered)

    def _mean(self, z: Tensor) -> Tensor:
        return self.mean.to(z)[:, None, None]

    def _check_state(self, x: Tensor) -> None:
        self.check_data_shape(tuple(x.shape[-3:]) if x.ndim >= 3 else tuple(x.shape))

    def check_data_shape(self, data_shape: tuple[int, ...]) -> None:
        """Images of shape (channels, H, W) (H = W = image_size when it is set)."""
        shape = tuple(data_shape)
        size_ok = self.image_size is None or shape[1:] == (self.image_size, self.image_size)
        if len(shape) != 3 or shape[0] != self.channels or not size_ok:
            side = f"{self.image_size}, {self.image_size}" if self.image_size is not None else "H, W"
            raise UserError(
                f"StationaryGaussianPrior is a prior on images of shape ({self.channels}, {side}), got data of shape "
                f"{shape}; set prior.channels / prior.image_size to the operator's channels and image_size"
            )

    def denoise(self, x: Tensor, sigma: Tensor | float, *, generator: GeneratorLike = None) -> Tensor:
        """Exact posterior mean mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu) (class docstring); ``generator`` unused.

        ``sigma``: a scalar, or one value per sample of the batch dimensions x.shape[:-3] (any shape broadcasting to
        them), > 0 and finite."""
        self._check_state(x)
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        if not bool(torch.isfinite(sig).all()) or bool((sig <= 0).any()):
            raise ValueError(f"StationaryGaussianPrior.denoise: sigma must be finite and > 0, got {sig}")
        batch = x.shape[:-3]
        if sig.numel() == 1:
            sig = sig.reshape(())
        elif sig.numel() == math.prod(batch):
            sig = sig.reshape(batch)
        else:
            raise ValueError(f"sigma of shape {tuple(sig.shape)} does not fit the batch shape {tuple(batch)} of x")
        lam = self.eigenvalues(*x.shape[-2:]).to(x.device)
        s2 = (sig**2)[..., None, None, None]
        mu = self._mean(x)
        return mu + self._apply(x - mu, lam / (lam + s2))

    def sample(self, num_samples: int, generator: GeneratorLike = None, image_size: int | None = None,
               dtype: torch.dtype = torch.float64) -> Tensor:
        """Exact samples mu + Sigma^{1/2} n, shape (num_samples, C, H, H) with H = ``image_size`` or the prior's."""
        size = image_size if image_size is not None else self.image_size
        if size is None:
            raise UserError(
                "StationaryGaussianPrior.sample needs an image size: pass image_size= or build the prior with one"
            )
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise UserError(f"StationaryGaussianPrior.sample: num_samples must be an int >= 1, got {num_samples!r}")
        noise = randn((num_samples, self.channels, size, size), generator, torch.float64, "cpu")
        out = self._mean(noise) + self._apply(noise, self.eigenvalues(size, size).sqrt())
        return out.to(dtype)
