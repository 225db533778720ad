"""Training cost of whole-image vs PaDIS patch training: peak memory and samples per second per training step.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/training/benchmark.py [--sizes 64 128 256] [--batch 4] \
        [--channels 64 64 64] [--blocks 2] [--steps 3] [--device cpu|cuda] [--out experiments/training/results.md]

For each image side N and each mode, one fresh subprocess builds a DiffusionTask (diffusers U-Net behind EDM
preconditioning, the same widths for every mode) and runs ``--steps`` optimizer steps (forward, EDM loss, backward,
Adam, EMA) on a batch of ``--batch`` random-ellipse phantoms of side N:

* ``whole``: the N x N images (the whole-image EDM baseline);
* ``patch``: one P x P patch per image with P = N/4 (PaDIS's 64 at N = 256), pad N/4, positional channels: the same
  number of network inputs per step as ``whole``;
* ``patch_paper``: the same patch size with PaDIS's batch multiplier m(P) (16 at P = 64, 32 at 32, 64 at 16), i.e.
  B m(P) patches per step, which has as many patch pixels per step as ``whole`` has image pixels.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the steps; on CPU the growth of the process's peak
resident set (``ru_maxrss``) from just before the first step (model, optimizer state and data already allocated), i.e.
the activations, gradients and optimizer state the steps add. Samples per second: images (``whole``) or patches per
second over the steps after the first (the first includes allocator warm-up). Ratios are whole / patch in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("whole", "patch", "patch_paper")
PAPER_MULTIPLIER = {16: 64, 32: 32, 64: 16}


def run_one(size: int, mode: str, batch: int, channels: list[int], blocks: int, steps: int, device: str) -> dict:
    """One measurement in this process (called in a fresh subprocess by :func:`main`)."""
    import lightning as L
    import torch

    from diffinv_pl.data.phantoms import random_ellipses_phantom
    from diffinv_pl.tasks.diffusion_training import DiffusionTask

    torch.manual_seed(0)
    p = size // 4
    patch, m = None, 1
    if mode != "whole":
        m = PAPER_MULTIPLIER.get(p, 1) if mode == "patch_paper" else 1
        patch = {"image_size": size, "pad_width": p, "patch_sizes": [p], "real_p": 1.0, "multipliers": {p: m}}
    net = {
        "_target_": "diffinv_pl.priors.unet.UNetDenoiserNet",
        "image_channels": 1,
        "cond_channels": 0 if patch is None else 2,
        "block_out_channels": channels,
        "layers_per_block": blocks,
        "norm_num_groups": min(32, min(channels)),
    }
    task = DiffusionTask(net, image_channels=1, data_range=(0.0, 1.0), patch=patch, ema_halflife_images=1000)
    images = torch.stack([random_ellipses_phantom(i, 0, size) for i in range(batch)]).to(device)
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    times: list[float] = []
    examples: list[int] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, module, step_batch, batch_idx):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, step_batch, batch_idx):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            examples.append(batch * m)  # images, or patches (m per image)

    trainer.callbacks.append(Timer())
    loader = torch.utils.data.DataLoader([{"image": im} for im in images.cpu()] * steps, batch_size=batch)
    rss_before = _current_rss_mib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(task, train_dataloaders=loader)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_rss_mib() - rss_before
    timed = times[1:] or times
    return {
        "size": size,
        "mode": mode,
        "patch": p if patch else None,
        "examples_per_step": examples[-1],
        "peak_mib": peak,
        "examples_per_s": sum(examples[1:] or examples) / sum(timed),
        "s_per_step": sum(timed) / len(timed),
    }


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 64, 64])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        row = run_one(int(args.one[0]), args.one[1], args.batch, args.channels, args.blocks, args.steps, args.device)
        print("RESULT " + json.dumps(row))
        return 0
    bad = [s for s in args.sizes if s % 16 or s < 16]
    if bad:
        parser.error(f"sizes must be multiples of 16 (patch N/4 through a {len(args.channels)}-level U-Net), got {bad}")
    rows = []
    for size in args.sizes:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--one", str(size), mode, "--batch", str(args.batch), "--channels",
                   *map(str, args.channels), "--blocks", str(args.blocks), "--steps", str(args.steps), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not lines:
                raise RuntimeError(f"benchmark run {size} {mode} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(lines[-1][len("RESULT "):]))
            print(f"{size:4d} {mode:12s} done", file=sys.stderr)
    table = _table(rows, args)
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


def _table(rows: list[dict], args) -> str:
    by = {(r["size"], r["mode"]): r for r in rows}
    lines = [
        f"Device {args.device}; batch {args.batch} images; U-Net channels {args.channels}, {args.blocks} blocks per level; "
        f"{args.steps} steps (timing excludes the first).",
        "",
        "| N | mode | patch P | examples/step | peak MiB | examples/s | s/step | whole/mode peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        whole = by[(r["size"], "whole")]["peak_mib"]
        ratio = whole / r["peak_mib"] if r["peak_mib"] > 0 else float("nan")
        lines.append(
            f"| {r['size']} | {r['mode']} | {r['patch'] or '-'} | {r['examples_per_step']} | {r['peak_mib']:.0f} | "
            f"{r['examples_per_s']:.2f} | {r['s_per_step']:.3f} | {ratio:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
