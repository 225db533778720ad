"""The CT demo: train a tiny PaDIS patch prior on generated phantoms, then reconstruct 20-view CT of held-out phantoms
with PaDIS-DPS beside FBP and TV, and print one table (PSNR, SSIM, seconds per image) with where the images are.

    .venv/bin/python experiments/ct_demo/run.py                          # textured phantoms (the README's main job)
    .venv/bin/python experiments/ct_demo/run.py --phantoms ellipses      # the piecewise-constant ellipses
    .venv/bin/python experiments/ct_demo/run.py --compare-whole          # + a whole-image prior, same CPU time

Every step is a plain ``train.py`` / ``evaluate.py`` run (their progress bars show it working), so each one can be
repeated by hand with the command the demo prints:

1. ``train.py experiment=ct_demo_patch_prior`` for ``--train-minutes`` of wall time (``trainer.max_time``) on the
   training seeds of the phantom family (``--compare-whole``: ``experiment=ct_demo_whole_prior`` for the same time);
2. TV's lambda is chosen on ``--tune-images`` tuning phantoms (seed ``--tune-seed``, not the test set) from
   ``--tv-lambdas``; PaDIS-DPS runs with ``conf/solver/padis_dps_ct64.yaml`` (PaDIS's constants with sigma_max and
   zeta tuned on the same tuning phantoms: experiments/ct_demo/tuning.md);
3. ``evaluate.py experiment=ct_demo`` on ``--num-images`` held-out phantoms (seed 0) with FBP (``solver=pinv``), TV
   and PaDIS-DPS.

Outputs go to ``--out`` (default ``experiments/ct_demo/runs/<phantoms>``): ``patch_prior/`` (the training run and its
checkpoints), ``eval/<solver>/`` (per image ``samples/<key>/recon.png`` and ``recon.npy`` beside the target and the measurement,
``results.json``) and
``table.md``; a newly trained prior is also copied to ``--weights-dir`` (``data/weights``) unless a file is there.
A finished step is not redone when the demo runs again (a finished training run is reused, evaluations
resume), and nothing finished is overwritten: to start over, give a new ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHANTOMS = {
    # family -> (training data config, evaluation data config)
    "textured": ("train_ct_textured_phantoms", "ct_textured_phantoms"),
    "ellipses": ("train_ct_phantoms", "ct_phantoms"),
}
DEFAULT_LAMBDAS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


class DemoError(RuntimeError):
    """A step of the demo failed; the message names the step and its log."""


@dataclass
class TrainedPrior:
    """A finished training run of the demo and what it cost."""

    kind: str              # patch | whole
    checkpoint: Path
    seconds: float         # wall time of the training process
    steps: int             # optimizer steps taken
    images: int            # training images loaded (steps x batch size)
    peak_rss_mb: float     # peak resident memory of the training process


def _run(cmd: list[str], what: str) -> tuple[float, float]:
    """Run ``cmd`` in the repository root, its output shown live (progress bars); (seconds, peak RSS in MB)."""
    print(f"\n[ct_demo] {what}\n[ct_demo] $ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise DemoError(f"{what} failed (exit status {code}); rerun the command above to see the error")
    return seconds, usage.ru_maxrss / 1024.0


def _trained_prior(kind: str, info: dict) -> TrainedPrior:
    """The :class:`TrainedPrior` recorded in a run's ``demo_training.json``."""
    return TrainedPrior(kind=kind, checkpoint=Path(info["checkpoint"]), seconds=info["seconds"], steps=info["steps"],
                        images=info["images"], peak_rss_mb=info["peak_rss_mb"])


def _days_hours_minutes_seconds(minutes: float) -> str:
    """Lightning's ``max_time`` string DD:HH:MM:SS for a duration in minutes (rounded to the second)."""
    seconds = round(60 * minutes)
    return f"{seconds // 86400:02d}:{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _install_prior(checkpoint: Path, target: Path) -> None:
    """Copy a freshly trained prior to where ``prior=ct_demo_patch|ct_demo_whole`` (the PaDIS experiments' tiny
    variants) look for it, unless a file is already there (never overwritten)."""
    if target.exists():
        print(f"[ct_demo] {target} exists and is left as it is (this run's prior: {checkpoint})")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    shutil.copyfile(checkpoint, partial)
    partial.replace(target)
    print(f"[ct_demo] copied the prior to {target} (used by the PaDIS experiments' tiny variants)")


