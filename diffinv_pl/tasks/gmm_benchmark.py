"""Exact-posterior benchmark on Gaussian-mixture problems (exact_posterior.md §0 and §8.3).

For every cell (dx, dy[, sigma_y]) it builds the problems, draws two independent exact posterior sample sets (the
reference and the noise-floor set), runs each configured sampler from each configured initial state, and reports per
problem and aggregated over problems (mean ± 1.96 std / sqrt(P)):

* SW1 to the reference (``n_directions`` random directions shared by every sampler of the cell),
* the mode-weight total variation, the same two numbers for the floor set (exact vs exact), and
* n_eff = 1 / sum_k wbar_k^2, the effective number of posterior modes.

Initial states: ``gaussian`` (the grid's N(0, init_std^2 I)), ``prior`` (exact prior p_T) and ``posterior`` (exact
noised posterior p_T(x | y)), all at the first grid point.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from diffinv_pl.data.gmm_problems import GMMProblemSet, make_gmm_problems
from diffinv_pl.diffusion.schedules import SamplingGrid
from diffinv_pl.operators.matrix import MatrixOperator
from diffinv_pl.metrics.sliced_wasserstein import mode_weight_tv, random_directions, sliced_wasserstein_1_sorted, sorted_projections
from diffinv_pl.solvers.base import InverseProblem, Solver
from diffinv_pl.utils.io import atomic_write_text, csv_text
from diffinv_pl.utils.stats import mean_ci95

log = logging.getLogger(__name__)

INITS = ("gaussian", "prior", "posterior")


@dataclass
class SamplerSpec:
    """A solver bound to its hyperparameters (a ``functools.partial`` with a ``grid``) and the initial states to run."""

    solver: Solver
    inits: tuple[str, ...] = ("gaussian",)

    def __post_init__(self) -> None:
        bad = [i for i in self.inits if i not in INITS]
        if bad or not self.inits:
            raise ValueError(f"unknown initial state(s) {bad or '(none given)'}; valid: {', '.join(INITS)}")
        if not isinstance(self.solver, partial) or not isinstance(self.solver.keywords.get("grid"), SamplingGrid):
            raise ValueError("a benchmark solver must be a partial with a SamplingGrid bound to `grid` (see conf/solver)")

    @property
    def grid(self) -> SamplingGrid:
        return self.solver.keywords["grid"]


def initial_state(kind: str, grid: SamplingGrid, problems: GMMProblemSet, n: int, gen: torch.Generator) -> torch.Tensor:
    """Initial state (P, n, d) at the first grid point x = s_0 (x0 + sigma_0 n)."""
    P, d = problems.num_problems, problems.prior.dim
    s0, sigma0 = float(grid.scales[0]), float(grid.sigmas[0])
    if kind == "gaussian":
        return grid.initial_noise((P, n, d), gen, torch.float64)
    if kind == "prior":
        return s0 * problems.prior.noised(sigma0).sample(P * n, gen).reshape(P, n, d)
    return s0 * problems.posterior.noised(sigma0).sample(n, gen)


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
            raise ValueError("configure at least one sampler (benchmark.samplers)")
        self.samplers = {name: s if isinstance(s, SamplerSpec) else SamplerSpec(**s) for name, s in samplers.items()}
        if protocol == "tmpd" and not sigmas_y:
            raise ValueError("the tmpd protocol needs benchmark.sigmas_y, e.g. [0.01, 0.1, 1.0]")
        if protocol == "mcgdiff" and sigmas_y:
            raise ValueError("the mcgdiff protocol draws sigma_y per problem; remove benchmark.sigmas_y")
        if num_samples < 2 or num_directions < 1:
            raise ValueError("num_samples must be >= 2 and num_directions >= 1")
        self.cells = list(itertools.product(dims, dims_y, sigmas_y or [None]))
        for dx, dy, _ in self.cells:  # fail on bad dimensions before any sampling
            if dx < 2 or dx % 2 or not 0 < dy <= dx:
                raise ValueError(f"bad cell dx={dx}, dy={dy}: dx must be even and 0 < dy <= dx")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        self.dtype = getattr(torch, dtype)
        self.protocol = protocol
        self.num_problems = num_problems
        self.num_samples = num_samples
        self.num_directions = num_directions
        self.seed = seed
        self.output_dir = Path(output_dir)
        self.command = command

    def run_cell(self, dx: int, dy: int, sigma_y: float | None) -> list[dict[str, Any]]:
        """Per-problem rows of one cell, for the floor and every (sampler, init)."""
        start = time.perf_counter()
        problems = make_gmm_problems(dx, dy, self.num_problems, self.protocol, sigma_y, self.seed)
        gen = torch.Generator().manual_seed(self.seed * 10**6 + dx * 1000 + dy * 100 + 99)
        n = self.num_samples
        reference = problems.posterior.sample(n, gen)
        floor_set = problems.posterior.sample(n, gen)
        sets: dict[tuple[str, str], tuple[torch.Tensor, float, dict[str, float]]] = {("exact", "-"): (floor_set, 0.0, {})}
        dt = self.dtype
        operator = MatrixOperator(problems.operator.matrix.to(dt))
        problem = InverseProblem(problems.y.to(dt), operator, problems.sigma_y[:, None, None].to(dt))
        prior = problems.prior.to(dt)
        for name, spec in self.samplers.items():
            for init in spec.inits:
                x_init = initial_state(init, spec.grid, problems, n, gen).to(dt)
                result = spec.solver(problem, prior, x_init, generator=gen)
                samples = result.samples.to(torch.float64)
                sets[(name, init)] = (samples, result.cost.wall_time_s, result.cost.as_dict())
        directions = random_directions(self.num_directions, dx, gen)
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
    floor = [r for r in rows if r["sampler"] == "exact"]
    floor_sw, floor_sw_ci = mean_ci95([r["sw1"] for r in floor])
    floor_tv, _ = mean_ci95([r["mode_tv"] for r in floor])
    n_eff, _ = mean_ci95([r["n_eff"] for r in floor])
    out = []
    keys = dict.fromkeys((r["sampler"], r["init"]) for r in rows if r["sampler"] != "exact")
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
        f"of a cell); sampling in {str(bench.dtype).removeprefix('torch.')}; mean ± 1.96 std/sqrt(problems); "
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
