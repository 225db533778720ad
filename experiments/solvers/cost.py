"""Solver cost benchmark: is each diffusion solver's wall time within 5 % of (network + operator) time?

    OMP_NUM_THREADS=1 .venv/bin/python experiments/solvers/cost.py [--image-size 32] [--batch 4] [--steps 50]
        [--codps-steps 50] [--daps-levels 10 --daps-ode-steps 2 --daps-mcmc-steps 40] [--repeats 7] [--threads 1]

Set-up: a seeded, randomly initialised small U-Net (``diffinv_pl.priors.unet.UNetDenoiserNet``, the builder of
conf/model/edm_unet.yaml, here 2 levels (32, 64) x 1 block, 3 channels) behind ``EDMPrecond``, wrapped as a
``NetworkPrior`` (eval, requires_grad False, as a loaded checkpoint), on a circular Gaussian blur
(``build_operator("gaussian_blur_circular")``, std 3, kernel shrunk to fit the image), batch B of RGB images,
sigma_y = 0.05, float32 on CPU. Solvers: DPS, CoDPS, CoDPS+ on the VP grid (conf default sampling_grid=vp) with
their conf/solver/*.yaml hyperparameters, DAPS with the DAPS-1K pixel defaults but K levels, S ODE steps and L
Langevin steps per level (default K=10, S=2, L=40: 20 Langevin steps per NFE, the DAPS-1K ratio 100/5).

For every solver:
  wall     = seconds of one solver call (outer perf_counter; includes set-up checks and the initial draw)
  pure     = NFE x t(denoiser call) + forward calls x t(A) + adjoint calls x t(A^T) + Gram-inverse calls x t(gram)
             with NFE and operator calls from the solver's own SolverCost counters (Gram-inverse calls, which
             SolverCost does not count, are counted by wrapping the operator instance's ``gram_inverse``), and unit
             times measured separately at the same batch: DPS a forward+backward call of the denoiser (autograd.grad
             w.r.t. its input), the others a no-grad forward; A, A^T and the Gram inverse under no_grad.
  overhead = wall / pure - 1
The unit times are re-measured right before each solver run (solvers in a rotated order per round); the table gives
medians over rounds. On a shared machine the load can change between the unit measurement and the run, so the
script also reports an in-situ overhead: the same ratio with pure = the seconds spent inside the network calls (plus
DPS's backward inside autograd.grad), the raw A, A^T and Gram-inverse calls, timed during the run itself. Unless
--no-profile, each solver whose in-situ overhead exceeds 5 % is run once more under cProfile and its time split into
categories (network, operator wrappers vs raw operator, autograd bookkeeping, RNG, checks, the rest = solver
elementwise updates + Python); with DAPS, the parts of one Langevin step are also timed in isolation, next to the
closed-form gradient 2 w A^T (A x - y) as a what-if.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import importlib
import inspect
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable

import torch

from diffinv_pl.diffusion.preconditioning import EDMPrecond
from diffinv_pl.diffusion.schedules import vp_grid
from diffinv_pl.operators import build_operator
from diffinv_pl.operators.base import LinearOperator
from diffinv_pl.priors.network import NetworkPrior
from diffinv_pl.priors.unet import UNetDenoiserNet
from diffinv_pl.solvers import InverseProblem, codps, codps_plus, daps, dps
from diffinv_pl.solvers import base as solver_base
from diffinv_pl.solvers.base import CountingDenoiser
from diffinv_pl.utils import random as random_module

codps_module = importlib.import_module("diffinv_pl.solvers.codps")  # the package attribute is the function
daps_module = importlib.import_module("diffinv_pl.solvers.daps")

SOLVERS = ("dps", "daps", "codps", "codps_plus")
SIGMA_Y = 0.05


# ---------------------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Wall time vs. pure network + operator time of DPS, DAPS, CoDPS, CoDPS+ (small U-Net, CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--image-size", type=int, default=32, help="H = W of the RGB images (multiple of 2, >= 8)")
    p.add_argument("--batch", type=int, default=4, help="images per solver call")
    p.add_argument("--steps", type=int, default=50, help="grid steps of DPS and CoDPS+ (VP grid)")
    p.add_argument("--codps-steps", type=int, default=50, help="grid steps of CoDPS (VP grid)")
    p.add_argument("--daps-levels", type=int, default=10, help="DAPS annealing levels K")
    p.add_argument("--daps-ode-steps", type=int, default=2, help="DAPS ODE steps S per level (NFE = K S)")
    p.add_argument("--daps-mcmc-steps", type=int, default=40, help="DAPS Langevin steps L per level")
    p.add_argument("--repeats", type=int, default=7, help="rounds (all solvers + unit timings per round)")
    p.add_argument("--unit-calls", type=int, default=9, help="timed calls per unit measurement (median)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64], help="U-Net block_out_channels")
    p.add_argument("--layers-per-block", type=int, default=1, help="U-Net residual blocks per level")
    p.add_argument("--kernel-size", type=int, default=None,
                   help="blur kernel size (odd, <= image size); default min(61, largest odd <= image size)")
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS), help=f"subset of {', '.join(SOLVERS)}")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the cProfile breakdown")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.error(msg)

    for name in ("batch", "steps", "codps_steps", "daps_levels", "daps_ode_steps", "repeats", "unit_calls", "threads",
                 "layers_per_block"):
        need(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    need(args.daps_mcmc_steps >= 0, f"--daps-mcmc-steps must be >= 0, got {args.daps_mcmc_steps}")
    need(args.steps >= 2 and args.codps_steps >= 2, "--steps and --codps-steps must be >= 2 (VP grid respacing)")
    need(args.steps <= 1000 and args.codps_steps <= 1000, "--steps and --codps-steps must be <= 1000 (T = 1000)")
    need(all(c >= 8 and c % 8 == 0 for c in args.channels), f"--channels must be multiples of 8, got {args.channels}")
    multiple = 2 ** (len(args.channels) - 1)
    need(args.image_size >= 8 and args.image_size % multiple == 0,
         f"--image-size must be >= 8 and a multiple of {multiple} for a {len(args.channels)}-level U-Net, "
         f"got {args.image_size}")
    if args.kernel_size is None:
        args.kernel_size = min(61, args.image_size if args.image_size % 2 else args.image_size - 1)
    need(args.kernel_size % 2 == 1 and 1 <= args.kernel_size <= args.image_size,
         f"--kernel-size must be odd and <= --image-size ({args.image_size}), got {args.kernel_size}")
    bad = sorted(set(args.solvers) - set(SOLVERS))
    need(not bad, f"unknown solver(s) {', '.join(bad)}; valid: {', '.join(SOLVERS)}")
    args.solvers = [s for s in SOLVERS if s in args.solvers]
    return args


# ---------------------------------------------------------------------------------------------------------- set-up
def build(args: argparse.Namespace):
    torch.manual_seed(args.seed)
    net = UNetDenoiserNet(
        image_channels=3, cond_channels=0, block_out_channels=args.channels, layers_per_block=args.layers_per_block,
        dropout=0.0, norm_num_groups=min(32, min(args.channels)), norm_eps=1e-6,
    )
    prior = NetworkPrior(EDMPrecond(net, sigma_data=0.5), data_range=(-1.0, 1.0), image_channels=3)
    prior.eval().requires_grad_(False)  # as diffinv_pl.priors.checkpoints loads a trained prior
    op = build_operator("gaussian_blur_circular", kernel_size=args.kernel_size, std=3.0, channels=3,
                        image_size=args.image_size)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x_true = (torch.rand(args.batch, 3, args.image_size, args.image_size, generator=gen) * 2 - 1)
    y = op.measure(x_true, SIGMA_Y, gen)
    # Gram-inverse calls are not in SolverCost: count them on this instance (instance attribute shadows the method).
    op.gram_calls = 0
    method = op.gram_inverse

    @functools.wraps(method)
    def counted_gram(*a, **k):
        op.gram_calls += 1
        return method(*a, **k)

    op.gram_inverse = counted_gram
    return prior, op, y


def solver_calls(args: argparse.Namespace) -> dict[str, tuple[Callable, str]]:
    g, gc = vp_grid(args.steps), vp_grid(args.codps_steps)
    K, S, L = args.daps_levels, args.daps_ode_steps, args.daps_mcmc_steps
    return {
        "dps": (functools.partial(dps, grid=g, zeta=1.0, norm="l2", eta=1.0), f"VP {args.steps} steps, zeta 1"),
        "daps": (functools.partial(daps, num_levels=K, ode_steps=S, mcmc_steps=L),
                 f"K={K} S={S} L={L} Langevin, lr 1e-4, tau 0.01"),
        "codps": (functools.partial(codps, grid=gc), f"VP {args.codps_steps} steps, FFHQ deblur consts"),
        "codps_plus": (functools.partial(codps_plus, grid=g), f"VP {args.steps} steps, FFHQ deblur consts"),
    }


# ---------------------------------------------------------------------------------------------------------- timing
def median_time(fn: Callable[[], object], calls: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def unit_times(prior, op, y, args, grad: bool) -> dict[str, float]:
    """Median seconds per call: denoiser (no-grad forward, or with ``grad`` forward+backward w.r.t. its input as in
    DPS), A, A^T and the Gram inverse (no_grad, the raw ``_forward``/``_adjoint`` without input checks)."""
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
    v = torch.randn(x.shape, generator=gen)
    sigma = torch.tensor(1.0)

    def den_fwd() -> None:
        with torch.no_grad():
            prior.denoise(x, sigma)

    def den_fwd_bwd() -> None:
        xg = x.detach().requires_grad_(True)
        out = prior.denoise(xg, sigma)
        torch.autograd.grad(out, xg, grad_outputs=v)

    with torch.no_grad():
        fwd = median_time(lambda: op._forward(x), args.unit_calls * 5)
        adj = median_time(lambda: op._adjoint(y), args.unit_calls * 5)
        gram = median_time(lambda: type(op).gram_inverse(op, y, SIGMA_Y, 0.3), args.unit_calls * 5)
    den = {"den_fb": median_time(den_fwd_bwd, args.unit_calls)} if grad else {"den": median_time(den_fwd, args.unit_calls)}
    return {**den, "fwd": fwd, "adj": adj, "gram": gram}


def run_solver(fn, prior, op, y, seed: int):
    """One solver call. Returns the wall time, the call counts and in-situ timers: seconds spent inside the network
    (``prior.denoise``, plus for DPS the backward inside ``torch.autograd.grad`` minus the A^T calls nested in it),
    inside A, A^T and the Gram inverse (raw ``_forward``/``_adjoint``/``gram_inverse``), and inside autograd.grad,
    measured during the run itself (a perf_counter pair per call, ~0.2 us), so they see the same machine load."""
    problem = InverseProblem(y, op, SIGMA_Y)
    op.gram_calls = 0
    gen = torch.Generator().manual_seed(seed)
    acc = {"net": 0.0, "fwd": 0.0, "adj": 0.0, "gram": 0.0, "grad": 0.0, "adj_in_grad": 0.0}
    depth = [0]

    def timed(key: str, func: Callable) -> Callable:
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            if key == "grad":
                depth[0] += 1
            try:
                return func(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                acc[key] += dt
                if key == "grad":
                    depth[0] -= 1
                elif key == "adj" and depth[0]:
                    acc["adj_in_grad"] += dt
        return wrapper

    saved_gram = op.gram_inverse
    prior.denoise = timed("net", type(prior).denoise.__get__(prior))
    op._forward = timed("fwd", type(op)._forward.__get__(op))
    op._adjoint = timed("adj", type(op)._adjoint.__get__(op))
    op.gram_inverse = timed("gram", saved_gram)
    autograd_grad = torch.autograd.grad
    torch.autograd.grad = timed("grad", autograd_grad)
    try:
        t = time.perf_counter()
        result = fn(problem, prior, generator=gen)
        wall = time.perf_counter() - t
    finally:
        torch.autograd.grad = autograd_grad
        del prior.denoise, op._forward, op._adjoint
        op.gram_inverse = saved_gram
    c = result.cost
    counts = {"nfe": c.denoiser_calls, "fwd": c.operator_forward_calls, "adj": c.operator_adjoint_calls,
              "gram": op.gram_calls}
    return wall, counts, acc


def in_situ_overhead(name: str, wall: float, acc: dict[str, float]) -> tuple[float, float]:
    """(pure seconds, overhead) from the in-situ timers: pure = network (+ its backward for DPS) + A + A^T + gram."""
    net = acc["net"] + (acc["grad"] - acc["adj_in_grad"] if name == "dps" else 0.0)
    pure = net + acc["fwd"] + acc["adj"] + acc["gram"]
    return pure, wall / pure - 1


def pure_time(name: str, counts: dict[str, int], u: dict[str, float]) -> float:
    den = u["den_fb"] if name == "dps" else u["den"]
    return counts["nfe"] * den + counts["fwd"] * u["fwd"] + counts["adj"] * u["adj"] + counts["gram"] * u["gram"]


# ---------------------------------------------------------------------------------------------------------- profile
def _ct(stats: pstats.Stats, func: Callable) -> float:
    """Cumulative time of the (non-recursive) Python function ``func`` (matched by its code object's file, first line
    and name, so that e.g. ``_LinearApply.forward`` is not mistaken for ``LinearOperator.forward``)."""
    code = inspect.unwrap(func).__code__
    key = (code.co_filename, code.co_firstlineno, code.co_name)
    return stats.stats[key][3] if key in stats.stats else 0.0


def profile_solver(name: str, fn, prior, op, y, seed: int) -> tuple[str, dict[str, float]]:
    """Run once under cProfile and split the time into categories, each with the part that is pure work, all from
    the same run: network (``prior.denoise``; for DPS plus the backward inside autograd.grad, all counted as pure),
    A / A^T / Gram inverse (the solver-facing call: input checks + autograd Function + the raw operator, whose raw
    part ``_forward``/``_adjoint``/``gram_inverse`` is the pure work), autograd bookkeeping (autograd.grad minus the
    nested A^T), RNG, check_finite, and the rest (solver elementwise updates + Python)."""
    prof = cProfile.Profile()
    problem = InverseProblem(y, op, SIGMA_Y)
    gen = torch.Generator().manual_seed(seed)
    t = time.perf_counter()
    prof.enable()
    fn(problem, prior, generator=gen)
    prof.disable()
    total = time.perf_counter() - t
    st = pstats.Stats(prof)
    blur = type(op)
    net = _ct(st, CountingDenoiser.__call__)
    adj = _ct(st, LinearOperator.adjoint)
    grad = max(_ct(st, torch.autograd.grad) - adj, 0.0)  # autograd.grad minus the nested A^T calls
    rows = {}  # category -> (profiled s, pure s)
    if name == "dps":
        rows["network fwd+bwd"] = (net + grad, net + grad)
    else:
        rows["network fwd"] = (net, _ct(st, NetworkPrior.denoise))
    rows["A (checks + Function + raw)"] = (_ct(st, LinearOperator.forward), _ct(st, blur._forward))
    rows["A^T (checks + raw)"] = (adj, _ct(st, blur._adjoint))
    rows["Gram inverse (_gram_call + raw)"] = (_ct(st, codps_module._gram_call), _ct(st, blur.gram_inverse))
    if name != "dps":
        rows["autograd bookkeeping (grad excl. A^T)"] = (grad, 0.0)
    rows["RNG (utils.random.randn)"] = (_ct(st, random_module.randn), 0.0)
    rows["check_finite"] = (_ct(st, solver_base.check_finite), 0.0)
    rows["rest (elementwise updates + Python)"] = (total - sum(v[0] for v in rows.values()), 0.0)
    top = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:8]
    pure_total = sum(v[1] for v in rows.values())
    lines = [f"#### {name}: cProfile of one call, {total:.3f} s under the profiler, of which pure {pure_total:.3f} s "
             f"(profiled overhead {100 * (total / pure_total - 1):.1f} %; cProfile inflates Python-heavy parts)", "",
             "| category | profiled s | pure s | excess s |", "|---|---|---|---|"]
    for k, (prof_s, pure_s) in rows.items():
        lines.append(f"| {k} | {prof_s:.3f} | {pure_s:.3f} | {prof_s - pure_s:+.3f} |")
    lines += ["", "Top functions by own time (tottime):", "", "| function | calls | tottime s |", "|---|---|---|"]
    for (f, line, fn_name), v in top:
        short = f.split("site-packages/")[-1].split("/work/main/")[-1]
        lines.append(f"| `{short}:{line}({fn_name})` | {v[1]} | {v[2]:.3f} |")
    excess = {k: v[0] - v[1] for k, v in rows.items()}
    return "\n".join(lines), excess


def langevin_anatomy(prior, op, y, args) -> str:
    """Seconds per DAPS Langevin step (daps.daps_mcmc) and of its parts, timed in isolation (median of many calls)."""
    problem = InverseProblem(y, op, SIGMA_Y)
    gen = torch.Generator().manual_seed(7)
    x0_hat = torch.randn(y.shape, generator=gen)
    x = x0_hat + 0.01 * torch.randn(y.shape, generator=gen)
    weight = daps_module.likelihood_weight(problem, 0.01, False, "main")
    lr, prec, n = 1e-5, 1.0 / 0.5**2, 200

    def grad_autograd():
        return daps_module.likelihood_gradient(problem, prior, x, weight)

    def grad_analytic():  # 2 w A^T (A x - y): the same value for a linear operator and decode = identity
        with torch.no_grad():
            return op.adjoint((op(x) - y).mul_(2 * weight))

    def pure_ops():
        with torch.no_grad():
            op._adjoint(op._forward(x))

    def rng():
        random_module.randn(x.shape, gen, x.dtype, x.device)

    def update():
        z = x.clone()
        score = (x0_hat - z).mul_(prec).sub_(x0_hat)
        z.add_(score, alpha=lr).add_(x0_hat, alpha=(2 * lr) ** 0.5)

    def full_chain():
        daps_module.daps_mcmc(problem, prior, x0_hat, 0.5, steps=20, lr=lr, weight=weight, generator=gen)

    with torch.no_grad():
        g1, g2 = grad_autograd(), grad_analytic()
    err = float((g1 - g2).abs().max() / g1.abs().max())
    parts = [("A + A^T, raw (pure)", median_time(pure_ops, n)),
             ("likelihood_gradient (autograd: checks, Function, residual, pow, sum, backward)", median_time(grad_autograd, n)),
             ("randn (Langevin noise)", median_time(rng, n)),
             ("elementwise update (a clone + 4 in-place ops)", median_time(update, n)),
             ("one whole Langevin step (daps_mcmc with L=20, / 20)", median_time(full_chain, max(n // 10, 5)) / 20),
             ("what-if: analytic gradient 2 w A^T(Ax - y), no autograd", median_time(grad_analytic, n))]
    lines = ["#### DAPS Langevin step anatomy (one step on the whole batch, medians)", "",
             "| part | us per step |", "|---|---|"]
    lines += [f"| {k} | {1e6 * v:.0f} |" for k, v in parts]
    lines += ["", f"(analytic vs autograd gradient: max relative difference {err:.1e})"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    prior, op, y = build(args)
    calls = solver_calls(args)
    names = args.solvers
    nparams = sum(p.numel() for p in prior.parameters())
    print(f"# Solver cost benchmark\n\n{platform.machine()} {platform.processor() or ''}, nproc {os.cpu_count()}, "
          f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print(f"U-Net {tuple(args.channels)} x {args.layers_per_block} block(s), {nparams / 1e6:.2f} M parameters, EDM "
          f"preconditioning; gaussian_blur_circular {args.kernel_size}x{args.kernel_size} std 3; batch {args.batch} x "
          f"3 x {args.image_size} x {args.image_size}, float32; sigma_y {SIGMA_Y}; {args.repeats} rounds\n")
    print(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}\n", flush=True)

    walls = {n: [] for n in names}
    pures = {n: [] for n in names}
    overheads = {n: [] for n in names}
    dens = {n: [] for n in names}
    situ = {n: [] for n in names}
    units = []
    counts = {}
    for n in names:  # warm-up (allocator, FFT plans, spectra cache)
        run_solver(calls[n][0], prior, op, y, args.seed)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:  # unit times right before each solver run, so that pure and wall see the same load
            u = unit_times(prior, op, y, args, grad=(n == "dps"))
            units.append(u)
            wall, c, acc = run_solver(calls[n][0], prior, op, y, args.seed + r)
            counts[n] = c
            situ[n].append(in_situ_overhead(n, wall, acc))
            pure = pure_time(n, c, u)
            walls[n].append(wall)
            pures[n].append(pure)
            dens[n].append(u["den_fb"] if n == "dps" else u["den"])
            overheads[n].append(wall / pure - 1)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {walls[n][-1]:.3f}s ({100 * overheads[n][-1]:+.1f}% / in-situ {100 * situ[n][-1][1]:+.1f}%)"
                                                         for n in names), file=sys.stderr, flush=True)

    med = {k: statistics.median([x[k] for x in units if k in x] or [float("nan")])
           for k in ("den", "den_fb", "fwd", "adj", "gram")}
    print("Unit times (medians over the measurements before each solver run): denoiser no-grad forward "
          f"{1e3 * med['den']:.2f} ms, forward+backward {1e3 * med['den_fb']:.2f} ms; A {1e6 * med['fwd']:.0f} us, "
          f"A^T {1e6 * med['adj']:.0f} us, Gram inverse {1e6 * med['gram']:.0f} us\n")

    profiles, where = [], {}
    for n in names:
        oh = statistics.median(o for _, o in situ[n])
        if args.profile and oh > 0.05:
            text, excess = profile_solver(n, calls[n][0], prior, op, y, args.seed)
            profiles.append(text)
            total_excess = sum(v for v in excess.values() if v > 0)
            top = sorted(((v, k) for k, v in excess.items() if v > 0), reverse=True)[:3]
            where[n] = ", ".join(f"{k} {100 * v / total_excess:.0f}%" for v, k in top) if total_excess > 0 else "-"
        else:
            where[n] = "within 5 %" if oh <= 0.05 else "(not profiled)"

    print("| solver | settings | NFE | A / A^T / gram calls | denoiser s/call | wall s | pure s | overhead % "
          "| in-situ overhead % | excess ms / NFE | where the overhead goes (cProfile, share of excess) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in names:
        c = counts[n]
        den = statistics.median(dens[n])
        kind = "fwd+bwd" if n == "dps" else "no-grad"
        oh = statistics.median(overheads[n])
        spread = f"{100 * min(overheads[n]):.1f}..{100 * max(overheads[n]):.1f}"
        ohs = [o for _, o in situ[n]]
        spread_s = f"{100 * min(ohs):.1f}..{100 * max(ohs):.1f}"
        excess = 1e3 * statistics.median(w - p for w, (p, _) in zip(walls[n], situ[n])) / max(c["nfe"], 1)
        print(f"| {n} | {calls[n][1]} | {c['nfe']} | {c['fwd']} / {c['adj']} / {c['gram']} | {den:.4f} ({kind}) | "
              f"{statistics.median(walls[n]):.3f} | {statistics.median(pures[n]):.3f} | {100 * oh:.1f} ({spread}) | "
              f"{100 * statistics.median(ohs):.1f} ({spread_s}) | {excess:.2f} | {where[n]} |")
    print("\noverhead %: median over rounds of wall / pure - 1, pure = counts x unit times measured right before the "
          "run (min..max over rounds in brackets). in-situ overhead %: the same with pure = the time measured inside "
          "the network, A, A^T and Gram-inverse calls during the run itself (robust to load changes between the unit "
          "measurement and the run). excess ms / NFE: median (wall - in-situ pure) / NFE, the solver's own time per "
          "network call, independent of the network size\n")
    for text in profiles:
        print(text + "\n")
    if "daps" in names:
        print(langevin_anatomy(prior, op, y, args) + "\n")
    load1 = os.getloadavg()
    print(f"load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
