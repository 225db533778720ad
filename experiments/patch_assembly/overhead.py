"""Patch-assembly overhead per denoiser call vs one whole-image call of the same network (issue 12).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/patch_assembly/overhead.py [--sizes 32 64 128] \
        [--patch-sizes 8 16] [--batch 1 4] [--pad-width 8] [--rounds 9] [--min-time-ms 100] [--min-calls 3] \
        [--clock cpu] [--sigma 1.0] [--threads 1] [--profile-threshold 10] [--no-profile] [--seed 0]

The patch network is built the way ``python train.py experiment=padis_ct_tiny`` builds it: the Hydra config ``train``
of ``conf/`` composed with ``experiment=padis_ct_tiny`` (and the image size under test: ``model.patch.image_size``,
``data.train.size``, ``data.val.size``; optionally ``model.patch.pad_width``), then ``instantiate(cfg.model)``, i.e. a
``DiffusionTask`` holding the 2-level 32-channel ``UNetDenoiserNet`` with 2 positional channels behind EDM
preconditioning, and its EMA copy. Weights are random (timing only); the EMA denoiser is put in eval mode with
``requires_grad_(False)`` and everything runs under ``torch.no_grad()``. The whole-image prior is what a loaded
checkpoint gives: ``DiffusionPrior(...).whole_image(P)`` with the fields of ``task.checkpoint_description()``
(for P = the largest training patch this is exactly ``task.whole_image_prior()``), a ``PatchAssembledPrior`` whose
state is the padded canvas (R = N + 2M).

For each image side N, inference patch size P and batch B, on a (B, 1, R, R) canvas state (``prior.encode`` of
random images plus sigma-noise over the whole canvas), four things are timed:

* (a) ``prior.denoise(canvas, sigma, generator=gens)``: one assembled whole-image denoiser call, ``gens`` one
  ``torch.Generator`` per image (as the solvers pass them; each call draws a new shift per image);
* (b) the same EDM-preconditioned network on the whole canvas with the full-canvas positional map
  (``canvas_positional_channels``, computed once outside the timing, as a whole-image prior would cache it):
  ``denoiser(canvas, sigma_B, pos=pos_canvas)``, the cost of one whole-image call of that network;
* (c) the same network on exactly the patch batch (a) hands it: the (B n^2, 1, P, P) patches, their (B n^2,) sigmas
  and (B n^2, 2, P, P) positional channels, captured from one call of (a) with a forward pre-hook, i.e. the pure
  network part of (a);
* (d) (a) with the network replaced by one that returns its input (same convention, patch size, pad value and
  generators): the assembly alone, measured directly instead of as the small difference a - c of two large times.

Ratio a/b: assembled vs whole-image call; overhead (a - c) / c (and its direct estimate d / c): cutting the patches,
building their positional channels, writing them back, padding the result and drawing the shifts. Timing: every round
visits every configuration (rotated order) and runs ``calls`` x (a, b, c, d) in rotated order, each call timed on its
own, ``calls`` chosen once so that each of a, b, c lasts at least ``--min-time-ms`` per round (and >= ``--min-calls``);
the table gives the median over rounds of the ms per call and of the per-round differences and ratios, so a load
change hits a, b, c and d of a round alike. The default clock is the process CPU time (one thread: the work done, not
the time spent waiting for a core on a loaded machine); ``--clock wall`` times wall-clock. When the median overhead
(a - c) / c or d / c of a configuration exceeds ``--profile-threshold`` percent, (a) of the worst such configuration is
run under cProfile and the time per call is split by the callees of ``PatchAssembledPrior.forward`` /
``_assembled_centre``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
EXPERIMENT = "padis_ct_tiny"
MAX_SIZE = 512
MAX_BATCH = 64


def _parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="overhead.py",
        description="Patch-assembly overhead of the padis_ct_tiny patch prior vs a whole-canvas call of its network.",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="image sides N (default 32 64 128)")
    p.add_argument(
        "--patch-sizes", type=int, nargs="+", default=None,
        help="inference patch sizes P (default: the config's training patch sizes, model.patch.patch_sizes)",
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes B (default 1 4)")
    p.add_argument("--pad-width", type=int, default=None, help="pad M (default: the config's model.patch.pad_width)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds, median reported (default 9)")
    p.add_argument("--min-time-ms", type=float, default=100.0, help="least duration of one measurement (default 100)")
    p.add_argument("--min-calls", type=int, default=3, help="least calls of each of a, b, c per round (default 3)")
    p.add_argument(
        "--clock", choices=sorted(CLOCKS), default="cpu",
        help="cpu: process CPU time (robust to other jobs on a loaded machine; one thread); wall: perf_counter",
    )
    p.add_argument("--sigma", type=float, default=1.0, help="noise level, model units (default 1.0)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--profile-threshold", type=float, default=10.0, help="cProfile above this overhead %% (default 10)")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile breakdown")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and shift generators (default 0)")
    args = p.parse_args(argv)

    def check_list(name: str, values: list[int] | None, lo: int, hi: int) -> None:
        if values is None:
            return
        bad = [v for v in values if not lo <= v <= hi]
        if bad:
            p.error(f"--{name} must lie in [{lo}, {hi}], got {bad}")
        if len(set(values)) != len(values):
            p.error(f"--{name} has repeated values: {values}")

    check_list("sizes", args.sizes, 2, MAX_SIZE)
    check_list("patch-sizes", args.patch_sizes, 1, MAX_SIZE)
    check_list("batch", args.batch, 1, MAX_BATCH)
    if args.pad_width is not None and not 0 <= args.pad_width <= MAX_SIZE:
        p.error(f"--pad-width must lie in [0, {MAX_SIZE}], got {args.pad_width}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if not (math.isfinite(args.min_time_ms) and 0 < args.min_time_ms <= 10_000):
        p.error(f"--min-time-ms must lie in (0, 10000], got {args.min_time_ms}")
    if not 1 <= args.min_calls <= 1000:
        p.error(f"--min-calls must lie in [1, 1000], got {args.min_calls}")
    if not (math.isfinite(args.sigma) and args.sigma > 0):
        p.error(f"--sigma must be a positive finite noise level, got {args.sigma}")
    if not 1 <= args.threads <= 256:
        p.error(f"--threads must lie in [1, 256], got {args.threads}")
    if not (math.isfinite(args.profile_threshold) and args.profile_threshold >= 0):
        p.error(f"--profile-threshold must be a finite percentage >= 0, got {args.profile_threshold}")
    return p, args


def _compose(image_size: int, pad_width: int | None):
    from hydra import compose, initialize_config_dir

    overrides = [
        f"experiment={EXPERIMENT}",
        f"model.patch.image_size={image_size}",
        f"data.train.size={image_size}",
        f"data.val.size={image_size}",
    ]
    if pad_width is not None:
        overrides.append(f"model.patch.pad_width={pad_width}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides), overrides


def _check_geometry(parser, args, cfg) -> tuple[list[int], int, int]:
    """Patch sizes, pad and the U-Net's size multiple; argparse errors for what the network or the grid refuses."""
    patch_sizes = args.patch_sizes or sorted(int(s) for s in cfg.model.patch.patch_sizes)
    pad = int(cfg.model.patch.pad_width) if args.pad_width is None else args.pad_width
    multiple = 2 ** (len(cfg.model.net.block_out_channels) - 1)  # UNetDenoiserNet.size_multiple
    for p in patch_sizes:
        if p % multiple:
            parser.error(f"--patch-sizes: {p} is not a multiple of {multiple}, the U-Net's size multiple")
    for n in args.sizes:
        r = n + 2 * pad
        if r % multiple:
            parser.error(
                f"--sizes: canvas {n} + 2*{pad} = {r} is not a multiple of {multiple} (the whole-canvas call b)"
            )
        too_big = [p for p in patch_sizes if p > r]
        if too_big:
            parser.error(f"--patch-sizes {too_big} exceed the padded canvas {r} of image size {n} (pad {pad})")
    return patch_sizes, pad, multiple


