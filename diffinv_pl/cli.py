"""Hydra entry points: ``python evaluate.py ...`` / ``python train.py ...`` (also ``diffinv-evaluate``/``diffinv-train``).

A :class:`~diffinv_pl.errors.UserError` is printed as one line naming the fix, exit status 2 (``HYDRA_FULL_ERROR=1``
shows the traceback).

The configs live in ``conf/`` at the repository root; an editable install (``pip install -e .``) is assumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from diffinv_pl.errors import report_user_errors

CONFIG_PATH = str(Path(__file__).resolve().parent.parent / "conf")


def _offline_defaults() -> None:
    """No pretrained weights or datasets are fetched at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _results_settings(cfg: DictConfig) -> str:
    """What decides the results (not devices, batching, logging or paths), as JSON text (so that Hydra does not
    instantiate its ``_target_``s)."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    for key in ("paths", "logger", "trainer", "hydra", "debug", "datamodule"):
        settings.pop(key, None)
    for key in ("output_dir", "overwrite", "settings", "solver_progress"):
        settings["task"].pop(key, None)
    return json.dumps(settings, sort_keys=True)


def run_evaluation(cfg: DictConfig) -> list[dict]:
    """Instantiate ``cfg.task`` and run it; returns the aggregate table (rank 0; empty on other ranks).

    A LightningModule task (``task=reconstruction``) runs as ``trainer.test(task, datamodule=cfg.datamodule)`` with
    the configured loggers attached to the Trainer; other tasks (the GMM benchmark) have a ``run()`` method and their
    table goes to every configured logger.
    """
    import lightning as L
    from hydra.utils import instantiate

    from diffinv_pl.utils.loggers import instantiate_loggers

    from diffinv_pl.errors import UserError
    from diffinv_pl.utils.devices import check_trainer_devices

    if "task" not in cfg or cfg.task is None:
        raise UserError("no evaluation task configured: choose one with task=<name> or experiment=<name>")
    check_trainer_devices(cfg.get("trainer"))
    overrides = {}
    if "settings" in cfg.task and cfg.task.settings is None:
        overrides["settings"] = _results_settings(cfg)
    task = instantiate(cfg.task, _convert_="all", **overrides)
    loggers = instantiate_loggers(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if isinstance(task, L.LightningModule):
        if cfg.get("datamodule") is None:
            raise UserError("a LightningModule evaluation task needs a `datamodule` config (task=reconstruction sets it)")
        datamodule = instantiate(cfg.datamodule, _convert_="all")
        trainer = instantiate(cfg.trainer, logger=loggers or False)
        results = trainer.test(task, datamodule=datamodule, verbose=False)
        if trainer.global_rank != 0 or not results:
            return []
        prefix = "results/"
        table = [{"task": "reconstruction", **{k[len(prefix) :]: v for k, v in results[0].items() if k.startswith(prefix)}}]
        return table
    table = task.run()
    for logger in loggers:
        for row in table:  # string fields name the row, numeric fields are its metrics
            prefix = "/".join(str(v) for v in row.values() if isinstance(v, str))
            logger.log_metrics({f"{prefix}/{k}": float(v) for k, v in row.items() if isinstance(v, (int, float))})
        logger.finalize("success")
    return table


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
@report_user_errors
def evaluate_main(cfg: DictConfig) -> None:
    _offline_defaults()
    if cfg.get("task") is not None and "command" in cfg.task:  # record how the results were produced
        from hydra.core.hydra_config import HydraConfig

        with open_dict(cfg):
            cfg.task.command = " ".join(["python evaluate.py", *HydraConfig.get().overrides.task])
    run_evaluation(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@report_user_errors
def train_main(cfg: DictConfig) -> None:
    _offline_defaults()
    from diffinv_pl.training import run_training

    run_training(cfg)
