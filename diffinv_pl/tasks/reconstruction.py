"""ReconstructionTask: the LightningModule that evaluates any solver with any prior on a dataset, on 1 or N ranks,
resumably.

    trainer = L.Trainer(use_distributed_sampler=False, inference_mode=False, logger=CSVLogger(...))
    trainer.test(ReconstructionTask(solver=..., prior=..., operator=..., metrics=..., output_dir=...),
                 datamodule=EvaluationDataModule(dataset, batch_size=4))

Per sample (key k), every random choice comes from generators seeded by (seed, k, run): operator parameters (masks,
motion kernels) from ``key_generator(seed, k + "/operator")``, measurement noise from ``k + "/measurement"``, and the
solver's initial state, its noise and the prior's randomness (patch shifts) from ``key_generator(seed, k, run)``,
passed to the solver as one generator per sample. A sample therefore gets the same reconstruction on any number of
ranks, in any batch and after a resume: bitwise for classical solvers and for network priors with
``per_sample_calls``, otherwise up to the floating-point summation order of batched network calls.

Images arrive in [0, 1]; they are mapped to the operator's ``input_range`` (one affine transform) for measuring and
solving, and the reconstruction is mapped back and clipped to [0, 1] for metrics and PNGs.

Logged through Lightning (any logger: W&B, CSV, TensorBoard): ``psnr``/``ssim``/``lpips`` of the posterior mean,
per batch (``<name>_step``: the batch mean) and per epoch (``<name>_epoch``: the torchmetrics ``MeanMetric`` of
:class:`ImageMetrics`, synchronised across ranks, over the samples solved in this run), and at the end
``results/<metric>``: the aggregate over all rows, resumed ones included (rank 0). W&B loggers also get the
per-sample table and a few images. Every rank takes part in the epoch-end collectives, also a rank whose samples
were all finished by an earlier run.

Outputs under ``output_dir`` (every file written atomically):
    config.json                   the resolved task settings (a rerun with different settings is refused)
    samples/<key>/recon.png|npy   posterior mean over runs; std.png|npy when num_runs > 1; target.png; measurement.png
    rows/<key>.json               per-sample metrics (posterior mean, mean over runs, best of N) and cost
    results.json, results.md      aggregate: mean and 95% interval per metric, FID, config, package versions
A sample whose row exists is finished: a rerun skips it (resume after a kill), and nothing finished is recomputed.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffinv_pl.data.distributed import rank_indices
from diffinv_pl.data.evaluation import PLACEHOLDER_KEY
from diffinv_pl.errors import UserError
from diffinv_pl.metrics.fid_stats import load_image
from diffinv_pl.metrics.image import ImageMetrics
from diffinv_pl.operators.base import ForwardOperator
from diffinv_pl.priors.base import Prior
from diffinv_pl.priors.network import as_prior
from diffinv_pl.solvers.base import InverseProblem, Solver, check_solver_setup
from diffinv_pl.utils.io import atomic_write_text, check_writable, save_npy, save_png
from diffinv_pl.utils.locks import sample_lock, sample_locked_elsewhere
from diffinv_pl.utils.ranges import UNIT, convert_range
from diffinv_pl.utils.seeding import key_generator
from diffinv_pl.utils.stats import mean_ci95

log = logging.getLogger(__name__)
# epoch values are synchronised by torchmetrics, and the aggregate (results/*) is computed on rank 0 from every
# rank's rows: Lightning's advice to add sync_dist does not apply to them
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self.log\('(results/|(psnr|ssim|lpips)_epoch')", category=UserWarning
)

COST_KEYS = ("denoiser_calls", "operator_forward_calls", "operator_adjoint_calls", "operator_gram_calls", "wall_time_s")


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


class ReconstructionTask(L.LightningModule):
    """Evaluate ``solver`` with ``prior`` on the test dataloader's samples measured through ``operator``; see the
    module docstring.

    Args:
        solver: a solver of the contract (:mod:`diffinv_pl.solvers.base`), hyperparameters bound
            (``functools.partial``); it draws its own initial state from the per-sample generators.
        operator: forward operator (random parameters are drawn per sample key).
        metrics: an :class:`ImageMetrics` (PSNR/SSIM/LPIPS per image, FID from the saved files at the end; metrics
            switched off are reported "off").
        output_dir: where samples, rows and results go.
        prior: the solver's :class:`~diffinv_pl.priors.base.Prior` (a bare ``D(x, sigma)`` module is wrapped), or
            None for classical solvers.
        sigma_y: measurement noise level, in the operator's input range units.
        num_runs: posterior samples per measurement.
        seed: seed of every per-sample generator.
        overwrite: discard the rows of an earlier run with different settings.
        settings: what decides the results (a dict or its JSON text; evaluate.py passes the resolved config); a rerun
            into the same output directory must have the same settings.
        solver_progress: show a per-step progress bar of the solver (rank 0), beside Lightning's batch progress bar.
    """

    def __init__(
        self,
        solver: Solver,
        operator: ForwardOperator,
        metrics: ImageMetrics,
        output_dir: str | Path,
        prior: Prior | nn.Module | None = None,
        sigma_y: float = 0.05,
        num_runs: int = 1,
        seed: int = 0,
        overwrite: bool = False,
        settings: dict[str, Any] | str | None = None,
        solver_progress: bool = True,
    ) -> None:
        super().__init__()
        if num_runs < 1 or not (math.isfinite(sigma_y) and sigma_y >= 0):
            raise UserError(f"need task.num_runs >= 1 and a finite task.sigma_y >= 0; got {num_runs}, {sigma_y}")
        prior = as_prior(prior) if prior is not None else None
        check_solver_setup(solver, prior, operator)
        prior_range, op_range = getattr(prior, "data_range", None), getattr(operator, "input_range", None)
        if prior_range is not None and op_range is not None and tuple(prior_range) != tuple(op_range):
            raise UserError(
                f"the prior works on images in {tuple(prior_range)} but the operator expects {tuple(op_range)}: set "
                f"prior.data_range={list(op_range)} (the prior is then range-adapted) or the operator's input_range"
            )
        if prior is not None:
            try:
                prior.check_data_shape(tuple(operator.in_shape))
            except ValueError as err:
                raise UserError(str(err)) from err
        if isinstance(prior, nn.Module):
            # the prior is fixed during evaluation: eval mode, and no parameter gradients (solvers such as DPS only
            # need gradients with respect to the state; weight gradients would double the backward cost)
            prior.eval().requires_grad_(False)
        self.solver, self.operator, self.metrics, self.prior = solver, operator, metrics, prior
        self.sigma_y, self.num_runs, self.seed = float(sigma_y), num_runs, seed
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.solver_progress = solver_progress
        self.settings = json.loads(settings) if isinstance(settings, str) else dict(settings or {})
        self.settings.update(sigma_y=sigma_y, num_runs=num_runs, seed=seed)
        self._check_previous_results()
        self.summary: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------- set-up checks
    def _check_previous_results(self) -> None:
        """Refuse (read-only) an output directory holding finished rows of different settings, unless told to
        overwrite; a directory whose earlier run finished no sample is reused freely."""
        config = self.output_dir / "config.json"
        if self.overwrite or not config.exists() or not any((self.output_dir / "rows").glob("*.json")):
            return
        previous = json.loads(config.read_text())
        if previous != json.loads(json.dumps(self.settings, default=str)):
            raise UserError(
                f"{self.output_dir} holds results of a different configuration (see {config}); use a new "
                "paths.output_dir, or task.overwrite=true to discard them"
            )

    def _prepare_output_dir(self) -> None:
        """After every check passed: probe that the directory is writable, discard old rows when overwriting (rank 0),
        write config.json."""
        check_writable(self.output_dir)
        if self.global_rank == 0:
            if self.overwrite:
                for row in (self.output_dir / "rows").glob("*.json"):
                    row.unlink()
            atomic_write_text(self.output_dir / "config.json", json.dumps(self.settings, indent=2, sort_keys=True, default=str))
        self.trainer.strategy.barrier()

    def _dataset(self) -> Any:
        """The whole evaluation dataset (``datamodule.dataset``), or None when the datamodule does not expose it."""
        return getattr(getattr(self.trainer, "datamodule", None), "dataset", None)

    def on_test_start(self) -> None:
        """Every set-up check, then the output directory; nothing is written before all checks pass."""
        trainer = self.trainer
        if trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise UserError(
                "evaluation needs trainer.use_distributed_sampler=false: Lightning's DistributedSampler pads ranks with "
                "duplicate samples; EvaluationDataModule gives each rank its exact share instead"
            )
        if torch.is_inference_mode_enabled():
            raise UserError("solvers need autograd: build the Trainer with inference_mode=False (trainer.inference_mode=false)")
        dataset = self._dataset()
        if dataset is not None and len(dataset):
            self._check_image_shape(dataset[0]["image"])
        self._prepare_output_dir()

    def _check_image_shape(self, image: Tensor) -> None:
        if tuple(image.shape[-len(self.operator.in_shape) :]) != tuple(self.operator.in_shape):
            raise UserError(
                f"dataset images have shape {tuple(image.shape)} but the operator expects {tuple(self.operator.in_shape)}; "
                "set the data image_size/mode or operator.channels/image_size to match"
            )

    # ------------------------------------------------------------------------------------------------------ running
    def _range(self) -> tuple[float, float]:
        return tuple(self.operator.input_range) if self.operator.input_range is not None else UNIT

    @contextmanager
    def _step_bar(self, keys: list[str], run: int) -> Iterator[Callable[[dict[str, Any]], None] | None]:
        """A solver-step progress bar (rank 0, when enabled) fed by the solver's callback."""
        if not self.solver_progress or self.global_rank != 0:
            yield None
            return
        # one callback per level for solvers configured by num_levels (PaDIS, DAPS): the bar shows its total
        total = getattr(self.solver, "keywords", {}).get("num_levels")
        with tqdm(desc=f"solver {keys[0]}{'...' if len(keys) > 1 else ''} run {run}", unit="step", total=total,
                  leave=False) as bar:
            yield lambda info: bar.update(1)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Measure, solve ``num_runs`` times, score, write and log the batch's samples that are not finished and not
        being computed by another process (one lock per sample, held until its row is written)."""
        with ExitStack() as locks:
            keys, todo = [], []
            for i, key in enumerate(batch["key"]):
                if key == PLACEHOLDER_KEY or self._row(key).exists():
                    continue  # a rank without work, or a sample finished by an earlier run
                if not locks.enter_context(sample_lock(self.output_dir / "locks" / f"{_safe_key(key)}.lock")):
                    log.info("sample %s is being computed by another process; skipped", key)
                    continue
                if not self._row(key).exists():  # finished by the other process while we waited for the lock
                    keys.append(key)
                    todo.append(i)
            if not keys:
                return
            target = batch["image"][todo].to(self.device)
            self._check_image_shape(target)
            mean, std, y, scores_mean, scores_runs, cost = self._solve(keys, target)
            for b, key in enumerate(keys):
                self._write_sample(key, target[b], mean[b], std[b], y[b], scores_mean, scores_runs, b, cost)
        for name, values in scores_mean.items():
            self.metrics.means[name].update(values)
            self.log(f"{name}_step", values.mean(), on_step=True, on_epoch=False, batch_size=len(keys))

    def _row(self, key: str) -> Path:
        return self.output_dir / "rows" / f"{_safe_key(key)}.json"

    @torch.no_grad()
    def _solve(self, keys: list[str], target: Tensor):
        lo_hi = self._range()
        x = convert_range(target, UNIT, lo_hi)
        if hasattr(self.operator, "sample_params"):
            params = torch.cat([self.operator.sample_params(1, key_generator(self.seed, f"{k}/operator")) for k in keys])
            self.operator.set_params(params.to(self.device))
        y = self.operator.measure(x, self.sigma_y, [key_generator(self.seed, f"{k}/measurement") for k in keys])
        problem = InverseProblem(y, self.operator, self.sigma_y)
        runs, costs = [], []
        for run in range(self.num_runs):
            start = time.perf_counter()
            generators = [key_generator(self.seed, k, run) for k in keys]
            with torch.enable_grad(), self._step_bar(keys, run) as bar:
                result = self.solver(problem, self.prior, generator=generators, callback=bar)
            runs.append(convert_range(result.samples.detach(), lo_hi, UNIT).clamp(0, 1))
            costs.append({**result.cost.as_dict(), "wall_time_s": time.perf_counter() - start})
        stack = torch.stack(runs)  # (R, B, C, H, W)
        mean, std = stack.mean(0), stack.std(0, unbiased=False)
        scores_mean = self.metrics.per_image(mean, target)
        scores_runs = [scores_mean] if self.num_runs == 1 else [self.metrics.per_image(r, target) for r in runs]
        # a batched solver call's cost is shared equally by its samples
        cost = {k: sum(c[k] for c in costs) / len(keys) for k in COST_KEYS}
        return mean, std, y, scores_mean, scores_runs, cost

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

    def on_test_epoch_end(self) -> None:
        """After every rank has finished: FID over all saved samples (each rank loads its index share, synced), then
        on rank 0 the aggregate over all rows, results files, ``results/*`` metrics and the W&B table."""
        self.trainer.strategy.barrier()
        busy = self._samples_busy_elsewhere()
        for name, metric in self.metrics.means.items():  # every rank computes: torchmetrics syncs the states
            if metric.update_called or self.trainer.world_size > 1:
                with warnings.catch_warnings():  # a rank without samples computes (and syncs) an empty mean
                    warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method")
                    value = metric.compute()
                self.log(f"{name}_epoch", value, batch_size=1)
            metric.reset()
        if busy:  # another process into the same directory is still computing some samples: it aggregates
            if self.global_rank == 0:
                print(f"{len(busy)} sample(s) (e.g. {busy[0]}) are being computed by another process writing to "
                      f"{self.output_dir}; the process that finishes last writes results.json")
            return
        fid = self._fid() if self.metrics.enabled()["fid"] else None
        if self.global_rank != 0:
            return
        self.summary = self.aggregate(fid)
        for k, v in self.summary.items():
            if isinstance(v, (int, float)) and not k.endswith("_ci95"):
                self.log(f"results/{k}", float(v), rank_zero_only=True)
        self._log_table_and_images()

    def _samples_busy_elsewhere(self) -> list[str]:
        """Keys without a row whose lock another process holds (same on every rank: decided on rank 0)."""
        dataset = self._dataset()
        busy = []
        if self.global_rank == 0 and dataset is not None:
            for key in dataset.keys:
                if not self._row(key).exists() and sample_locked_elsewhere(self.output_dir / "locks" / f"{_safe_key(key)}.lock"):
                    busy.append(key)
        return self.trainer.strategy.broadcast(busy, src=0)

    def _rows(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted((self.output_dir / "rows").glob("*.json"))]

    def aggregate(self, fid: float | None = None) -> dict[str, Any]:
        """Mean and 95% interval of every metric over all finished samples; written to results.json / results.md."""
        rows = self._rows()
        dataset = self._dataset()
        if dataset is not None and len(rows) != len(dataset):
            raise RuntimeError(f"{len(rows)} of {len(dataset)} samples finished; rerun to complete the evaluation")
        if not rows:
            raise RuntimeError(f"no finished samples in {self.output_dir / 'rows'}; nothing to aggregate")
        numeric = [k for k in rows[0] if k != "key"]
        summary: dict[str, Any] = {"num_samples": len(rows)}
        for k in numeric:
            values = [float(r[k]) for r in rows if not math.isnan(float(r[k]))]
            if values:
                summary[k], summary[f"{k}_ci95"] = mean_ci95(values)
        if fid is not None:
            summary["fid"] = fid
        summary["metrics"] = self.metrics.protocol()
        versions = {p: metadata.version(p) for p in ("torch", "lightning", "torchmetrics", "odl", "astra-toolbox")}
        result = {"summary": summary, "config": self.settings, "versions": {**versions, "python": platform.python_version()}}
        atomic_write_text(self.output_dir / "results.json", json.dumps(result, indent=2, default=str))
        lines = ["| metric | mean | 95% CI |", "|---|---|---|"]
        lines += [f"| {k} | {summary[k]:.4f} | ± {summary[k + '_ci95']:.4f} |" for k in numeric if k in summary]
        if fid is not None:
            lines.append(f"| fid | {fid:.4f} | ({len(rows)} images) |")
        off = [f"{m}: {v}" for m, v in summary["metrics"].items() if v == "off"]
        text = f"Reconstruction results, {len(rows)} samples, {self.num_runs} run(s) each.\n\n" + "\n".join(lines) + "\n"
        if off:
            text += "\nSwitched off: " + ", ".join(off) + "\n"
        atomic_write_text(self.output_dir / "results.md", text)
        print(text)
        return summary

    def _fid(self, chunk: int = 32) -> float:
        """FID of all saved reconstructions against all targets (or the metric's reference statistics). Each rank
        loads its index share of the dataset's samples from the saved files, so resumed and multi-rank runs are
        covered; ``compute()`` synchronises the feature statistics across ranks."""
        channels = self.operator.in_shape[0]
        dataset = self._dataset()
        keys = list(dataset.keys) if dataset is not None else [r["key"] for r in self._rows()]
        mine = [keys[i] for i in rank_indices(len(keys), self.global_rank, self.trainer.world_size)]

        def load(key: str, name: str) -> Tensor:
            folder = self.output_dir / "samples" / _safe_key(key)
            if (folder / f"{name}.npy").exists():
                return torch.from_numpy(np.load(folder / f"{name}.npy"))
            return load_image(folder / f"{name}.png", channels=channels)

        self.metrics.fid_metric.reset()
        for start in range(0, len(mine), chunk):
            part = mine[start : start + chunk]
            recon = torch.stack([load(k, "recon") for k in part]).to(self.device)
            target = torch.stack([load(k, "target") for k in part]).to(self.device)
            self.metrics.update_fid(recon, target)
        return float(self.metrics.fid_metric.compute())

    def _log_table_and_images(self, max_images: int = 16) -> None:
        """Send the per-sample table and a few (target | reconstruction | measurement) images to W&B loggers."""
        from lightning.pytorch.loggers import WandbLogger

        rows = self._rows()
        for logger in self.loggers:
            if not isinstance(logger, WandbLogger) or not rows:
                continue
            columns = list(rows[0])
            logger.log_table(key="samples", columns=columns, data=[[r[c] for c in columns] for r in rows])
            for kind in ("target", "recon", "measurement"):
                paths = [str(self.output_dir / "samples" / _safe_key(r["key"]) / f"{kind}.png") for r in rows[:max_images]]
                logger.log_image(key=f"images/{kind}", images=paths, caption=[r["key"] for r in rows[:max_images]])
