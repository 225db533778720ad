"""Experiment loggers built from config."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger


def wandb_logged_in() -> bool:
    """True when a W&B API key is available (WANDB_API_KEY or an api.wandb.ai entry in ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(str(Path.home() / ".netrc")).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(offline: bool | str = "auto", save_dir: str = ".", **kwargs: Any) -> WandbLogger:
    """Lightning's WandbLogger; ``offline="auto"`` is online when logged in, offline otherwise.

    WANDB_MODE=offline/online/disabled in the environment always wins (CI sets offline).
    """
    if offline not in (True, False, "auto"):
        raise ValueError(f"logger.wandb.offline must be true, false or auto, got {offline!r}")
    mode = os.environ.get("WANDB_MODE")
    if mode in ("offline", "dryrun", "disabled"):
        offline = True
    elif mode == "online":
        offline = False
    elif offline == "auto":
        offline = not wandb_logged_in()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(offline=bool(offline), save_dir=save_dir, **kwargs)


def instantiate_loggers(cfg: Any) -> list[Logger]:
    """Every logger in the ``logger`` config group (a mapping name -> config), instantiated with Hydra."""
    from hydra.utils import instantiate

    if not cfg:
        return []
    return [instantiate(sub) for sub in cfg.values() if sub is not None and "_target_" in sub]
