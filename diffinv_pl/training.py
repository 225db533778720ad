"""Training driver behind ``python train.py experiment=<name>``: datamodule + Lightning task + Trainer from config.

Config contract (conf/train.yaml): ``data`` instantiates a LightningDataModule, ``model`` a LightningModule (with its
nested ``net``), ``trainer`` a ``lightning.pytorch.Trainer``, ``logger`` a mapping of loggers (with a logger, the
learning rate is logged every step); ``seed`` seeds every RNG (workers included) and ``ckpt_path`` resumes a run.
Checkpoints go to ``<paths.output_dir>/checkpoints`` (``last.ckpt`` always kept; one per epoch, or one every
``checkpoint_every_n_steps`` optimizer steps). A directory that already holds checkpoints is refused unless the run
resumes (``ckpt_path``) or ``overwrite=true``, so a finished run is never overwritten by accident.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from diffinv_pl.utils.loggers import instantiate_loggers

log = logging.getLogger(__name__)


def run_training(cfg: DictConfig) -> dict[str, float]:
    """Fit ``cfg.model`` on ``cfg.data``; returns the trainer's final callback metrics as floats."""
    missing = [key for key in ("data", "model") if key not in cfg or cfg[key] is None]
    if missing:
        raise ValueError(
            f"no {' and no '.join(missing)} configured: choose a training setup with experiment=<name> "
            "(e.g. experiment=gmm_denoiser) or data=<name> model=<name>"
        )
    checkpoint_dir = Path(cfg.paths.output_dir) / "checkpoints"
    previous = sorted(checkpoint_dir.glob("*.ckpt")) if checkpoint_dir.is_dir() else []
    if previous and cfg.get("ckpt_path") is None and not cfg.get("overwrite", False):
        raise FileExistsError(
            f"{str(checkpoint_dir)!r} already holds checkpoints of a run ({', '.join(p.name for p in previous[:3])}"
            f"{', ...' if len(previous) > 3 else ''}): resume it with ckpt_path={checkpoint_dir / 'last.ckpt'}, choose "
            "another paths.output_dir, or pass overwrite=true to replace them"
        )
    L.seed_everything(cfg.seed, workers=True)
    data = instantiate(cfg.data)
    model = instantiate(cfg.model)
    loggers = instantiate_loggers(cfg.get("logger"))
    checkpoints = ModelCheckpoint(
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
