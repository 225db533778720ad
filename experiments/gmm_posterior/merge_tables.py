"""Merge GMM benchmark runs that share problems into one table (per_problem.csv, table.csv, table.md).

Every random draw of the benchmark has its own stream per (problem, sampler, init), so a run of only some samplers
gives the rows those samplers have in a run of all of them (bitwise at the same torch thread count). This script joins
such runs: it checks that the runs agree on every cell's problems (the exact-vs-exact floor rows must be equal, to
1e-9 relative: another thread count changes the last bit of the floor's SW1) and that no (cell, sampler, init)
appears twice, then writes the merged per-problem rows and the aggregate table (the first run's floor rows).

    python experiments/gmm_posterior/merge_tables.py OUT RUN_DIR [RUN_DIR ...] --command "..." [--command "..."]
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from diffinv_pl.tasks.gmm_benchmark import FLOOR_LABEL, markdown_table, summarise_cell  # noqa: E402
from diffinv_pl.utils.io import atomic_write_text, csv_text  # noqa: E402

NUMERIC = {"dx": int, "dy": int, "problem": int, "sigma_y": float, "sw1": float, "mode_tv": float, "n_eff": float,
           "sampler_time_s": float, "denoiser_calls": int, "cell_time_s": float}


def read_rows(run: Path) -> list[dict]:
    path = run / "per_problem.csv"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist: pass the output directories of finished benchmark runs")
    with path.open(newline="") as f:
        rows = [{k: NUMERIC[k](v) if k in NUMERIC else v for k, v in row.items()} for row in csv.DictReader(f)]
    return rows


def _close(u: float, v: float, rtol: float) -> bool:
    return abs(u - v) <= rtol * max(abs(u), abs(v), 1e-12)


def _same_floor(a: list[tuple], b: list[tuple], rtol: float = 1e-9) -> bool:
    """The same problems: equal problem indices, and sigma_y and the floor's SW1 and mode TV equal to ``rtol`` (runs
    with other torch versions or thread counts sum in another order: the last bit of sigma_y or SW1 may differ)."""
    return len(a) == len(b) and all(
        p == q and all(_close(u, v, rtol) for u, v in ((sy, sz), (w, x), (t, z)))
        for (p, sy, w, t), (q, sz, x, z) in zip(a, b)
    )


def merge(runs: list[Path]) -> tuple[list[dict], list[tuple]]:
    """Rows of every run, the floor once per cell; the cells (dx, dy, fixed sigma_y or None) in first-seen order."""
    merged: list[dict] = []
    floors: dict[tuple, list[tuple]] = {}
    seen: set[tuple] = set()
    cells: list[tuple] = []
    for run in runs:
        for row in read_rows(run):
            # a TMPD cell has one fixed sigma_y; the mcgdiff protocol draws sigma_y per problem
            cell = (row["dx"], row["dy"], row["sigma_y"] if row["protocol"] == "tmpd" else None)
            key = (*cell, row["sampler"], row["init"], row["problem"])  # a problem's sigma_y: part of the floor check
            if row["sampler"] == FLOOR_LABEL:
                floor = (row["problem"], row["sigma_y"], row["sw1"], row["mode_tv"])
                floors.setdefault((cell, run), []).append(floor)
                if key in seen:
                    continue
            elif key in seen:
                raise SystemExit(f"error: {row['sampler']}/{row['init']} of cell dx={cell[0]} dy={cell[1]} appears in two runs")
            seen.add(key)
            if cell not in cells:
                cells.append(cell)
            merged.append(row)
    for cell in cells:
        sets = [sorted(v) for k, v in floors.items() if k[0] == cell]
        if any(not _same_floor(s, sets[0]) for s in sets[1:]):
            raise SystemExit(f"error: the runs disagree on the problems of cell dx={cell[0]} dy={cell[1]} sigma_y={cell[2]} "
                             "(different floor rows): they were not run with the same seed, protocol and number of problems")
    return merged, cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--command", action="append", default=[], help="the command of each run (printed in table.md)")
    parser.add_argument("--num-directions", type=int, default=10_000)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--threads", default="1", help="torch threads the runs used, as text (printed in table.md)")
    args = parser.parse_args(argv)
    rows, cells = merge(args.runs)
    protocol = rows[0]["protocol"]
    table = []
    for dx, dy, sigma in sorted(cells, key=lambda c: (c[0], c[1], c[2] or 0.0)):
        sel = [r for r in rows if (r["dx"], r["dy"]) == (dx, dy) and (sigma is None or r["sigma_y"] == sigma)]
        table.extend(summarise_cell(sel, sigma))
    problems = max(r["problem"] for r in rows) + 1
    bench = SimpleNamespace(protocol=protocol, num_problems=problems, num_samples=args.num_samples,
                            num_directions=args.num_directions, dtype="torch.float32",
                            command=" ; ".join(args.command))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "per_problem.csv", csv_text(rows))
    atomic_write_text(args.out / "table.csv", csv_text(table))
    text = re.sub(r"\d+ torch threads\.", f"{args.threads} torch threads per run; runs merged by "
                  "experiments/gmm_posterior/merge_tables.py (same problems, checked).", markdown_table(table, bench))
    atomic_write_text(args.out / "table.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
