"""Time per forward and adjoint call of every registered operator at 256x256, batch 8 (float32, CPU by default).

    OMP_NUM_THREADS=2 .venv/bin/python experiments/operators/benchmark.py [--device cuda] [--repeats 5]

Prints a Markdown table (median over repeats, milliseconds per batched call). Operators that cannot be built here
(e.g. the nonlinear blur without its user-supplied weights) are listed with the reason.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffinv_pl.operators import OPERATORS, LinearOperator, build_operator


def _median_ms(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device {device}, batch {args.batch}, 256x256, float32, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| operator | in shape | out shape | forward ms | adjoint ms |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for name in OPERATORS:
        try:
            op = build_operator(name).to(device)
        except (FileNotFoundError, ImportError) as err:
            print(f"| {name} | - | - | not built: {str(err).splitlines()[0][:80]} | - |")
            continue
        x = torch.rand(args.batch, *op.in_shape, generator=gen).to(device)
        with torch.no_grad():
            fwd = _median_ms(lambda: op(x), args.repeats, sync)
            y = op(x)
            adj = _median_ms(lambda: op.adjoint(y), args.repeats, sync) if isinstance(op, LinearOperator) else float("nan")
        adj_text = f"{adj:.1f}" if adj == adj else "- (nonlinear)"
        print(f"| {name} | {tuple(op.in_shape)} | {tuple(op.out_shape)} | {fwd:.1f} | {adj_text} |")


if __name__ == "__main__":
    main()