CLOCKS = {"cpu": time.process_time_ns, "wall": time.perf_counter_ns}


def _time(fn, calls: int, clock=time.perf_counter_ns) -> float:
    """ms per call over ``calls`` back-to-back calls."""
    t0 = clock()
    for _ in range(calls):
        fn()
    return (clock() - t0) * 1e-6 / calls


def _time_interleaved(fns: dict, order: list[str], calls: int, clock) -> dict[str, float]:
    """ms per call of each function, timed call by call in the rotated ``order`` a, b, c, a, b, c, ... so that a
    change of machine load falls on all of them alike."""
    total = dict.fromkeys(order, 0)
    for _ in range(calls):
        for kind in order:
            t0 = clock()
            fns[kind]()
            total[kind] += clock() - t0
    return {kind: v * 1e-6 / calls for kind, v in total.items()}


class _NoNetwork:
    """Stands in for the patch network in (d): returns the patches it is given (an nn.Module is not needed)."""

    def __call__(self, x, sigma, pos=None):
        return x


def _loadavg() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser, args = _parse(argv)

    import torch
    from hydra.utils import instantiate

    from diffinv_pl.priors.checkpoints import DiffusionPrior
    from diffinv_pl.priors.patch_denoiser import PatchAssembledPrior
    from diffinv_pl.priors.patches import canvas_positional_channels

    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    start_load, t_start, cpu_start = _loadavg(), time.perf_counter(), time.process_time()
    cfg, overrides = _compose(args.sizes[0], args.pad_width)
    patch_sizes, pad, _ = _check_geometry(parser, args, cfg)  # argparse errors before any output
    print("# Patch-assembly overhead per denoiser call (issue 12)\n")
    cmd = " ".join(["experiments/patch_assembly/overhead.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} .venv/bin/python {cmd}`\n")
    print(f"nproc {os.cpu_count()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average (1/5/15 min) at start {start_load}\n")

    configs = []
    for i, n in enumerate(args.sizes):
        if i > 0:
            cfg, overrides = _compose(n, args.pad_width)
        torch.manual_seed(args.seed)
        task = instantiate(cfg.model)  # DiffusionTask, as train.py builds it
        if i == 0:
            print(f"Config: `{' '.join(overrides)}`; network `{dict(cfg.model.net)}`, "
                  f"{sum(p.numel() for p in task.denoiser.parameters()) / 1e3:.1f} k parameters; training patch sizes "
                  f"{list(cfg.model.patch.patch_sizes)}, inference default "
                  f"{task.checkpoint_description().inference_patch_size}; pad {pad}; sigma {args.sigma}\n")
        desc = task.checkpoint_description()
        denoiser = task.ema_denoiser.eval().requires_grad_(False)
        loaded = DiffusionPrior(  # what load_diffusion_prior returns for this task's checkpoint
            denoiser, desc.image_channels, desc.positional_convention, desc.data_range, desc.model_range,
            desc.inference_patch_size, desc.sigma_range, desc,
        )
        conv = desc.positional_convention
        r = conv.padded_size
        for p in patch_sizes:
            prior = loaded.whole_image(p).eval()
            k = prior.patches_per_side
            for b in args.batch:
                g = torch.Generator().manual_seed(args.seed + 1000 * n + b)
                images = torch.rand(b, 1, n, n, generator=g) * 2 - 1
                canvas = prior.encode(images) + args.sigma * torch.randn(b, 1, r, r, generator=g)
                gens = [torch.Generator().manual_seed(args.seed * 7919 + i) for i in range(b)]
                pos_canvas = canvas_positional_channels(conv, canvas.dtype).expand(b, -1, -1, -1)
                sigma_b = torch.full((b,), args.sigma)
                captured = {}

                def hook(module, hargs, hkwargs, captured=captured):
                    captured["args"] = tuple(t.clone() for t in hargs)
                    captured["pos"] = hkwargs["pos"].clone()

                handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
                with torch.no_grad():
                    prior.denoise(canvas, args.sigma, generator=gens)
                handle.remove()
                patches, sig_k = captured["args"]
                pos_k = captured["pos"]
                assert patches.shape == (b * k * k, 1, p, p), patches.shape

                bare = PatchAssembledPrior(  # (a) with a network that returns its input: the assembly alone
                    _NoNetwork(), conv, p, data_range=prior.data_range, image_channels=prior.image_channels,
                    sigma_range=prior.sigma_range, pad_value=prior.pad_value,
                )
                fns = {
                    "a": lambda prior=prior, x=canvas, gens=gens: prior.denoise(x, args.sigma, generator=gens),
                    "b": lambda canvas=canvas, sigma_b=sigma_b, pos=pos_canvas: denoiser(canvas, sigma_b, pos=pos),
                    "c": lambda x=patches, s=sig_k, pos=pos_k: denoiser(x, s, pos=pos),
                    "d": lambda prior=bare, x=canvas, gens=gens: prior.denoise(x, args.sigma, generator=gens),
                }
                with torch.no_grad():
                    for fn in fns.values():  # warm-up
                        fn()
                    slowest = max(_time(fn, 1, clock) for fn in fns.values())
                calls = max(args.min_calls, math.ceil(args.min_time_ms / max(slowest, 1e-3)))
                configs.append({
                    "n": n, "r": r, "p": p, "k": k, "b": b, "calls": calls, "fns": fns,
                    "ms": {kind: [] for kind in fns}, "ab": [], "ac": [], "diff": [], "dc": [],
                })
        del task

    kinds = list("abcd")
    with torch.no_grad():
        for rnd in range(args.rounds):
            order = configs[rnd % len(configs):] + configs[: rnd % len(configs)]
            for j, c in enumerate(order):
                shift = (rnd + j) % 3
                ms = _time_interleaved(c["fns"], kinds[shift:] + kinds[:shift], c["calls"], clock)
                for kind, v in ms.items():
                    c["ms"][kind].append(v)
                c["ab"].append(ms["a"] / ms["b"])
                c["ac"].append(ms["a"] / ms["c"] - 1.0)
                c["diff"].append(ms["a"] - ms["c"])
                c["dc"].append(ms["d"] / ms["c"])

    med = statistics.median
    clock_name = {"cpu": "process CPU time", "wall": "wall-clock time"}[args.clock]
    print(f"Clock: {clock_name} (--clock {args.clock}). {args.rounds} rounds; in a round each configuration runs "
          f"`calls` x (a, b, c, d) in rotated order, every call timed on its own "
          f"(`calls` x each >= {args.min_time_ms:g} ms, "
          f"calls >= {args.min_calls}); "
          "medians over rounds (ratio, a-c, overhead, d/c: medians of the per-round values; "
          "range: min..max over rounds).\n")
    print("| image N | canvas R | patch P | patches/image | B | calls | (a) assembled ms | (b) whole canvas ms "
          "| (c) patch batch ms | (d) assembly only ms | ratio a/b | a-c ms | overhead (a-c)/c | overhead range "
          "| d/c |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in configs:
        ov = [100 * v for v in c["ac"]]
        c["overhead"] = med(ov)
        c["worst"] = max(c["overhead"], 100 * med(c["dc"]))
        print(f"| {c['n']} | {c['r']} | {c['p']} | {c['k']}x{c['k']}={c['k'] ** 2} | {c['b']} | {c['calls']} "
              f"| {med(c['ms']['a']):.2f} | {med(c['ms']['b']):.2f} | {med(c['ms']['c']):.2f} "
              f"| {med(c['ms']['d']):.3f} "
              f"| {med(c['ab']):.3f} | {med(c['diff']):+.2f} | {c['overhead']:+.1f} % "
              f"| {min(ov):+.1f}..{max(ov):+.1f} % | {100 * med(c['dc']):.1f} % |")
    print()
    for c in configs:  # pixel bookkeeping: how many network input pixels (a) feeds vs (b)
        c["pix_ratio"] = c["k"] ** 2 * c["p"] ** 2 / c["r"] ** 2
    pix = sorted({(c["n"], c["r"], c["p"], c["k"], round(c["pix_ratio"], 3)) for c in configs})
    print("Network input pixels of (a)/(c) relative to (b) (n^2 P^2 / R^2): "
          + ", ".join(f"N={n} P={p}: {pr:g}" for n, _, p, _, pr in pix) + "\n")

    over = [c for c in configs if c["worst"] > args.profile_threshold]
    if over and not args.no_profile:
        worst = max(over, key=lambda c: c["worst"])
        reps = max(20, worst["calls"] * 5)
        prof = cProfile.Profile()
        with torch.no_grad():
            prof.enable()
            for _ in range(reps):
                worst["fns"]["a"]()
            prof.disable()
        stats = pstats.Stats(prof)
        print(f"## cProfile of (a), N={worst['n']} P={worst['p']} B={worst['b']} (median overhead "
              f"{worst['overhead']:+.1f} %, d/c {100 * med(worst['dc']):.1f} %), {reps} calls; ms per call "
              "(profiler overhead inflates Python-level "
              "entries)\n")
        parents = {"forward", "_assembled_centre", "_denoise"}
        rows = []
        for func, (_, nc, tt, ct, callers) in stats.stats.items():
            for caller, vals in callers.items():
                if caller[0].endswith("patch_denoiser.py") and caller[2] in parents:
                    name = func[2] if func[0] == "~" else f"{Path(func[0]).name}:{func[2]}"
                    rows.append((caller[2], name, vals[0] / reps, vals[3] * 1e3 / reps))
        own = {f[2]: v for f, v in stats.stats.items() if f[0].endswith("patch_denoiser.py")}
        total, net = own["forward"][3], own["_denoise"][3]
        self_t = {name: v[2] for name, v in own.items()}
        print(f"PatchAssembledPrior.forward: {total * 1e3 / reps:.3f} ms per call in total, of which the network call "
              f"(_denoise) {net * 1e3 / reps:.3f} ms and the assembly {(total - net) * 1e3 / reps:.3f} ms "
              f"({100 * (total - net) / max(net, 1e-12):.1f} % of the network under the profiler).\n")
        print("| called from | callee | calls per (a) | ms per (a) (cumulative) |")
        print("|---|---|---:|---:|")
        for parent, name, ncalls, ms in sorted(rows, key=lambda r: -r[3]):
            if ms >= 0.002:
                print(f"| {parent} | {name} | {ncalls:g} | {ms:.3f} |")
        for parent in sorted(parents):
            if parent in self_t:
                print(f"| {parent} | (own Python lines) | 1 | {self_t[parent] * 1e3 / reps:.3f} |")
        print()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
        lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
        start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
        print("Top 12 by own time:\n\n```\n" + "\n".join(lines[start:]) + "\n```\n")
    elif over:
        print(f"{len(over)} configuration(s) above {args.profile_threshold:g} %: profiling skipped (--no-profile).\n")
    else:
        print(f"No configuration above {args.profile_threshold:g} % ((a-c)/c or d/c): no cProfile run.\n")

    print(f"Load average at end {_loadavg()}; wall {time.perf_counter() - t_start:.1f} s, "
          f"CPU {time.process_time() - cpu_start:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