def train_prior(kind: str, args: argparse.Namespace) -> TrainedPrior:
    """Train the demo's ``kind`` prior for ``args.train_minutes`` minutes, or reuse a finished run in ``args.out``."""
    import torch

    run_dir = args.out / f"{kind}_prior"
    done = run_dir / "demo_training.json"
    if done.exists():
        info = json.loads(done.read_text())
        print(f"[ct_demo] reusing the finished {kind} prior in {run_dir} ({info['seconds']:.0f} s of training)")
        return _trained_prior(kind, info)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise DemoError(f"{run_dir} holds an unfinished training run (no demo_training.json: the demo stopped while "
                        "training): move that folder away and rerun the demo, or give another --out")
    minutes = args.train_minutes
    train_data, _ = PHANTOMS[args.phantoms]
    cmd = [sys.executable, "train.py", f"experiment=ct_demo_{kind}_prior", f"data={train_data}",
           "data.train.size=64", "data.val.size=64", f"data.batch_size={args.train_batch_size}",
           f"paths.output_dir={run_dir}",
           f"trainer.max_time={_days_hours_minutes_seconds(minutes)}"]
    seconds, peak = _run(cmd, f"training the {kind} prior on {args.phantoms} phantoms for {minutes:g} min")
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        raise DemoError(f"training wrote no {checkpoint}; see the training output above")
    steps = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"])
    info = {"checkpoint": str(checkpoint), "seconds": seconds, "steps": steps, "images": steps * args.train_batch_size,
            "peak_rss_mb": peak, "command": shlex.join(cmd)}
    done.write_text(json.dumps(info, indent=1))
    _install_prior(checkpoint, args.weights_dir / f"ct_demo_{kind}_prior.ckpt")
    return _trained_prior(kind, info)


def evaluate(name: str, overrides: list[str], args: argparse.Namespace, *, seed: int, num_images: int,
             out: Path) -> dict:
    """``evaluate.py experiment=ct_demo`` with ``overrides`` on ``num_images`` phantoms of ``seed``; its summary."""
    _, eval_data = PHANTOMS[args.phantoms]
    cmd = [sys.executable, "evaluate.py", "experiment=ct_demo", f"data={eval_data}", "data.size=64",
           f"data.num_images={num_images}", f"seed={seed}", f"paths.output_dir={out}", *overrides]
    _run(cmd, f"{name} on {num_images} phantoms (seed {seed})")
    return json.loads((out / "results.json").read_text())["summary"]


def tune_tv(args: argparse.Namespace) -> tuple[float, list[tuple[float, float]]]:
    """TV's lambda with the best mean PSNR on the tuning phantoms: (lambda, [(lambda, PSNR), ...])."""
    scores = []
    for lam in args.tv_lambdas:
        summary = evaluate(f"TV lambda={lam:g} (tuning)", ["solver=tv", "~prior", f"solver.lam={lam}",
                                                           f"solver.num_iterations={args.tv_iterations}"],
                           args, seed=args.tune_seed, num_images=args.tune_images,
                           out=args.out / "tune_tv" / f"lam_{lam:g}")
        scores.append((lam, summary["psnr"]))
    best = max(scores, key=lambda s: s[1])[0]
    return best, scores


