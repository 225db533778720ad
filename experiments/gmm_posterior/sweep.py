"""Hyperparameter sweep of DAPS, CoDPS and CoDPS+ on cells of the GMM exact-posterior benchmark.

Each setting is one run of the real benchmark (``evaluate.py experiment=gmm_<solver>`` with the setting's overrides,
the oracle removed), on the same problems, reference and floor sets as the committed tables (the streams do not
depend on the samplers). The table printed and written to ``sweep.md`` lists, per setting and cell, SW1 and mode TV
(mean ± 95 % interval over the problems), the floor, the denoiser calls per sample and the sampler seconds.

    python experiments/gmm_posterior/sweep.py                       # every setting below, dx = 8 and 80, dy = 1
    python experiments/gmm_posterior/sweep.py --solvers daps --dims 8 --problems 20
    python experiments/gmm_posterior/sweep.py --list                # the settings, without running
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# (solver experiment, label, overrides). Labels start with the solver's name (the benchmark requires it).
SETTINGS: list[tuple[str, str, list[str]]] = [
    # DAPS: the committed paper-like row, then inner-chain length, annealing length, x0_hat and temperature
    ("gmm_daps", "daps", []),
    ("gmm_daps", "daps_L5", ["solver.mcmc_steps=5"]),
    ("gmm_daps", "daps_L100", ["solver.mcmc_steps=100"]),
    ("gmm_daps", "daps_K200_S5", ["solver.num_levels=200", "solver.ode_steps=5"]),
    ("gmm_daps", "daps_tweedie", ["solver.x0_hat=tweedie"]),
    ("gmm_daps", "daps_tweedie_L100", ["solver.x0_hat=tweedie", "solver.mcmc_steps=100"]),
    ("gmm_daps", "daps_tau_exact", ["solver.tau=1.41421356"]),
    ("gmm_daps", "daps_tweedie_tau_exact", ["solver.x0_hat=tweedie", "solver.tau=1.41421356"]),
    ("gmm_daps", "daps_no_decay", ["solver.lr_min_ratio=1.0"]),
    ("gmm_daps", "daps_no_decay_L100", ["solver.lr_min_ratio=1.0", "solver.mcmc_steps=100"]),
    ("gmm_daps", "daps_hmc", ["solver.mcmc=hmc", "solver.momentum=0.9", "solver.lr=0.25", "solver.lr_min_ratio=1.0"]),
    # CoDPS (DDPM): paper-like row, then the guidance schedule, strength and inv_var
    ("gmm_codps", "codps", []),
    ("gmm_codps", "codps_matched", ["solver.schedule=matched", "solver.scale=1.0", "solver.t_div=0"]),
    ("gmm_codps", "codps_matched_inv_var1", ["solver.schedule=matched", "solver.scale=1.0", "solver.t_div=0", "solver.inv_var=1.0"]),
    ("gmm_codps", "codps_scale1", ["solver.scale=1.0"]),
    ("gmm_codps", "codps_matched_inv_var_prior", ["solver.schedule=matched", "solver.scale=1.0", "solver.t_div=0", "solver.inv_var=0.0078"]),
    # CoDPS+ (DDIM 100): paper-like row, then the matched schedule (exact for one Gaussian of variance 1/inv_var)
    ("gmm_codps_plus", "codps_plus", []),
    ("gmm_codps_plus", "codps_plus_matched", ["solver.schedule=matched", "solver.scale=1.0", "solver.t_div=0", "solver.skip_last=false"]),
    ("gmm_codps_plus", "codps_plus_matched_inv_var1", ["solver.schedule=matched", "solver.scale=1.0", "solver.t_div=0", "solver.skip_last=false", "solver.inv_var=1.0"]),
    ("gmm_codps_plus", "codps_plus_scale1", ["solver.scale=1.0"]),
    ("gmm_codps_plus", "codps_plus_matched_inv_var_prior", ["solver.schedule=matched", "solver.scale=1.0", "solver.t_div=0", "solver.skip_last=false", "solver.inv_var=0.0078"]),
]


def run_setting(experiment: str, label: str, overrides: list[str], dims: list[int], dims_y: list[int], problems: int,
                out: Path) -> list[dict]:
    from hydra import compose, initialize_config_dir

    from diffinv_pl.cli import run_evaluation

    args = [
        f"experiment={experiment}", f"task.dims=[{','.join(map(str, dims))}]", f"task.dims_y=[{','.join(map(str, dims_y))}]",
        f"task.num_problems={problems}", f"task.samplers.solver.name={label}", "~task.samplers.oracle",
        f"paths.output_dir={out}", *overrides,
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=args)
    return run_evaluation(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solvers", nargs="+", default=["daps", "codps", "codps_plus"], help="solver families to sweep")
    parser.add_argument("--dims", nargs="+", type=int, default=[8, 80])
    parser.add_argument("--dims-y", nargs="+", type=int, default=[1])
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("sweep.md"))
    parser.add_argument("--labels", nargs="+", default=None, help="run only these settings (by label)")
    parser.add_argument("--append", action="store_true", help="add the rows to an existing --output table")
    parser.add_argument("--list", action="store_true", help="print the settings and stop")
    args = parser.parse_args(argv)
    known = {exp.removeprefix("gmm_") for exp, _, _ in SETTINGS}
    unknown = sorted(set(args.solvers) - known)
    if unknown:
        parser.error(f"unknown solver family {unknown}; valid: {sorted(known)}")
    settings = [s for s in SETTINGS if s[0].removeprefix("gmm_") in args.solvers]
    if args.labels is not None:
        missing = sorted(set(args.labels) - {label for _, label, _ in settings})
        if missing:
            parser.error(f"unknown setting label(s) {missing}; see --list")
        settings = [s for s in settings if s[1] in args.labels]
    if args.list:
        for exp, label, overrides in settings:
            print(f"{label:32s} experiment={exp} {' '.join(overrides)}")
        return 0
    command = f"`python experiments/gmm_posterior/sweep.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
    if args.append and args.output.exists():  # more rows under the same header (list the commands in the README)
        lines = args.output.read_text().splitlines()
    else:
        lines = [
            f"GMM sweep (MCGdiff protocol, {args.problems} problems per cell, n = 1000, SW1 with 10^4 directions; "
            f"mean ± 95 % interval). Command: {command}\n",
            "| setting | overrides | dx | dy | SW1 | floor SW1 | mode TV | NFE/sample | sampler s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for exp, label, overrides in settings:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                table = run_setting(exp, label, overrides, args.dims, args.dims_y, args.problems, Path(tmp))
            except FloatingPointError as err:  # a diverging setting is a result of the sweep, not a failure
                lines.append(f"| {label} | `experiment={exp} {' '.join(overrides)}` | {args.dims} | {args.dims_y} "
                             f"| diverged: {err} | | | | |")
                print(lines[-1], flush=True)
                args.output.write_text("\n".join(lines) + "\n")
                continue
            per_problem = (Path(tmp) / "per_problem.csv").read_text().splitlines()
        header = per_problem[0].split(",")
        calls = {}
        for line in per_problem[1:]:
            row = dict(zip(header, line.split(",")))
            if row["sampler"] == label:
                calls[(row["dx"], row["dy"])] = float(row["denoiser_calls"])
        for r in table:
            nfe = calls.get((str(r["dx"]), str(r["dy"])), float("nan"))  # one call denoises every sample
            lines.append(
                f"| {label} | `experiment={exp} {' '.join(overrides)}` | {r['dx']} | {r['dy']} "
                f"| {r['sw1']:.3f} ± {r['sw1_ci95']:.3f} | {r['floor_sw1']:.3f} ± {r['floor_sw1_ci95']:.3f} "
                f"| {r['mode_tv']:.3f} ± {r['mode_tv_ci95']:.3f} | {nfe:.0f} | {r['sampler_time_s']:.1f} |"
            )
        print(lines[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
        args.output.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
