"""Exact-posterior benchmark on Gaussian-mixture problems (exact_posterior.md §0 and §8.3).

For every cell (dx, dy[, sigma_y]) it builds the problems, draws two independent exact posterior sample sets (the
reference and the noise-floor set), runs each configured sampler from each configured initial state, and reports per
problem and aggregated over problems (mean ± 1.96 std / sqrt(P)):

* SW1 to the reference (``n_directions`` random directions shared by every sampler of the cell),
* the mode-weight total variation, the same two numbers for the floor set (exact vs exact), and
* n_eff = 1 / sum_k wbar_k^2, the effective number of posterior modes.

Initial states: ``gaussian`` (the solver's own start, ``grid.init_std * N(0, I)`` drawn from its generator),
``prior`` (exact prior p_T) and ``posterior`` (exact noised posterior p_T(x | y)); the last two are drawn at the first
point of the sampler's ``grid``, which :class:`SamplerSpec` must then be given.

Random streams: every random draw has its own stream, one ``torch.Generator`` per problem seeded by
:func:`~diffinv_pl.utils.seeding.hash_seed` (sha256) of ``(seed, "gmm", protocol, dx, dy, sigma_y or "drawn", ...)``
followed by ``problem, "reference"``, ``problem, "floor"`` or ``problem, "sampler", label, init``, and one per cell
for the SW directions (``"sw_directions"``). A (sampler, init) stream gives first the exact initial state (``prior``
and ``posterior`` inits) and then all of the solver's noise. The problems themselves come from
:func:`~diffinv_pl.data.gmm_problems.problem_seed`. So adding, removing or reordering samplers changes no other
sampler's numbers, nor the floor, and the P problems of a cell are independent streams (solver states of shape
(P, n, d), row p drawn from generator p).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffinv_pl.errors import UserError
from diffinv_pl.data.gmm_problems import GMMProblemSet, make_gmm_problems
from diffinv_pl.diffusion.schedules import SamplingGrid
from diffinv_pl.operators.matrix import MatrixOperator
from diffinv_pl.priors.analytic import GaussianMixture
from diffinv_pl.priors.linear_latent import LinearDecoderPrior
from diffinv_pl.metrics.sliced_wasserstein import mode_weight_tv, random_directions, sliced_wasserstein_1_sorted, sorted_projections
from diffinv_pl.solvers.base import InverseProblem, Solver, check_solver_arguments
from diffinv_pl.utils.io import atomic_write_text, csv_text
from diffinv_pl.utils.random import GeneratorLike
from diffinv_pl.utils.seeding import hash_seed
from diffinv_pl.utils.stats import mean_ci95

log = logging.getLogger(__name__)

INITS = ("gaussian", "prior", "posterior")
EXACT_INITS = ("prior", "posterior")
FLOOR_LABEL = "exact"


@dataclass
class SamplerSpec:
    """A solver bound to its hyperparameters (e.g. a ``functools.partial``), the initial states to run it from, the
    sampling ``grid`` its exact initial states are drawn on (needed only for the ``prior`` and ``posterior`` inits; give
    the solver's own grid) and its ``name`` in the table (default: its key in ``samplers``; for the key ``solver``,
    the solver function's name). ``linear_decoder: true`` runs the solver through a linear decoder
    (:func:`linear_decoder_problem`: latent solvers such as ReSample and LatentDAPS, with the cell's exact posterior)."""

    solver: Solver
    inits: tuple[str, ...] = ("gaussian",)
    grid: SamplingGrid | None = None
    name: str | None = None
    linear_decoder: bool = False

    def __post_init__(self) -> None:
        self.inits = tuple(self.inits)
        bad = [i for i in self.inits if i not in INITS]
        if bad or not self.inits:
            raise UserError(f"unknown initial state(s) {bad or '(none given)'}; valid: {', '.join(INITS)}")
        if not callable(self.solver):
            raise UserError(f"a benchmark solver must be callable (see conf/solver), got {type(self.solver).__name__}")
        check_solver_arguments(self.solver)
        if self.grid is not None and not isinstance(self.grid, SamplingGrid):
            raise UserError(f"grid must be a SamplingGrid (e.g. grid: ${{sampling_grid}}), got {type(self.grid).__name__}")
        exact = [i for i in self.inits if i in EXACT_INITS]
        if exact and self.grid is None:
            raise UserError(
                f"the initial state(s) {', '.join(exact)} are drawn at the first grid point: give the sampler its "
                "sampling grid (`grid: ${sampling_grid}` beside `solver:` in conf/task/gmm_posterior.yaml)"
            )


def solver_name(solver: Solver) -> str | None:
    """The name of the function behind a solver (through ``functools.partial``), or None."""
    func = getattr(solver, "func", solver)
    name = getattr(func, "__name__", None)
    return None if name is None or name.startswith("<") else name


def initial_state(
    kind: str, grid: SamplingGrid | None, problems: GMMProblemSet, n: int, generator: GeneratorLike
) -> torch.Tensor | None:
    """Exact initial state (P, n, d), float64, at the first grid point x = s_0 (x0 + sigma_0 n): ``prior`` draws x0 from
    the prior, ``posterior`` from p(x0 | y); ``gaussian`` gives None (the solver draws its own start). ``generator``
    is one generator or one per problem (row p from generator p)."""
    if kind == "gaussian":
        return None
    if kind not in EXACT_INITS:
        raise UserError(f"unknown initial state {kind!r}; valid: {', '.join(INITS)}")
    if grid is None:
        raise UserError(f"the {kind} initial state needs the sampling grid")
    P, d = problems.num_problems, problems.prior.dim
    s0, sigma0 = float(grid.scales[0]), float(grid.sigmas[0])
    if kind == "prior":
        noised = problems.prior.noised(sigma0)
        single = generator is None or isinstance(generator, torch.Generator)
        x0 = noised.sample(P * n, generator).reshape(P, n, d) if single else noised.sample(n, generator)
        return s0 * x0
    return s0 * problems.posterior.noised(sigma0).sample(n, generator)


def linear_decoder_problem(
    problem: InverseProblem, prior: GaussianMixture, seed: int
) -> tuple[InverseProblem, LinearDecoderPrior]:
    """The cell's problem seen through a linear decoder x = W z: the mixture becomes the latent prior of a
    :class:`LinearDecoderPrior` and the operator A' (on the mixture's coordinates) the pixel operator A = A' W^-1, so
    that A W = A' and the exact posterior of z is the cell's. W is a Haar-random rotation drawn from ``seed`` (one per
    cell): then ||A|| = ||A'|| (DAPS's relative step is unchanged) and W^-1 = W^T. The solver's pixel samples are
    mapped back with ``encode`` (W^T x) and scored against the cell's reference."""
    d = prior.dim
    gauss = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    W = (q * torch.sign(torch.diagonal(r))).to(problem.y.dtype)  # sign fix: Haar-distributed
    operator = MatrixOperator(problem.operator.matrix @ W.T)
    latent = InverseProblem(problem.y, operator, problem.sigma_y, batch_shape=problem.batch_shape)
    return latent, LinearDecoderPrior(prior, W)


class GMMPosteriorBenchmark:
    """Run the GMM exact-posterior protocol and write per-problem rows and the aggregate table."""

    def __init__(
        self,
        samplers: dict[str, SamplerSpec | dict[str, Any]],
        dims: list[int],
        dims_y: list[int],
        protocol: str = "mcgdiff",
        sigmas_y: list[float] | None = None,
        num_problems: int = 20,
        num_samples: int = 1000,
        num_directions: int = 10_000,
        dtype: str = "float32",
        seed: int = 0,
        output_dir: str | Path = "outputs/gmm",
        command: str = "",
    ) -> None:
        if not samplers:
            raise UserError("configure at least one sampler (benchmark.samplers)")
        specs = [s if isinstance(s, SamplerSpec) else SamplerSpec(**s) for s in samplers.values()]
        # the generic slot `solver` (the solver group's choice) is labelled by its function unless named
        labels = [spec.name or (key == "solver" and solver_name(spec.solver)) or key for key, spec in zip(samplers, specs)]
        for label, spec in zip(labels, specs):
            func = solver_name(spec.solver)
            if func is not None and not label.startswith(func):
                raise UserError(
                    f"sampler {label!r} runs the solver {func!r}: name it after its solver (its conf/solver name, e.g. "
                    f"task.samplers.<key>.name={func}) so that the table says what ran"
                )
        if len(set(labels)) != len(labels) or FLOOR_LABEL in labels:
            raise UserError(f"sampler names must be unique and not {FLOOR_LABEL!r} (the floor), got {labels}")
        self.samplers = dict(zip(labels, specs))
        if protocol == "tmpd" and not sigmas_y:
            raise UserError("the tmpd protocol needs benchmark.sigmas_y, e.g. [0.01, 0.1, 1.0]")
        if protocol == "mcgdiff" and sigmas_y:
            raise UserError("the mcgdiff protocol draws sigma_y per problem; remove benchmark.sigmas_y")
        if num_samples < 2 or num_directions < 1:
            raise UserError("num_samples must be >= 2 and num_directions >= 1")
        self.cells = list(itertools.product(dims, dims_y, sigmas_y or [None]))
        for dx, dy, _ in self.cells:  # fail on bad dimensions before any sampling
            if dx < 2 or dx % 2 or not 0 < dy <= dx:
                raise UserError(f"bad cell dx={dx}, dy={dy}: dx must be even and 0 < dy <= dx")
        if dtype not in ("float32", "float64"):
            raise UserError(f"dtype must be float32 or float64, got {dtype!r}")
        self.dtype = getattr(torch, dtype)
        self.protocol = protocol
        self.num_problems = num_problems
        self.num_samples = num_samples
        self.num_directions = num_directions
        self.seed = seed
        self.output_dir = Path(output_dir)
        self.command = command

    def stream_seed(self, dx: int, dy: int, sigma_y: float | None, *purpose: object) -> int:
        """Seed of one random stream of a cell: ``purpose`` is (problem, "reference" | "floor"), (problem, "sampler",
        name, init) or ("sw_directions",) (module docstring)."""
        noise = "drawn" if sigma_y is None else float(sigma_y)  # 1 and 1.0 are the same stream
        return hash_seed(self.seed, "gmm", self.protocol, dx, dy, noise, *purpose)

    def generators(self, dx: int, dy: int, sigma_y: float | None, *purpose: object) -> list[torch.Generator]:
        """One generator per problem of the cell for ``purpose`` (row p of a draw comes from generator p)."""
        return [
            torch.Generator().manual_seed(self.stream_seed(dx, dy, sigma_y, p, *purpose)) for p in range(self.num_problems)
        ]

    def run_cell(self, dx: int, dy: int, sigma_y: float | None) -> list[dict[str, Any]]:
        """Per-problem rows of one cell, for the floor and every (sampler, init)."""
        start = time.perf_counter()
        problems = make_gmm_problems(dx, dy, self.num_problems, self.protocol, sigma_y, self.seed)
        n = self.num_samples
        reference = problems.posterior.sample(n, self.generators(dx, dy, sigma_y, "reference"))
        floor_set = problems.posterior.sample(n, self.generators(dx, dy, sigma_y, "floor"))
        sets: dict[tuple[str, str], tuple[torch.Tensor, float, dict[str, float]]] = {(FLOOR_LABEL, "-"): (floor_set, 0.0, {})}
        dt = self.dtype
        operator = MatrixOperator(problems.operator.matrix.to(dt))
        P = problems.num_problems
        problem = InverseProblem(problems.y.to(dt), operator, problems.sigma_y[:, None, None].to(dt), batch_shape=(P, n))
        prior = problems.prior.to(dt)
        for name, spec in self.samplers.items():
            for init in spec.inits:
                gens = self.generators(dx, dy, sigma_y, "sampler", name, init)
                x_init = initial_state(init, spec.grid, problems, n, gens)
                x_init = None if x_init is None else x_init.to(dt)
                if spec.linear_decoder:
                    decoder_seed = self.stream_seed(dx, dy, sigma_y, "linear_decoder")
                    latent_problem, latent_prior = linear_decoder_problem(problem, prior, decoder_seed)
                    result = spec.solver(latent_problem, latent_prior, generator=gens, x_init=x_init)
                    samples = latent_prior.encode(result.samples).to(torch.float64)
                else:
                    result = spec.solver(problem, prior, generator=gens, x_init=x_init)
                    samples = result.samples.to(torch.float64)
                sets[(name, init)] = (samples, result.cost.wall_time_s, result.cost.as_dict())
        dir_gen = torch.Generator().manual_seed(self.stream_seed(dx, dy, sigma_y, "sw_directions"))
        directions = random_directions(self.num_directions, dx, dir_gen)
        n_eff = problems.posterior.effective_num_modes()
        rows = []
        sw = {key: [] for key in sets}
        for p in range(problems.num_problems):
            ref_sorted = sorted_projections(reference[p], directions)
            for key, (samples, _, _) in sets.items():
                sw[key].append(sliced_wasserstein_1_sorted(ref_sorted, sorted_projections(samples[p], directions)))
        for (name, init), (samples, seconds, cost) in sets.items():
            tv = mode_weight_tv(samples, problems.posterior)
            for p in range(problems.num_problems):
                rows.append(
                    {
                        "protocol": self.protocol, "dx": dx, "dy": dy, "sigma_y": float(problems.sigma_y[p]),
                        "problem": p, "sampler": name, "init": init, "sw1": sw[(name, init)][p], "mode_tv": float(tv[p]),
                        "n_eff": float(n_eff[p]), "sampler_time_s": seconds / problems.num_problems,
                        "denoiser_calls": cost.get("denoiser_calls", 0),
                    }
                )
        log.info("cell dx=%d dy=%d sigma_y=%s done in %.1fs", dx, dy, sigma_y, time.perf_counter() - start)
        for row in rows:
            row["cell_time_s"] = time.perf_counter() - start
        return rows

    def run(self) -> list[dict[str, Any]]:
        """Run every cell, write ``per_problem.csv``, ``table.csv`` and ``table.md`` atomically, return the table."""
        per_problem: list[dict[str, Any]] = []
        table: list[dict[str, Any]] = []
        for dx, dy, sigma_y in self.cells:
            rows = self.run_cell(dx, dy, sigma_y)
            per_problem.extend(rows)
            table.extend(summarise_cell(rows, sigma_y))
            atomic_write_text(self.output_dir / "per_problem.csv", csv_text(per_problem))
        atomic_write_text(self.output_dir / "table.csv", csv_text(table))
        markdown = markdown_table(table, self)
        atomic_write_text(self.output_dir / "table.md", markdown)
        print(markdown)
        return table


def summarise_cell(rows: list[dict[str, Any]], sigma_y: float | None) -> list[dict[str, Any]]:
    """Aggregate one cell's per-problem rows: one line per (sampler, init) next to the exact-vs-exact floor."""
    floor = [r for r in rows if r["sampler"] == FLOOR_LABEL]
    floor_sw, floor_sw_ci = mean_ci95([r["sw1"] for r in floor])
    floor_tv, _ = mean_ci95([r["mode_tv"] for r in floor])
    n_eff, _ = mean_ci95([r["n_eff"] for r in floor])
    out = []
    keys = dict.fromkeys((r["sampler"], r["init"]) for r in rows if r["sampler"] != FLOOR_LABEL)
    for name, init in keys:
        sel = [r for r in rows if (r["sampler"], r["init"]) == (name, init)]
        sw, sw_ci = mean_ci95([r["sw1"] for r in sel])
        tv, tv_ci = mean_ci95([r["mode_tv"] for r in sel])
        out.append(
            {
                "dx": sel[0]["dx"], "dy": sel[0]["dy"], "sigma_y": "drawn" if sigma_y is None else sigma_y,
                "sampler": name, "init": init, "problems": len(sel),
                "sw1": sw, "sw1_ci95": sw_ci, "mode_tv": tv, "mode_tv_ci95": tv_ci,
                "floor_sw1": floor_sw, "floor_sw1_ci95": floor_sw_ci, "floor_mode_tv": floor_tv, "n_eff": n_eff,
                "sampler_time_s": sum(r["sampler_time_s"] for r in sel), "cell_time_s": sel[0]["cell_time_s"],
            }
        )
    return out


def markdown_table(table: list[dict[str, Any]], bench: GMMPosteriorBenchmark) -> str:
    """The aggregate table as Markdown, with the protocol settings in the header."""
    head = (
        f"GMM exact-posterior benchmark, protocol {bench.protocol}: {bench.num_problems} problems per cell, "
        f"n = {bench.num_samples} samples per set, SW1 with {bench.num_directions} directions (same for all samplers "
        f"of a cell); one random stream per (problem, sampler, init); sampling in {str(bench.dtype).removeprefix('torch.')}; mean ± 1.96 std/sqrt(problems); "
        f"floor = exact vs exact; {torch.get_num_threads()} torch threads.\n"
    )
    if bench.command:
        head += f"\nCommand: `{bench.command}`\n"
    lines = [
        head,
        "| dx | dy | sigma_y | sampler | init | SW1 | floor SW1 | mode TV | floor TV | n_eff | sampler s | cell s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['dx']} | {r['dy']} | {r['sigma_y']} | {r['sampler']} | {r['init']} | {r['sw1']:.3f} ± {r['sw1_ci95']:.3f} "
            f"| {r['floor_sw1']:.3f} ± {r['floor_sw1_ci95']:.3f} | {r['mode_tv']:.3f} ± {r['mode_tv_ci95']:.3f} "
            f"| {r['floor_mode_tv']:.3f} | {r['n_eff']:.2f} | {r['sampler_time_s']:.1f} | {r['cell_time_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"