def _row(name: str, summary: dict, out: Path) -> str:
    return (f"| {name} | {summary['psnr']:.2f} ± {summary['psnr_ci95']:.2f} | {summary['ssim']:.4f} ± "
            f"{summary['ssim_ci95']:.4f} | {summary['wall_time_s']:.2f} | "
            f"`{out.relative_to(REPO) if out.is_relative_to(REPO) else out}/samples` |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phantoms", choices=sorted(PHANTOMS), default="textured")
    parser.add_argument("--out", type=Path, default=None, help="default experiments/ct_demo/runs/<phantoms>")
    parser.add_argument("--train-minutes", type=float, default=5.0)
    parser.add_argument("--train-batch-size", type=int, default=8, help="images per training step")
    parser.add_argument("--num-images", type=int, default=6, help="held-out test phantoms (seed 0)")
    parser.add_argument("--tune-images", type=int, default=4)
    parser.add_argument("--tune-seed", type=int, default=1)
    parser.add_argument("--tv-lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS))
    parser.add_argument("--tv-iterations", type=int, default=1000)
    parser.add_argument("--weights-dir", type=Path, default=REPO / "data" / "weights",
                        help="where a newly trained prior is also copied if no file is there (prior=ct_demo_patch)")
    parser.add_argument("--compare-whole", action="store_true",
                        help="also train the whole-image prior for the same time and evaluate it with PaDIS-DPS")
    parser.add_argument("--padis", nargs="*", default=[],
                        help="extra overrides for the PaDIS-DPS runs, e.g. solver.zeta=0.1")
    args = parser.parse_args(argv)
    if args.train_minutes <= 0 or args.num_images < 1 or args.tune_images < 1:
        parser.error("--train-minutes, --num-images and --tune-images must be positive")
    if args.tune_seed == 0:
        parser.error("--tune-seed 0 is the test set's seed: tune on other phantoms")
    args.out = (args.out or REPO / "experiments" / "ct_demo" / "runs" / args.phantoms).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        priors = [train_prior("patch", args)]
        if args.compare_whole:
            priors.append(train_prior("whole", args))
        lam, scores = tune_tv(args)
        test = {"seed": 0, "num_images": args.num_images}
        rows = [("FBP", evaluate("FBP", ["solver=pinv", "~prior"], args, **test, out=args.out / "eval" / "fbp"),
                 args.out / "eval" / "fbp"),
                (f"TV (lambda {lam:g})", evaluate(f"TV lambda={lam:g}", ["solver=tv", "~prior", f"solver.lam={lam}",
                                                  f"solver.num_iterations={args.tv_iterations}"],
                                                  args, **test, out=args.out / "eval" / "tv"), args.out / "eval" / "tv")]
        for prior in priors:
            out = args.out / "eval" / f"padis_dps_{prior.kind}"
            label = "PaDIS-DPS, patch prior" if prior.kind == "patch" else "PaDIS-DPS, whole-image prior"
            rows.append((label, evaluate(label, [f"prior=ct_demo_{prior.kind}", f"prior.path={prior.checkpoint}",
                                                 *args.padis], args, **test, out=out), out))
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = time.perf_counter() - start
    lines = [
        f"CT demo: 20-view parallel-beam CT (128 bins, sigma_y 0.01) of {args.num_images} held-out 64x64 "
        f"{args.phantoms} phantoms (seed 0); mean ± 95% CI over images.",
        "",
        "| method | PSNR (dB) | SSIM | s / image | reconstructions |",
        "|---|---|---|---|---|",
        *[_row(name, summary, out) for name, summary, out in rows],
        "",
        "s / image: the solver's wall time over its batches (8 images each), divided by the number of images. "
        "PaDIS-DPS: conf/solver/padis_dps_ct64.yaml (100 levels x 10 inner steps, 1000 network calls with a backward "
        "pass per image)" + (f", with {' '.join(args.padis)}." if args.padis else "."),
        "",
        f"TV lambda chosen on {args.tune_images} tuning phantoms (seed {args.tune_seed}), {args.tv_iterations} "
        "iterations: " + ", ".join(f"{lam:g}: {psnr:.2f} dB" for lam, psnr in scores) + ".",
        "",
        "| prior | training s | steps | images | images / s | peak training RSS (MB) |",
        "|---|---|---|---|---|---|",
        *[f"| {p.kind} | {p.seconds:.0f} | {p.steps} | {p.images} | {p.images / p.seconds:.1f} | "
          f"{p.peak_rss_mb:.0f} |" for p in priors],
        "",
        f"Total {total / 60:.1f} min on {os.cpu_count()} cores ({platform.processor() or platform.machine()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); outputs in {args.out}.",
    ]
    table = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(table)
    print("\n" + table, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
