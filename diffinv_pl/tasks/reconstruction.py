"""ReconstructionTask: evaluate any solver on a dataset, on 1 or N ranks, resumably.

Per sample (key k), every random choice comes from generators seeded by (seed, k, run): operator parameters (masks,
motion kernels) from ``key_generator(seed, k + "/operator")``, measurement noise from ``k + "/measurement"``, the
solver's initial state and noise from ``(seed, k, run)``. A sample therefore gets the same reconstruction on any number
of ranks, in any batch, and after a resume.

Images arrive in [0, 1]; they are mapped to the operator's ``input_range`` (one affine transform) for measuring and
solving, and the reconstruction is mapped back and clipped to [0, 1] for metrics and PNGs.

Outputs under ``output_dir`` (every file written atomically):
    config.json                   the resolved task settings (a rerun with different settings is refused)
    samples/<key>/recon.png|npy   posterior mean over runs; std.png|npy when num_runs > 1; target.png; measurement.png
    rows/<key>.json               per-sample metrics (posterior mean, mean over runs, best of N) and cost
    results.json, results.md      aggregate: mean and 95% interval per metric, config, package versions
A sample whose row exists is finished: a rerun skips it (resume after a kill), and nothing finished is recomputed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
import math
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from diffinv_pl.data.distributed import rank_indices
from diffinv_pl.diffusion.schedules import SamplingGrid
from diffinv_pl.metrics.fid_stats import load_image
from diffinv_pl.metrics.image import ImageMetrics
from diffinv_pl.operators.base import ForwardOperator
from diffinv_pl.solvers.base import InverseProblem, Solver
from diffinv_pl.utils.io import atomic_write_text, save_npy, save_png
from diffinv_pl.utils.ranges import UNIT, convert_range
from diffinv_pl.utils.seeding import key_generator
from diffinv_pl.utils.stats import mean_ci95



def _safe_key(key: str) -> str:
    return key.replace("/", "__")


def _visualise(y: Tensor) -> Tensor:
    """A measurement as a [0, 1] image: min-max scaled; non-image measurements become one gray row."""
    v = y.detach().float()
    if v.ndim == 1:
        v = v[None, None]
    elif v.ndim == 2:
        v = v[None]
    v = v - v.amin()
    return v / v.amax().clamp(min=1e-12)


class ReconstructionModule(L.LightningModule):
    """predict_step: measure, solve ``num_runs`` times, score and write every sample of the batch."""

    def __init__(self, task: ReconstructionTask) -> None:
        super().__init__()
        self.task = task
        self.operator = task.operator
        self.metrics = task.metrics

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.task.process_batch(batch, self.device)


class ReconstructionTask:
    """Evaluate ``solver`` with ``denoiser`` on ``dataset`` measured through ``operator``; see the module docstring.

    Args:
        solver: a solver of the contract, hyperparameters bound (``functools.partial``); a ``grid`` keyword gives the
            initial state N(0, init_std^2) at its first noise level, otherwise solvers start from zeros.
        operator: forward operator (random parameters are drawn per sample key).
        dataset: indexable dataset of ``{"key", "image"}`` samples in [0, 1] with a ``keys`` list.
        trainer: a Lightning Trainer (devices / num_nodes / strategy from ``conf/trainer``).
        denoiser: the prior's D(x, sigma), or None for classical solvers.
        sigma_y: measurement noise level, in the operator's input range units.
        num_runs: posterior samples per measurement.
        metrics: an :class:`ImageMetrics` (PSNR/SSIM/LPIPS per image; metrics switched off are reported "off").
        settings: what decides the results (a dict or its JSON text; evaluate.py passes the resolved config); a rerun
            into the same output directory must have the same settings.
        solver_progress: show a per-step progress bar of the solver (rank 0), beside Lightning's batch progress bar.
    """

    def __init__(
        self,
        solver: Solver,
        operator: ForwardOperator,
        dataset: Dataset,
        trainer: L.Trainer,
        metrics: ImageMetrics,
        output_dir: str | Path,
        denoiser: Any = None,
        sigma_y: float = 0.05,
        num_runs: int = 1,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        overwrite: bool = False,
        settings: dict[str, Any] | str | None = None,
        solver_progress: bool = True,
    ) -> None:
        if num_runs < 1 or batch_size < 1 or sigma_y < 0:
            raise ValueError(f"need num_runs >= 1, batch_size >= 1, sigma_y >= 0; got {num_runs}, {batch_size}, {sigma_y}")
        if not hasattr(dataset, "keys") or len(dataset) == 0:
            raise ValueError("the evaluation dataset is empty or has no `keys`; check data paths and settings")
        if len(set(dataset.keys)) != len(dataset.keys):
            raise ValueError("the evaluation dataset has duplicate sample keys; results would overwrite each other")
        prior_range, op_range = getattr(denoiser, "data_range", None), getattr(operator, "input_range", None)
        if prior_range is not None and op_range is not None and tuple(prior_range) != tuple(op_range):
            raise ValueError(
                f"the prior works on images in {tuple(prior_range)} but the operator expects {tuple(op_range)}: set "
                f"prior.data_range={list(op_range)} (the prior is then range-adapted) or the operator's input_range"
            )
        if isinstance(denoiser, torch.nn.Module):
            # the prior is fixed during evaluation: eval mode, and no parameter gradients (solvers such as DPS only
            # need gradients with respect to the state; weight gradients would double the backward cost)
            denoiser.eval().requires_grad_(False)
        self.solver, self.operator, self.dataset, self.trainer = solver, operator, dataset, trainer
        self.metrics, self.denoiser = metrics, denoiser
        self.sigma_y, self.num_runs, self.batch_size, self.num_workers, self.seed = sigma_y, num_runs, batch_size, num_workers, seed
        self.output_dir = Path(output_dir)
        self.solver_progress = solver_progress
        self.settings = json.loads(settings) if isinstance(settings, str) else dict(settings or {})
        self.settings.update(sigma_y=sigma_y, num_runs=num_runs, seed=seed, num_samples=len(dataset))
        self._check_output_dir(overwrite)
        self._check_shapes()

    # ------------------------------------------------------------------------------------------------- set-up checks
    def _check_output_dir(self, overwrite: bool) -> None:
        """Refuse an output directory holding results of different settings, unless told to overwrite."""
        config = self.output_dir / "config.json"
        if config.exists() and not overwrite:
            previous = json.loads(config.read_text())
            if previous != json.loads(json.dumps(self.settings, default=str)):
                raise ValueError(
                    f"{self.output_dir} holds results of a different configuration (see {config}); use a new "
                    "paths.output_dir, or task.overwrite=true to discard them"
                )
        if overwrite:
            for row in (self.output_dir / "rows").glob("*.json"):
                row.unlink()
        atomic_write_text(config, json.dumps(self.settings, indent=2, sort_keys=True, default=str))

    def _check_shapes(self) -> None:
        sample = self.dataset[0]["image"]
        if tuple(sample.shape) != tuple(self.operator.in_shape):
            raise ValueError(
                f"dataset images have shape {tuple(sample.shape)} but the operator expects {tuple(self.operator.in_shape)}; "
                "set the data image_size/mode or operator.channels/image_size to match"
            )

    # ------------------------------------------------------------------------------------------------------ running
    def finished_keys(self) -> set[str]:
        return {json.loads(p.read_text())["key"] for p in (self.output_dir / "rows").glob("*.json")}

    def dataloader(self, rank: int, world_size: int) -> DataLoader:
        """This rank's share of the not-yet-finished samples: each sample exactly once over all ranks, no padding."""
        done = self.finished_keys()
        mine = [i for i in rank_indices(len(self.dataset), rank, world_size) if self.dataset.keys[i] not in done]
        return DataLoader(Subset(self.dataset, mine), batch_size=self.batch_size, num_workers=self.num_workers)

    def _range(self) -> tuple[float, float]:
        return tuple(self.operator.input_range) if self.operator.input_range is not None else UNIT

    def _initial_state(self, shape: tuple[int, ...], keys: list[str], run: int, dtype: torch.dtype, device) -> Tensor:
        grid = getattr(self.solver, "keywords", {}).get("grid")
        if isinstance(grid, SamplingGrid):
            return grid.initial_noise(shape, [key_generator(self.seed, f"{k}/init", run) for k in keys], dtype).to(device)
        return torch.zeros(shape, dtype=dtype, device=device)

    @contextmanager
    def _step_bar(self, keys: list[str], run: int) -> Iterator[Callable[[dict[str, Any]], None] | None]:
        """A solver-step progress bar (rank 0, when enabled) fed by the solver's callback."""
        if not self.solver_progress or self.trainer.global_rank != 0:
            yield None
            return
        with tqdm(desc=f"solver {keys[0]}{'...' if len(keys) > 1 else ''} run {run}", unit="step", leave=False) as bar:
            yield lambda info: bar.update(1)

    @torch.no_grad()
    def process_batch(self, batch: dict[str, Any], device: torch.device) -> None:
        keys: list[str] = list(batch["key"])
        target = batch["image"].to(device)
        lo_hi = self._range()
        x = convert_range(target, UNIT, lo_hi)
        if hasattr(self.operator, "sample_params"):
            params = torch.cat([self.operator.sample_params(1, key_generator(self.seed, f"{k}/operator")) for k in keys])
            self.operator.set_params(params.to(device))
        y = self.operator.measure(x, self.sigma_y, [key_generator(self.seed, f"{k}/measurement") for k in keys])
        problem = InverseProblem(y, self.operator, self.sigma_y)
        runs, costs = [], []
        for run in range(self.num_runs):
            start = time.perf_counter()
            x_init = self._initial_state(tuple(x.shape), keys, run, x.dtype, device)
            generators = [key_generator(self.seed, k, run) for k in keys]
            with torch.enable_grad(), self._step_bar(keys, run) as bar:
                result = self.solver(problem, self.denoiser, x_init, generator=generators, callback=bar)
            runs.append(convert_range(result.samples.detach(), lo_hi, UNIT).clamp(0, 1))
            costs.append({**result.cost.as_dict(), "wall_time_s": time.perf_counter() - start})
        stack = torch.stack(runs)  # (R, B, C, H, W)
        mean, std = stack.mean(0), stack.std(0, unbiased=False)
        scores_mean = self.metrics.per_image(mean, target)
        scores_runs = [scores_mean] if self.num_runs == 1 else [self.metrics.per_image(r, target) for r in runs]
        # a batched solver call's cost is shared equally by its samples
        cost_keys = ("denoiser_calls", "operator_forward_calls", "operator_adjoint_calls", "wall_time_s")
        cost = {k: sum(c[k] for c in costs) / len(keys) for k in cost_keys}
        for b, key in enumerate(keys):
            self._write_sample(key, target[b], mean[b], std[b], y[b], scores_mean, scores_runs, b, cost)

    def _write_sample(self, key, target, mean, std, y, scores_mean, scores_runs, b, cost) -> None:
        folder = self.output_dir / "samples" / _safe_key(key)
        save_png(folder / "recon.png", mean)
        save_png(folder / "target.png", target)
        save_png(folder / "measurement.png", _visualise(y))
        if target.shape[0] == 1:  # float data (CT): keep the exact values too
            save_npy(folder / "recon.npy", mean)
            save_npy(folder / "target.npy", target)
        if self.num_runs > 1:
            save_png(folder / "std.png", std / std.amax().clamp(min=1e-12))
            save_npy(folder / "std.npy", std)
        row: dict[str, Any] = {"key": key}
        for name, values in scores_mean.items():
            per_run = [float(s[name][b]) for s in scores_runs]
            row[f"{name}"] = float(values[b])
            row[f"{name}_runs_mean"] = float(np.mean(per_run))
            best = min(per_run) if name == "lpips" else max(per_run)
            row[f"{name}_best_of_{self.num_runs}"] = best
        row.update(cost)
        row["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
        atomic_write_text(self.output_dir / "rows" / f"{_safe_key(key)}.json", json.dumps(row))

    def aggregate(self) -> dict[str, Any]:
        """Mean and 95% interval of every metric over all finished samples; written to results.json / results.md."""
        rows = [json.loads(p.read_text()) for p in sorted((self.output_dir / "rows").glob("*.json"))]
        if len(rows) != len(self.dataset):
            raise RuntimeError(f"{len(rows)} of {len(self.dataset)} samples finished; rerun to complete the evaluation")
        numeric = [k for k in rows[0] if k != "key"]
        summary: dict[str, Any] = {"num_samples": len(rows)}
        for k in numeric:
            values = [float(r[k]) for r in rows if not math.isnan(float(r[k]))]
            if values:
                summary[k], summary[f"{k}_ci95"] = mean_ci95(values)
        if self.metrics.enabled()["fid"]:
            summary["fid"] = self._fid(rows)
        summary["metrics"] = self.metrics.protocol()
        versions = {p: metadata.version(p) for p in ("torch", "lightning", "torchmetrics", "odl", "astra-toolbox")}
        result = {"summary": summary, "config": self.settings, "versions": {**versions, "python": platform.python_version()}}
        atomic_write_text(self.output_dir / "results.json", json.dumps(result, indent=2, default=str))
        lines = ["| metric | mean | 95% CI |", "|---|---|---|"]
        lines += [f"| {k} | {summary[k]:.4f} | ± {summary[k + '_ci95']:.4f} |" for k in numeric if k in summary]
        off = [f"{m}: {v}" for m, v in summary["metrics"].items() if v == "off"]
        text = f"Reconstruction results, {len(rows)} samples, {self.num_runs} run(s) each.\n\n" + "\n".join(lines) + "\n"
        if off:
            text += "\nSwitched off: " + ", ".join(off) + "\n"
        atomic_write_text(self.output_dir / "results.md", text)
        print(text)
        return summary

    def _fid(self, rows: list[dict[str, Any]], chunk: int = 32) -> float:
        """FID of all reconstructions against all targets (or the metric's reference statistics), from the saved
        files, so it covers resumed and multi-rank runs alike."""

        channels = self.operator.in_shape[0]

        def load(key: str, name: str) -> Tensor:
            folder = self.output_dir / "samples" / _safe_key(key)
            if (folder / f"{name}.npy").exists():
                return torch.from_numpy(np.load(folder / f"{name}.npy"))
            return load_image(folder / f"{name}.png", channels=channels)

        for start in range(0, len(rows), chunk):
            keys = [r["key"] for r in rows[start : start + chunk]]
            self.metrics.update_fid(torch.stack([load(k, "recon") for k in keys]), torch.stack([load(k, "target") for k in keys]))
        return float(self.metrics.fid_metric.compute())

    def log_to(self, loggers: list[Any], max_images: int = 16) -> None:
        """Send the per-sample table and a few (target | reconstruction | measurement) images to W&B loggers."""
        from lightning.pytorch.loggers import WandbLogger

        rows = [json.loads(p.read_text()) for p in sorted((self.output_dir / "rows").glob("*.json"))]
        for logger in loggers:
            if not isinstance(logger, WandbLogger) or not rows:
                continue
            columns = list(rows[0])
            logger.log_table(key="samples", columns=columns, data=[[r[c] for c in columns] for r in rows])
            for kind in ("target", "recon", "measurement"):
                paths = [str(self.output_dir / "samples" / _safe_key(r["key"]) / f"{kind}.png") for r in rows[:max_images]]
                logger.log_image(key=f"images/{kind}", images=paths, caption=[r["key"] for r in rows[:max_images]])

    def run(self) -> list[dict[str, Any]]:
        """Solve every unfinished sample across the trainer's ranks, then aggregate on rank 0."""
        if self.trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                "evaluation needs trainer.use_distributed_sampler=false: Lightning's DistributedSampler pads ranks with "
                "duplicate samples; each rank takes its own exact share instead"
            )
        self.trainer.predict(ReconstructionModule(self), datamodule=_UnfinishedSamples(self), return_predictions=False)
        self.trainer.strategy.barrier()
        if self.trainer.global_rank != 0:
            return []
        summary = self.aggregate()
        return [{"task": "reconstruction", **{k: v for k, v in summary.items() if isinstance(v, (int, float))}}]


class _UnfinishedSamples(L.LightningDataModule):
    """Builds the loader inside each rank (after DDP start-up), from that rank's index share."""

    def __init__(self, task: ReconstructionTask) -> None:
        super().__init__()
        self.task = task

    def predict_dataloader(self) -> DataLoader:
        return self.task.dataloader(self.trainer.global_rank, self.trainer.world_size)
