"""Refuse a Trainer config that asks for a GPU on a machine without one, before anything is built or written.

Lightning's own refusal ("No supported gpu backend found!") comes as a long traceback from inside Hydra's
instantiation of the Trainer and does not say which config to use instead; :func:`check_trainer_devices` names it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffinv_pl.errors import UserError

GPU_ONLY_STRATEGIES = ("deepspeed", "fsdp")  # Lightning runs these on CUDA devices only


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _missing_gpu_setting(trainer_cfg: Mapping[str, Any]) -> str | None:
    """The setting of ``trainer_cfg`` that asks for a GPU this machine lacks (``"trainer.accelerator=gpu"``, ...),
    or None."""
    cuda, mps = torch.cuda.is_available(), _mps_available()
    accelerator = str(trainer_cfg.get("accelerator") or "auto").lower()
    strategy = trainer_cfg.get("strategy") or "auto"
    strategy = strategy.lower() if isinstance(strategy, str) else type(strategy).__name__.lower()
    devices = trainer_cfg.get("devices", "auto")
    if (accelerator == "cuda" and not cuda) or (accelerator == "gpu" and not (cuda or mps)) or (
        accelerator == "mps" and not mps
    ):
        return f"trainer.accelerator={accelerator}"
    if not cuda and any(strategy.startswith(name) for name in GPU_ONLY_STRATEGIES):
        return f"trainer.strategy={strategy}"
    # with accelerator auto, a list of device indices (devices=[0,1] or "0,1") selects GPUs; CPUs are counted by an int
    indices = (isinstance(devices, Sequence) and not isinstance(devices, str)) or (isinstance(devices, str) and "," in devices)
    if accelerator == "auto" and indices and not (cuda or mps):
        return f"trainer.devices={devices}"
    return None


def check_trainer_devices(trainer_cfg: Mapping[str, Any] | None) -> None:
    """Raise a :class:`~diffinv_pl.errors.UserError` when ``trainer_cfg`` (the ``trainer`` node of a train or
    evaluate config, a mapping or DictConfig) asks for a GPU -- ``accelerator: gpu``/``cuda``, a GPU-only strategy
    (DeepSpeed, FSDP) or a list of device indices -- and this machine has none; the message names ``trainer=cpu``
    and ``trainer=ddp_sim``. Does nothing when a GPU is available or ``trainer_cfg`` is None."""
    if trainer_cfg is None:
        return
    setting = _missing_gpu_setting(trainer_cfg)
    if setting is None:
        return
    raise UserError(
        f"the trainer config asks for a GPU ({setting}) but this machine has none "
        "(torch.cuda.is_available() is False): use trainer=cpu (one CPU process) or trainer=ddp_sim "
        "(distributed training simulated with 2 CPU processes)"
    )
