"""Overhead of ``CTOperator`` over raw ODL/ASTRA calls (PaDIS geometries, 256 x 256, batch 8).

For each geometry the raw baseline loops over the batch calling ODL's ``RayTransform`` (forward) and its
``adjoint`` on float32 numpy arrays prepared beforehand; the wrapped path calls ``CTOperator.forward`` on a torch
tensor that requires grad (so it goes through the autograd Function) and ``CTOperator.adjoint`` (which also applies
the constant w_vol / w_proj turning ODL's weighted adjoint into the Euclidean transpose). Both are timed side by
side, interleaved, in one process; the table gives medians over ``--repeats`` runs and the ratio wrapped / raw.

Usage: OMP_NUM_THREADS=2 python experiments/operators/ct_overhead.py [--repeats 7] [--batch 8] [--impl astra_cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from diffinv_pl.operators.ct import CTOperator

CONFIGS = [("parallel", 180), ("fan", 180), ("limited_angle", 60)]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--impl", default="auto")
    args = parser.parse_args()

    rows = []
    impl_used = None
    for geometry, views in CONFIGS:
        op = CTOperator(geometry, num_views=views, image_size=args.image_size, impl=args.impl)
        impl_used = op.impl
        ray, back = op.ray_trafo, op.ray_trafo.adjoint
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(args.batch, *op.in_shape, generator=gen)
        y = torch.rand(args.batch, *op.out_shape, generator=gen)
        x_np = [np.ascontiguousarray(x[i, 0].numpy()) for i in range(args.batch)]
        y_np = [np.ascontiguousarray(y[i, 0].numpy()) for i in range(args.batch)]
        x_grad = x.clone().requires_grad_(True)

        def raw_fwd():
            return np.stack([ray(a).asarray() for a in x_np])

        def raw_adj():
            return np.stack([back(a).asarray() for a in y_np])

        def op_fwd():
            return op(x_grad)

        def op_adj():
            return op.adjoint(y)

        # sanity: the wrapped results equal the raw ones (the adjoint up to the documented weight ratio)
        assert np.allclose(op_fwd().detach()[:, 0].numpy(), raw_fwd(), rtol=1e-6, atol=1e-6)
        assert np.allclose(op_adj()[:, 0].numpy(), op.weight_ratio * raw_adj(), rtol=1e-5, atol=1e-5)

        times: dict[str, list[float]] = {k: [] for k in ("raw_fwd", "op_fwd", "raw_adj", "op_adj")}
        for _ in range(args.repeats):  # interleaved so drifts in machine load hit both paths alike
            times["raw_fwd"].append(_time(raw_fwd))
            times["op_fwd"].append(_time(op_fwd))
            times["raw_adj"].append(_time(raw_adj))
            times["op_adj"].append(_time(op_adj))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append((geometry, views, med))

    print(f"CT operator overhead: {args.image_size}x{args.image_size}, 512 detector bins, batch {args.batch}, "
          f"impl {impl_used}, median of {args.repeats} interleaved repeats, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print()
    print("| geometry | views | raw ODL fwd (ms) | CTOperator fwd, autograd (ms) | fwd ratio "
          "| raw ODL adjoint (ms) | CTOperator adjoint (ms) | adjoint ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for geometry, views, m in rows:
        print(f"| {geometry} | {views} | {m['raw_fwd']:.1f} | {m['op_fwd']:.1f} | {m['op_fwd'] / m['raw_fwd']:.3f}x "
              f"| {m['raw_adj']:.1f} | {m['op_adj']:.1f} | {m['op_adj'] / m['raw_adj']:.3f}x |")


if __name__ == "__main__":
    main()
