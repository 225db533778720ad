"""ReSample (Song et al., ICLR 2024): latent DDIM with hard data consistency, as released (methods.md §0.5, §4).

The state is the VP latent z_t = sqrt(abar_t) x with x the prior's VE state (x = x0 + sigma_t n,
sigma_t = sqrt((1 - abar_t) / abar_t)); the denoiser D = prior.denoise(z / sqrt(abar), sigma) gives
eps = (z / sqrt(abar) - D) / sigma. With T' = ``num_steps`` DDIM steps at t = 1, 1 + c, ..., (c = T // T', the LDM
"uniform" grid: 1, 3, ..., 999 for 500 of 1000) and index i = T'-1 ... 0 (abar_i, abar_prev_i = abar_{i-1}):

    z ~ N(0, I)
    for i = T'-1 .. 0:
        z' = sqrt(abar_prev) D + sqrt(1 - abar_prev) eps                     # DDIM, eta = 0
        x0_hat = D (tweedie: exact) or (z - (1 - abar) eps) / sqrt(abar)      # tweedie: original (released)
        z <- z' - h_i grad_z sum_b ||y_b - A(decode(x0_hat_b))||             # h_i = 0.5 abar_i (scale_rule alphabar)
        if 0 < i <= T' - T' // splits and i % period == 0:                   # hard data consistency
            z_keep = z
            look-ahead: ``lookahead_steps`` unconditional DDIM steps from z; x0_hat = their last estimate
            s2 = gamma (1 - abar_prev) / (1 - abar) (1 - abar / abar_prev)
            if i >= T' // splits:  z_hat = encode(argmin_x MSE(y, A x))          from decode(x0_hat) (pixel stage)
            else:                  z_hat = argmin_z MSE(y, A(decode(z)))          from x0_hat         (latent stage)
            z <- (s2 sqrt(abar_prev) z_hat + (1 - abar_prev) z_keep) / (s2 + 1 - abar_prev)
                 + sqrt(1 / (1 / s2 + 1 / (1 - abar_prev))) n                  # stochastic resampling
    z <- argmin_z MSE(y, A(decode(z))) from z                                 # final latent optimisation
    return decode(z)

Released details kept (and exposed as options): the look-ahead is off by one (``lookahead_network_time: released``:
the k-th look-ahead step uses the abar coefficients of index i - k while the network gets the time of index
i - k - 1, passed as ``network_sigma``; ``corrected`` uses index i - k - 1 for both); the optimisers are AdamW with
weight decay 0.01 on the mean-squared residual, stopping after the step at which the loss (before the step) is below
``tolerance``^2, and the latent stage also stops once the loss exceeds the loss ``divergence_window`` iterations
earlier. The inner optimisations run batched: each sample has its own AdamW state and its own stopping (a stopped
sample is frozen), so a batch gives the one-at-a-time result.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffinv_pl.diffusion.schedules import BETA_KINDS, alpha_bar_from_betas, make_betas, respace_timesteps
from diffinv_pl.errors import UserError
from diffinv_pl.operators.base import ForwardOperator
from diffinv_pl.priors.base import Prior
from diffinv_pl.solvers.base import (
    Callback,
    CountingDenoiser,
    InverseProblem,
    SolverResult,
    check_finite,
    cost_meter,
    initial_state,
)
from diffinv_pl.utils.random import GeneratorLike, randn

TWEEDIE = ("original", "exact")
SCALE_RULES = ("alphabar", "constant")
LOOKAHEAD_TIMES = ("released", "corrected")


# --------------------------------------------------------------------------------------------------- schedule
def resample_alpha_bars(num_steps: int, num_train_steps: int, beta_schedule: str) -> tuple[Tensor, Tensor, list[int]]:
    """(abar_i, abar_prev_i, timesteps t_i) of the released DDIM grid, float64, index i = 0 .. num_steps - 1.

    t_i = 1 + i * (T // T') (LDM ``make_ddim_timesteps``, "uniform"); abar_prev_0 = abar at t = 0. T' must divide T
    and be at most T / 2 (UserError otherwise)."""
    if num_train_steps % num_steps or num_steps > num_train_steps // 2:
        raise UserError(
            f"ReSample: num_steps={num_steps} must divide num_train_steps={num_train_steps} and be at most half of it: "
            "the released grid t = 1 + i * (T // num_steps) has more than num_steps steps otherwise, or ends beyond "
            "t = T - 1 (e.g. num_steps=500 for T=1000)"
        )
    timesteps = [t + 1 for t in respace_timesteps(num_train_steps, f"ddim{num_steps}")]
    abar_all = alpha_bar_from_betas(make_betas(beta_schedule, num_train_steps))
    abar = abar_all[timesteps]
    abar_prev = torch.cat([abar_all[:1], abar[:-1]])
    return abar, abar_prev, timesteps


def dc_events(num_steps: int, period: int = 10, splits: int = 3) -> dict[int, str]:
    """Indices with a hard data-consistency event and their stage ("pixel" or "latent"), as released:
    0 < i <= T' - T' // splits, i % period == 0; pixel stage where i >= T' // splits."""
    split = num_steps // splits
    return {
        i: ("pixel" if i >= split else "latent")
        for i in range(1, num_steps - split + 1)
        if i % period == 0
    }


def resampling_variance(abar: Tensor | float, abar_prev: Tensor | float, gamma: float = 40.0) -> Tensor:
    """The released stochastic-resampling variance s2 = gamma (1 - abar_prev) / (1 - abar) (1 - abar / abar_prev)."""
    abar, abar_prev = torch.as_tensor(abar), torch.as_tensor(abar_prev)
    return gamma * (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)


def stochastic_resample(
    z_hat: Tensor, z_keep: Tensor, abar_prev: float, variance: float, generator: GeneratorLike
) -> Tensor:
    """A draw of N(m, v I): m = (s2 sqrt(abar_prev) z_hat + (1 - abar_prev) z_keep) / (s2 + 1 - abar_prev),
    v = 1 / (1 / s2 + 1 / (1 - abar_prev)) (s2 = ``variance``), noise from ``generator``."""
    mean = (variance * math.sqrt(abar_prev) * z_hat + (1 - abar_prev) * z_keep) / (variance + 1 - abar_prev)
    std = math.sqrt(1.0 / (1.0 / variance + 1.0 / (1 - abar_prev)))
    return mean + std * randn(z_hat.shape, generator, z_hat.dtype, z_hat.device)


# --------------------------------------------------------------------------------------------------- optimiser
def batched_adamw(
    loss_fn: Callable[[Tensor], Tensor],
    init: Tensor,
    batch_ndim: int,
    *,
    lr: float,
    max_iters: int,
    tolerance: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    divergence_window: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimise each sample's loss with its own AdamW (``torch.optim.AdamW`` arithmetic) and its own stopping.

    ``loss_fn(v)`` returns one loss per sample (shape ``init.shape[:batch_ndim]``), each depending on its own sample
    only. Iteration k: loss and gradient at v, then the AdamW step (v *= 1 - lr wd; Adam moments; bias-corrected
    update); a sample stops after the step if its loss was < ``tolerance``^2 or, with ``divergence_window`` W and
    k >= W, if it exceeds its loss at iteration k - W. A stopped sample is frozen (no update, no decay, state kept).
    Returns (v, iterations per sample)."""
    batch_shape = init.shape[:batch_ndim]
    expand = (-1,) * batch_ndim + (1,) * (init.ndim - batch_ndim)
    v = init.detach().clone()
    m, s = torch.zeros_like(v), torch.zeros_like(v)
    active = torch.ones(batch_shape, dtype=torch.bool, device=v.device)
    iterations = torch.zeros(batch_shape, dtype=torch.long, device=v.device)
    history: deque[Tensor] = deque()  # the last W losses (divergence window)
    beta1, beta2 = betas
    for k in range(max_iters):
        if not bool(active.any()):
            break
        var = v.detach().requires_grad_(True)
        losses = loss_fn(var)
        (grad,) = torch.autograd.grad(losses.sum(), var)
        losses = losses.detach()
        mask = active.reshape(*batch_shape, *expand[batch_ndim:]) if batch_ndim else active
        step = k + 1  # every active sample has taken exactly k steps before this one
        m_new = m.lerp(grad, 1 - beta1)
        s_new = s.mul(beta2).addcmul(grad, grad, value=1 - beta2)
        denom = (s_new.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        v_new = v.mul(1 - lr * weight_decay).addcdiv(m_new, denom, value=-lr / (1 - beta1**step))
        v, m, s = torch.where(mask, v_new, v), torch.where(mask, m_new, m), torch.where(mask, s_new, s)
        iterations += active.long()
        stop = losses < tolerance**2
        if divergence_window is not None:
            if k >= divergence_window:
                stop |= history.popleft() < losses  # the loss of iteration k - W
            history.append(losses)
        active &= ~stop
    return v, iterations


# ------------------------------------------------------------------------------------------------ hyperparameters
def check_resample_hyperparameters(
    operator: ForwardOperator | None = None,
    *,
    num_steps: int = 500,
    num_train_steps: int = 1000,
    beta_schedule: str = "sqrt_linear",
    tweedie: str = "original",
    guidance_scale_rule: str = "alphabar",
    guidance_scale: float = 0.5,
    dc_period: int = 10,
    dc_splits: int = 3,
    lookahead_steps: int = 5,
    lookahead_network_time: str = "released",
    gamma: float = 40.0,
    pixel_lr: float = 1e-2,
    pixel_max_iters: int = 2000,
    latent_lr: float = 5e-3,
    latent_max_iters: int = 500,
    tolerance: float = 1e-3,
    divergence_window: int | None = 200,
    weight_decay: float = 0.01,
    adam_betas: tuple[float, float] | list[float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    final_latent_optimization: bool = True,
) -> None:
    """Refuse bad ReSample hyperparameters with a UserError naming the setting, before any work."""

    def integer(name: str, value: Any, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"ReSample: {name} must be an integer >= {low}, got {value!r}")

    def positive(name: str, value: Any, allow_zero: bool = False) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (value == 0 and not allow_zero):
            raise UserError(f"ReSample: {name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")

    for name, value, valid in (("beta_schedule", beta_schedule, BETA_KINDS), ("tweedie", tweedie, TWEEDIE),
                               ("guidance_scale_rule", guidance_scale_rule, SCALE_RULES),
                               ("lookahead_network_time", lookahead_network_time, LOOKAHEAD_TIMES)):
        if value not in valid:
            raise UserError(f"ReSample: unknown {name} {value!r}; valid: {', '.join(valid)}")
    integer("num_steps", num_steps, 1)
    integer("num_train_steps", num_train_steps, 2)
    integer("dc_period", dc_period, 1)
    integer("dc_splits", dc_splits, 1)
    integer("lookahead_steps", lookahead_steps, 0)
    integer("pixel_max_iters", pixel_max_iters, 0)
    integer("latent_max_iters", latent_max_iters, 0)
    if divergence_window is not None:
        integer("divergence_window", divergence_window, 1)
    if num_steps > num_train_steps:
        raise UserError(f"ReSample: num_steps={num_steps} exceeds num_train_steps={num_train_steps}")
    positive("guidance_scale", guidance_scale, allow_zero=True)
    positive("gamma", gamma)
    positive("pixel_lr", pixel_lr)
    positive("latent_lr", latent_lr)
    positive("tolerance", tolerance, allow_zero=True)
    positive("weight_decay", weight_decay, allow_zero=True)
    positive("adam_eps", adam_eps)
    if len(adam_betas) != 2 or not all(0 <= b < 1 for b in adam_betas):
        raise UserError(f"ReSample: adam_betas must be two numbers in [0, 1), got {adam_betas!r}")
    if not isinstance(final_latent_optimization, bool):
        raise UserError(f"ReSample: final_latent_optimization must be true or false, got {final_latent_optimization!r}")
    if beta_schedule == "mcgdiff_decreasing":
        raise UserError("ReSample: beta_schedule mcgdiff_decreasing is not a DDIM training schedule; use sqrt_linear")
    resample_alpha_bars(num_steps, num_train_steps, beta_schedule)


def accepts_network_sigma(prior: Prior) -> bool:
    """Whether ``prior.denoise`` takes a ``network_sigma`` keyword (needed by the released look-ahead)."""
    try:
        params = inspect.signature(prior.denoise).parameters
    except (TypeError, ValueError):
        return False
    return "network_sigma" in params


# ------------------------------------------------------------------------------------------------------ solver
def resample(
    problem: InverseProblem,
    prior: Prior,
    *,
    num_steps: int = 500,
    num_train_steps: int = 1000,
    beta_schedule: str = "sqrt_linear",
    tweedie: str = "original",
    guidance_scale_rule: str = "alphabar",
    guidance_scale: float = 0.5,
    dc_period: int = 10,
    dc_splits: int = 3,
    lookahead_steps: int = 5,
    lookahead_network_time: str = "released",
    gamma: float = 40.0,
    pixel_lr: float = 1e-2,
    pixel_max_iters: int = 2000,
    latent_lr: float = 5e-3,
    latent_max_iters: int = 500,
    tolerance: float = 1e-3,
    divergence_window: int | None = 200,
    weight_decay: float = 0.01,
    adam_betas: tuple[float, float] | list[float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    final_latent_optimization: bool = True,
    generator: GeneratorLike = None,
    callback: Callback | None = None,
    x_init: Tensor | None = None,
) -> SolverResult:
    """Run ReSample (module docstring). Guidance step h_i = ``guidance_scale`` * abar_i (``alphabar``, released with
    0.5) or ``guidance_scale`` (``constant``). ``x_init`` is the initial VP latent (default N(0, I) from
    ``generator``). The callback gets step, x, sigma (VE level of index i), denoised, and on data-consistency steps
    ``event`` ("pixel" | "latent") and ``inner_iterations`` (AdamW iterations per sample); the final optimisation is
    reported as one more step with ``event: "final"``."""
    hyper = dict(locals())
    for key in ("problem", "prior", "generator", "callback", "x_init"):
        hyper.pop(key)
    check_resample_hyperparameters(problem.operator, **hyper)
    if lookahead_steps > 0 and lookahead_network_time == "released" and not accepts_network_sigma(prior):
        raise UserError(
            f"ReSample: lookahead_network_time=released gives the network the time of the previous DDIM index through "
            f"prior.denoise(..., network_sigma=...), which {type(prior).__name__}.denoise does not take; use "
            "solver.lookahead_network_time=corrected (or a prior with network_sigma, e.g. a LatentPrior)"
        )
    z = initial_state(problem, prior, 1.0, generator, x_init)
    abar_t, abar_prev_t, _ = resample_alpha_bars(num_steps, num_train_steps, beta_schedule)
    abar, abar_prev = abar_t.tolist(), abar_prev_t.tolist()
    events = dc_events(num_steps, dc_period, dc_splits)
    batch_ndim = len(problem.batch_shape)
    y_dims = len(problem.operator.out_shape)
    counter = CountingDenoiser(prior)  # counts the calls below (made directly to pass network_sigma)

    def denoise(zv: Tensor, a: float, a_net: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(D, eps, x0_hat) at VP state zv with coefficients abar = a; network time of abar = a_net if given."""
        sigma = math.sqrt((1 - a) / a)
        x = zv / math.sqrt(a)
        net = None if a_net is None else torch.tensor(math.sqrt((1 - a_net) / a_net), dtype=zv.dtype, device=zv.device)
        kwargs = {} if net is None else {"network_sigma": net}
        counter.calls += 1
        d = prior.denoise(x, torch.tensor(sigma, dtype=zv.dtype, device=zv.device), generator=generator, **kwargs)
        eps = (x - d) / sigma
        x0_hat = d if tweedie == "exact" else (zv - (1 - a) * eps) / math.sqrt(a)
        return d, eps, x0_hat

    def mse(v: Tensor, through_decoder: bool) -> Tensor:
        """Per-sample mean-squared residual of y - A(decode(v)) (or A(v) for pixels v), shape batch_shape."""
        r = problem.y - problem.operator(prior.decode(v) if through_decoder else v)
        return r.pow(2).flatten(start_dim=r.ndim - y_dims).mean(-1)

    adam = dict(tolerance=tolerance, weight_decay=weight_decay, betas=tuple(adam_betas), eps=adam_eps)

    def latent_optimisation(start: Tensor) -> tuple[Tensor, Tensor]:
        return batched_adamw(lambda v: mse(v, True), start, batch_ndim, lr=latent_lr, max_iters=latent_max_iters,
                             divergence_window=divergence_window, **adam)

    with cost_meter(problem, counter) as cost:
        for i in range(num_steps):
            index = num_steps - 1 - i
            a, a_prev = abar[index], abar_prev[index]
            sigma = math.sqrt((1 - a) / a)
            zg = z.detach().requires_grad_(True)
            d, eps, x0_hat = denoise(zg, a)
            residual = problem.operator.residual_norm(problem.y - problem.operator(prior.decode(x0_hat)))
            check_finite(residual, "ReSample residual", i, sigma, "check the denoiser and operator, or lower guidance_scale")
            (grad,) = torch.autograd.grad(residual.sum(), zg)
            step = guidance_scale * a if guidance_scale_rule == "alphabar" else guidance_scale
            z = (math.sqrt(a_prev) * d + math.sqrt(1 - a_prev) * eps).detach() - step * grad
            info: dict[str, Any] = {"step": i, "sigma": sigma, "x": z, "denoised": d.detach(), "residual": residual.detach()}
            stage = events.get(index)
            if stage is not None:
                z_keep = z
                x0_la = x0_hat.detach()
                with torch.no_grad():
                    zl = z
                    for k in range(i, min(i + lookahead_steps, num_steps - 1)):
                        j = num_steps - 1 - k  # released coefficients; the state is at index j - 1
                        if lookahead_network_time == "released":
                            aj, aj_prev = abar[j], abar_prev[j]
                            d_l, eps_l, x0_la = denoise(zl, aj, abar[j - 1])
                        else:
                            aj, aj_prev = abar[j - 1], abar_prev[j - 1]
                            d_l, eps_l, x0_la = denoise(zl, aj)
                        zl = math.sqrt(aj_prev) * d_l + math.sqrt(1 - aj_prev) * eps_l
                    check_finite(x0_la, "ReSample look-ahead estimate", i, sigma, "check the denoiser")
                if stage == "pixel":
                    with torch.no_grad():
                        start = prior.decode(x0_la)
                    x_hat, iters = batched_adamw(lambda v: mse(v, False), start, batch_ndim, lr=pixel_lr,
                                                 max_iters=pixel_max_iters, divergence_window=None, **adam)
                    with torch.no_grad():
                        z_hat = prior.encode(x_hat)
                else:
                    z_hat, iters = latent_optimisation(x0_la)
                variance = float(resampling_variance(a, a_prev, gamma))
                z = stochastic_resample(z_hat.detach(), z_keep, a_prev, variance, generator)
                check_finite(z, "ReSample state", i, sigma, f"the {stage} optimisation diverged: lower its lr")
                info.update(x=z, event=stage, inner_iterations=iters)
            if callback is not None:
                callback(info)
        if final_latent_optimization:
            z, iters = latent_optimisation(z)
            check_finite(z, "ReSample state", num_steps, 0.0, "the final latent optimisation diverged: lower latent_lr")
            if callback is not None:
                callback({"step": num_steps, "sigma": 0.0, "x": z, "denoised": z, "event": "final",
                          "inner_iterations": iters})
        with torch.no_grad():
            samples = prior.decode(z)
    return SolverResult(samples, cost)


resample.check_hyperparameters = check_resample_hyperparameters  # type: ignore[attr-defined]
