"""Training driver behind ``python train.py experiment=<name>``: datamodule + Lightning task + Trainer from config.

Config contract (conf/train.yaml): ``data`` instantiates a LightningDataModule, ``model`` a LightningModule (with its
nested ``net``), ``trainer`` a ``lightning.pytorch.Trainer``, ``logger`` a mapping of loggers (with a logger, the
learning rate is logged every step); ``seed`` seeds every RNG (workers included) and ``ckpt_path`` resumes a run.
Checkpoints go to ``<paths.output_dir>/checkpoints`` (``last.ckpt`` always kept; one per epoch, or one every
``checkpoint_every_n_steps`` optimizer steps). A directory that already holds checkpoints is refused unless the run
resumes (``ckpt_path``) or ``overwrite=true``, so a finished run is never overwritten by accident. ``last.ckpt``
holds the final step of the run, also when the run ends between two ``checkpoint_every_n_steps`` checkpoints.

Before anything is built or written, :func:`run_training` refuses (with a :class:`~diffinv_pl.errors.UserError` naming
the fix) a missing data/model config, a trainer asking for a GPU this machine lacks, a ``ckpt_path`` that is not a
training checkpoint of this project, an output directory that already holds checkpoints, and one it cannot write to.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from diffinv_pl.errors import UserError, UserFileError
from diffinv_pl.utils.devices import check_trainer_devices
from diffinv_pl.utils.io import check_writable
from diffinv_pl.utils.loggers import instantiate_loggers

log = logging.getLogger(__name__)


class ExistingRunError(UserError, FileExistsError):
    """The output directory already holds the checkpoints of a run (and the run does not resume it)."""


class LastStepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint(save_last=True)`` whose ``last.ckpt`` holds the final step of the run.

    Lightning writes ``last.ckpt`` only next to a periodic checkpoint, so with ``every_n_train_steps=N`` a run whose
    step count is not a multiple of N would keep the state N - 1 steps (at most) before its end. This callback saves
    ``last.ckpt`` once more when training ends unless that step is already saved (the same check Lightning's own
    saves make; all ranks call it, rank 0 writes)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def check_resume_checkpoint(ckpt_path: Any) -> None:
    """Refuse a ``ckpt_path`` that is missing (:class:`UserFileError`) or not a resumable training checkpoint of this
    project (:class:`UserError`): not loadable with ``torch.load(weights_only=True)``, or without ``state_dict``,
    ``diffinv_pl`` (the prior description every DiffusionTask checkpoint holds) or the optimizer and loop states.
    Remote URLs (``s3://...``) are left to Lightning."""
    if ckpt_path is None or "://" in str(ckpt_path):
        return
    path = Path(str(ckpt_path)).expanduser()
    fix = "pass the checkpoint of an earlier run of train.py, e.g. ckpt_path=<run>/checkpoints/last.ckpt"
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise UserFileError(f"ckpt_path={path} {what}: {fix}")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives
        raise UserError(f"ckpt_path={path} is not a PyTorch checkpoint file: {fix}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure to read means: not a checkpoint
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise UserError(f"ckpt_path={path} is not a readable Lightning checkpoint ({reason}): {fix}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "diffinv_pl" not in checkpoint:
        raise UserError(
            f"ckpt_path={path} is not a training checkpoint of diffinv_pl (no 'state_dict' and 'diffinv_pl' "
            f"entries): {fix}"
        )
    if "optimizer_states" not in checkpoint or "loops" not in checkpoint:
        raise UserError(
            f"ckpt_path={path} holds weights only (no optimizer and loop states), so training cannot resume from "
            f"it: {fix}"
        )


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Fit ``cfg.model`` on ``cfg.data``; returns the trainer's final callback metrics as floats. A config with
    ``stages`` (experiment=ldm_custom) runs its stages instead (:mod:`diffinv_pl.latent_pipeline`)."""
    if cfg.get("stages") is not None:
        from diffinv_pl.latent_pipeline import run_stages

        return run_stages(cfg, run_training)
    missing = [key for key in ("data", "model") if key not in cfg or cfg[key] is None]
    if missing:
        raise UserError(
            f"no {' and no '.join(missing)} configured: choose a training setup with experiment=<name> "
            "(e.g. experiment=gmm_denoiser) or data=<name> model=<name>"
        )
    check_trainer_devices(cfg.get("trainer"))
    check_resume_checkpoint(cfg.get("ckpt_path"))
    output_dir = Path(cfg.paths.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    previous = sorted(checkpoint_dir.glob("*.ckpt")) if checkpoint_dir.is_dir() else []
    if previous and cfg.get("ckpt_path") is None and not cfg.get("overwrite", False):
        raise ExistingRunError(
            f"{str(checkpoint_dir)!r} already holds checkpoints of a run ({', '.join(p.name for p in previous[:3])}"
            f"{', ...' if len(previous) > 3 else ''}): resume it with ckpt_path={checkpoint_dir / 'last.ckpt'}, choose "
            "another paths.output_dir, or pass overwrite=true to replace them"
        )
    check_writable(output_dir)
    if checkpoint_dir.exists():  # otherwise created by the first checkpoint, inside the writable output_dir
        check_writable(checkpoint_dir, "checkpoint directory")
    L.seed_everything(cfg.seed, workers=True)
    data = instantiate(cfg.data)
    model = instantiate(cfg.model)
    loggers = instantiate_loggers(cfg.get("logger"))
    checkpoints = LastStepCheckpoint(
        dirpath=checkpoint_dir, save_last=True, every_n_train_steps=cfg.get("checkpoint_every_n_steps")
    )
    callbacks = [checkpoints] + ([LearningRateMonitor(logging_interval="step")] if loggers else [])
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(model, datamodule=data, ckpt_path=cfg.get("ckpt_path"))
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    log.info("final metrics: %s", metrics)
    return metrics
