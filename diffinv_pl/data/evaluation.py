"""``EvaluationDataModule``: each rank's exact share of the evaluation samples.

Lightning's ``DistributedSampler`` pads the last batch with duplicates, which biases paper numbers (conventions.md
§6). Here rank r of world size w takes ``rank_indices(len(dataset), r, w)``: every sample exactly once, shares differ
by at most one. The shares are fixed by index, so a rank never depends on what another rank has written; the task
skips samples an interrupted earlier run finished (their rows exist), so every rank still runs its loop and reaches
the epoch-end collectives. A rank whose share is empty (more ranks than samples) gets one placeholder sample
(key ``PLACEHOLDER_KEY``, which the task skips), so it still runs its loop and joins the collectives. Use it with
``Trainer(use_distributed_sampler=False)``.
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset, Subset

from diffinv_pl.data.distributed import rank_indices
from diffinv_pl.errors import UserError


PLACEHOLDER_KEY = ""  # the key of a placeholder sample: never a real key (keys must be non-empty)


class _Placeholder(Dataset):
    """One sample shaped like the dataset's first, with the placeholder key: the loop of a rank without work."""

    def __init__(self, dataset: Dataset) -> None:
        self.sample = {**dataset[0], "key": PLACEHOLDER_KEY}

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        return self.sample


class EvaluationDataModule(L.LightningDataModule):
    """Test loader over a keyed dataset (``dataset.keys``: one stable key per index) for evaluation tasks."""

    def __init__(self, dataset: Dataset, batch_size: int = 4, num_workers: int = 0, split: str = "strided") -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise UserError(f"need datamodule.batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        keys = getattr(dataset, "keys", None)
        if keys is None or len(dataset) == 0:
            raise UserError("the evaluation dataset is empty or has no `keys`; check data paths and settings")
        if len(set(keys)) != len(keys):
            raise UserError("the evaluation dataset has duplicate sample keys; results would overwrite each other")
        if PLACEHOLDER_KEY in keys:
            raise UserError("the evaluation dataset has an empty sample key; give every sample a non-empty key")
        self.dataset, self.batch_size, self.num_workers, self.split = dataset, batch_size, num_workers, split

    def rank_share(self, rank: int, world_size: int) -> list[int]:
        """Indices of rank ``rank``'s samples."""
        return rank_indices(len(self.dataset), rank, world_size, self.split)

    def test_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        indices = self.rank_share(rank, world)
        share = Subset(self.dataset, indices) if indices else _Placeholder(self.dataset)
        return DataLoader(share, batch_size=self.batch_size, num_workers=self.num_workers)
