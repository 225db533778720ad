"""Exact samples of the 25-component grid mixture as a Lightning datamodule (training data for learned GMM priors).

The benchmark prior (:func:`~diffinv_pl.data.gmm_problems.grid_prior`) has means up to ±16 and unit covariances.
Samples are multiplied by ``scale`` so that they are O(1), the range EDM's ``sigma_data = 0.5`` expects: with the
default scale 1/16 the means lie in [-1, 1] with spacing 0.5 and every component has standard deviation 1/16. The
exact prior of the *rescaled* data is the mixture with means ``scale * mu_k`` and covariance ``scale^2 I``
(:attr:`GMMSampleDataModule.prior`); a learned denoiser is compared against its Tweedie mean.

Seeds: the mixture weights come from ``grid_prior(dim, protocol, seed)``; training samples from a generator seeded
with ``2 * seed`` and validation samples from ``2 * seed + 1``, so the two sets are independent and each is fixed
by (seed, its size) alone.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from diffinv_pl.data.gmm_problems import grid_prior
from diffinv_pl.priors.analytic import GaussianMixture


class GMMSampleDataModule(L.LightningDataModule):
    """``num_train`` / ``num_val`` float32 samples (shape (dim,)) of the rescaled grid mixture, batches of 1-tuples.

    Args:
        dim: even dimension >= 2.
        protocol: ``mcgdiff`` (chi^2_1 weights drawn from ``seed``) or ``tmpd`` (equal weights).
        num_train, num_val: sample counts; ``num_train >= batch_size``.
        batch_size: batch size of both loaders (training batches are shuffled).
        scale: multiplier applied to the samples (and to the exact prior), > 0.
        seed: seed of the weights and of the samples (module docstring).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        dim: int = 8,
        protocol: str = "mcgdiff",
        num_train: int = 4096,
        num_val: int = 1024,
        batch_size: int = 256,
        scale: float = 1.0 / 16.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_val < 1 or num_train < batch_size:
            raise ValueError(f"need batch_size >= 1, num_val >= 1 and num_train >= batch_size, got {batch_size}, {num_val}, {num_train}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        benchmark = grid_prior(dim, protocol, seed)  # validates dim and protocol
        self.prior: GaussianMixture = GaussianMixture.isotropic(benchmark.weights[0], benchmark.means[0] * scale, variance=scale**2)
        self._benchmark = benchmark
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _draw(self, n: int, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return (self._benchmark.sample(n, gen)[0] * self.hparams.scale).float()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            seed = self.hparams.seed
            self.train_set = TensorDataset(self._draw(self.hparams.num_train, 2 * seed))
            self.val_set = TensorDataset(self._draw(self.hparams.num_val, 2 * seed + 1))

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle, num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
