"""Latent diffusion training helpers: the two-stage driver and the data module of pre-encoded latents.

Two-stage training from one config (the autoencoder, then the latent diffusion model on it):

``python train.py experiment=ldm_custom data.train.root=DIR`` runs, in ``<paths.output_dir>``:

1. stage ``autoencoder``: ``cfg.stages.autoencoder.model`` (an ``AutoencoderTask`` config) on ``cfg.data``, with
   ``cfg.stages.autoencoder.trainer`` merged into ``cfg.trainer``, written to ``<output_dir>/autoencoder``; skipped
   when ``<output_dir>/autoencoder/checkpoints/last.ckpt`` already exists (a finished or interrupted-and-kept stage);
2. stage ``ldm``: ``cfg.model`` (a latent ``DiffusionTask``) with ``model.autoencoder`` set to that checkpoint,
   written to ``<output_dir>/ldm``.

Each stage is an ordinary :func:`diffinv_pl.training.run_training` run (its own checkpoints, refusal of existing runs,
``ckpt_path`` resumes stage 2 only). The returned metrics are prefixed ``autoencoder/`` and ``ldm/``.

Pre-encoded latents (:class:`LatentDataModule`): the folder written by ``data_prep/encode_latents.py`` holds
``latents.json`` (the autoencoder's path and ``describe()``, image shape, count, file names) and ``latents_NNNNN.pt``
files ({"keys": [...], "latent": float32 (N, c, h, w)}, *unscaled* latents E(x)). Batches are ``{"latent": ...}``;
``DiffusionTask`` in latent mode scales them and checks the autoencoder description against its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffinv_pl.errors import UserError, UserFileError

log = logging.getLogger(__name__)

STAGES = ("autoencoder",)


def stage_configs(cfg: DictConfig) -> tuple[DictConfig, DictConfig, Path]:
    """(stage-1 config, stage-2 config, stage-1 checkpoint path) of a config with ``stages``."""
    stages = cfg.stages
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or "autoencoder" not in stages or stages.autoencoder.get("model") is None:
        raise UserError(
            f"stages must hold exactly 'autoencoder' with its model config (got {sorted(stages)}): see "
            "conf/experiment/ldm_custom.yaml"
        )
    root = Path(str(cfg.paths.output_dir))
    ae_ckpt = root / "autoencoder" / "checkpoints" / "last.ckpt"
    base = OmegaConf.to_container(cfg, resolve=False)
    base.pop("stages")
    first = OmegaConf.create(base)
    second = OmegaConf.create(base)
    with open_dict(first), open_dict(second):
        first.paths.output_dir = str(root / "autoencoder")
        first.model = OmegaConf.create(OmegaConf.to_container(stages.autoencoder.model, resolve=True))
        first.trainer = OmegaConf.merge(cfg.trainer, stages.autoencoder.get("trainer") or {})
        first.ckpt_path = None
        second.paths.output_dir = str(root / "ldm")
        second.model.autoencoder = str(ae_ckpt)
    return first, second, ae_ckpt


def run_stages(cfg: DictConfig, run: Callable[[DictConfig], dict[str, float]]) -> dict[str, float]:
    """Run the autoencoder stage (unless its checkpoint exists), then the latent diffusion stage, with ``run``
    (:func:`~diffinv_pl.training.run_training`); module docstring."""
    first, second, ae_ckpt = stage_configs(cfg)
    metrics: dict[str, float] = {}
    if ae_ckpt.is_file():
        log.info("stage 1 (autoencoder) skipped: %s exists", ae_ckpt)
    else:
        log.info("stage 1: training the autoencoder into %s", first.paths.output_dir)
        metrics.update({f"autoencoder/{k}": v for k, v in run(first).items()})
    log.info("stage 2: training the latent diffusion model into %s", second.paths.output_dir)
    metrics.update({f"ldm/{k}": v for k, v in run(second).items()})
    return metrics


# ------------------------------------------------------------------------------------------------ pre-encoded latents
LATENT_INDEX = "latents.json"
LATENT_FORMAT = "diffinv_pl.latents/1"


class LatentFolderDataset(Dataset):
    """The unscaled latents of a folder written by ``data_prep/encode_latents.py``, as ``{"latent", "key"}``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(str(root)).expanduser()
        index = self.root / LATENT_INDEX
        if not index.is_file():
            raise UserFileError(
                f"no {LATENT_INDEX} in {self.root}: write the latents with python data_prep/encode_latents.py "
                f"--autoencoder DIR --images DIR --out {self.root}"
            )
        self.info: dict[str, Any] = json.loads(index.read_text())
        if self.info.get("format") != LATENT_FORMAT:
            raise UserError(f"{index} is not a {LATENT_FORMAT} index: re-run data_prep/encode_latents.py")
        parts = [torch.load(self.root / name, map_location="cpu", weights_only=True) for name in self.info["files"]]
        self.keys = [k for part in parts for k in part["keys"]]
        self.latents: Tensor = torch.cat([part["latent"] for part in parts])
        if len(self.keys) != self.info["count"] or len(self.latents) != self.info["count"]:
            raise UserError(f"{self.root} holds {len(self.latents)} latents, its index says {self.info['count']}: "
                            "re-run data_prep/encode_latents.py")

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict:
        return {"latent": self.latents[index], "key": self.keys[index]}


class LatentDataModule(L.LightningDataModule):
    """Training (and optional validation) batches of pre-encoded latents (module docstring), shuffled with a
    generator seeded by ``seed`` (DDP: Lightning's DistributedSampler). ``channels`` / ``image_size`` are those of
    the encoded images, ``autoencoder_description`` the ``describe()`` of the autoencoder that encoded them."""

    def __init__(self, root: str | Path, val_root: str | Path | None = None, batch_size: int = 32,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.root, self.val_root = root, val_root
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self.train_set: LatentFolderDataset | None = None
        self.val_set: LatentFolderDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = LatentFolderDataset(self.root)
            if self.val_root is not None:
                self.val_set = LatentFolderDataset(self.val_root)

    @property
    def channels(self) -> int:
        self.setup()
        return int(self.train_set.info["image_shape"][0])

    @property
    def image_size(self) -> tuple[int, int]:
        self.setup()
        return tuple(int(v) for v in self.train_set.info["image_shape"][1:])

    @property
    def autoencoder_description(self) -> dict:
        self.setup()
        return dict(self.train_set.info["autoencoder_description"])

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.train_set, self.batch_size, shuffle=True, drop_last=True, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        return [] if self.val_set is None else DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers)
