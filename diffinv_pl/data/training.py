"""Training data: Lightning datamodules over map-style image sets and over streamed webdataset shards.

Batch format (both datamodules, train and val): ``{"image": (B, C, H, W) float32 in [0, 1], "key": list of B str}``.
Other fields of the dataset items ("path", "index", "meta") are dropped, so every source gives the same batches.

Distributed semantics (rank r of w processes, from the attached Trainer, or :meth:`set_distributed`):

* :class:`ImageTrainingDataModule` (map-style sets: ImageFolderDataset, CTPhantomDataset, ShardIndexDataset,
  InMemoryImageDataset). Training always uses ``DistributedSampler(shuffle=True, seed=seed, drop_last=True)``, also
  for one process, and a DataLoader with ``drop_last=True``: every rank runs ``floor(floor(N / w) / B)`` batches of
  exactly B images, the ranks' samples within an epoch are disjoint, and the order is a pure function of
  (seed, epoch, w); Lightning calls ``sampler.set_epoch(epoch)`` itself and leaves a DistributedSampler in place
  whether or not the trainer has ``use_distributed_sampler``. Resuming from a mid-epoch checkpoint skips the batches
  the restored epoch already trained on (:class:`ResumableDistributedSampler`), so the run continues exactly.
* :class:`ShardTrainingDataModule` (webdataset tars). Shards are dealt to the w x W streams (W DataLoader workers, 1
  without workers); each stream draws shards from its own share with replacement, weighted by sample count when the
  shard index is known, shuffles samples in a buffer and cuts fixed-size batches. Every rank runs exactly
  ``batches_per_epoch`` batches of exactly B images per epoch, whatever the shard sizes; the stream is a pure
  function of (seed, epoch, r, w, W), taken from the trainer's ``current_epoch`` when each epoch starts. Resuming
  from a mid-epoch checkpoint replays the skipped batches' draws without decoding them and continues exactly.
* Validation (both): sequential, not shuffled, split by :func:`~diffinv_pl.data.distributed.rank_indices` without
  padding duplicates, so ranks may run one batch more or fewer than each other: validation steps must not call
  collectives per batch (Lightning's epoch-level ``self.log(..., sync_dist=True)`` is fine).
"""

from __future__ import annotations

import itertools
import json
import random
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from diffinv_pl.data.distributed import rank_indices
from diffinv_pl.data.images import ImageFolderDataset
from diffinv_pl.data.shards import IMAGE_FORMATS, INDEX_NAME, ShardIndexDataset, decode_image, member_where
from diffinv_pl.errors import UserError, UserFileError
from diffinv_pl.utils.seeding import hash_seed

MAX_LISTED_FILES = 5


class InMemoryImageDataset(Dataset):
    """A small image set held in memory: item i is ``{"key": keys[i], "image": images[i]}``.

    Args:
        images: (N, C, H, W) tensor or array, or the path of a ``.npy`` / ``.pt`` file holding one; stored as float32,
            every value finite and in [0, 1].
        keys: N unique strings; default ``image_00000``, ``image_00001``, ...
    """

    def __init__(self, images: Tensor | np.ndarray | str | Path, keys: Sequence[str] | None = None):
        source = "images"
        if isinstance(images, (str, Path)):
            source = str(images)
            images = _load_array(Path(images))
        images = torch.as_tensor(images)
        if images.ndim != 4:
            raise UserError(f"{source}: expected an (N, C, H, W) array, got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise UserError(f"{source}: no images (shape {tuple(images.shape)})")
        images = images.to(torch.float32)
        keys = [f"image_{i:05d}" for i in range(len(images))] if keys is None else list(keys)
        if len(keys) != len(images):
            raise UserError(f"{source}: {len(keys)} keys for {len(images)} images; give one key per image")
        if not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != len(keys):
            raise UserError(f"{source}: keys must be unique non-empty strings")
        flat = images.flatten(1)
        nonfinite = (~torch.isfinite(flat)).any(1).nonzero().flatten().tolist()
        if nonfinite:
            raise UserError(
                f"{source}: {len(nonfinite)} image(s) contain NaN or infinite values, first image {nonfinite[0]} "
                f"(key {keys[nonfinite[0]]!r}); clean or drop them"
            )
        outside = ((flat < 0.0) | (flat > 1.0)).any(1).nonzero().flatten().tolist()
        if outside:
            first = images[outside[0]]
            raise UserError(
                f"{source}: {len(outside)} image(s) have values outside the allowed range [0, 1], first image "
                f"{outside[0]} (key {keys[outside[0]]!r}) in [{float(first.min()):.4g}, {float(first.max()):.4g}]; "
                "rescale the data to [0, 1] (8-bit data: divide by 255)"
            )
        self.images: Tensor = images
        self.keys: list[str] = keys

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.images):
            raise IndexError(f"index {index} out of range for {len(self.images)} images")
        return {"key": self.keys[index], "image": self.images[index]}


def _load_array(path: Path) -> Tensor | np.ndarray:
    if not path.is_file():
        raise UserFileError(f"image array file {str(path)!r} does not exist; check the path (a .npy or .pt file)")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, Tensor):
            raise UserError(f"{str(path)!r} holds a {type(data).__name__}, not a tensor; save one (N, C, H, W) tensor")
        return data
    raise UserError(f"{str(path)!r}: unsupported file type {path.suffix!r}; use .npy or .pt")


def collate_images(samples: Sequence[dict]) -> dict:
    """``{"image": (B, C, H, W) float32, "key": [B keys]}`` from dataset items; other fields are dropped. Mixed image
    shapes are refused with the offending keys named."""
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        by_shape = {shape: [s["key"] for s in samples if tuple(s["image"].shape) == shape] for shape in shapes}
        listing = "; ".join(f"{shape}: {keys[:MAX_LISTED_FILES]}" for shape, keys in by_shape.items())
        raise ValueError(f"one batch holds images of different shapes ({listing}); training images need one size")
    return {"image": torch.stack([s["image"] for s in samples]).to(torch.float32), "key": [s["key"] for s in samples]}


def check_channels(channels: int, expected: int, source: str) -> None:
    """Raise a UserError naming ``source``, both counts and the fix when the data's channel count is not the
    model's (checked in ``setup``, before the first training step)."""
    if channels != expected:
        raise UserError(
            f"data has {channels} channel(s) but the model expects {expected} ({source}): set the data's mode "
            f"(data.train.mode=L for 1 channel, RGB for 3) or the model's channels (model.net.image_channels={channels})"
        )


def describe(dataset: object) -> str:
    """A short name for error messages: the class and, where it has one, the folder it reads."""
    root = getattr(dataset, "root", None)
    mode = getattr(dataset, "mode", None)
    return type(dataset).__name__ + (f" at {str(root)!r}" if root is not None else "") + (
        f" (mode {mode})" if mode is not None else ""
    )


def _check_place(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank {rank} of {world_size}")


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank ``rank``'s share ``rank_indices(len(dataset), rank, num_replicas)``, in order, each index exactly once over
    all ranks (no padding, shares differ by at most one). A DistributedSampler subclass, so Lightning leaves it in
    place instead of injecting its padding one (trainers with ``use_distributed_sampler=True``)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.indices: list[int] = rank_indices(len(dataset), rank, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler(shuffle=True, drop_last=True)`` whose next pass can start ``skip`` samples into the
    epoch's order: resuming from a mid-epoch checkpoint continues with exactly the batches an uninterrupted run would
    have seen. ``skip`` applies to one pass only; ``len`` stays the full epoch (as Lightning expects)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices, self.skip = list(super().__iter__())[self.skip :], 0
        return iter(indices)


class _ResumableLoader(DataLoader):
    """Training DataLoader that Lightning treats as resumable (it has ``state_dict`` / ``load_state_dict``).

    The position is not counted here (Lightning prefetches a batch, so a loader's own count runs ahead): at each
    ``iter`` the loader asks ``batches_done()`` how many batches of the current epoch the restored trainer has
    already trained on, and its sampler skips them.
    """

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs):
        super().__init__(*args, **kwargs)
        self._batches_done = batches_done

    def __iter__(self):
        self.sampler.skip = self._batches_done() * self.batch_size
        return super().__iter__()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to load: the restored trainer's batch progress says where the epoch stopped."""


def _batches_done_in_restored_epoch(trainer) -> int:
    """Batches of the current epoch already trained on when ``trainer`` resumes mid-epoch from a checkpoint, else 0."""
    if trainer is None:
        return 0
    loop = trainer.fit_loop.epoch_loop
    done = loop.batch_progress.current.processed
    # A fresh epoch, or a checkpoint saved at the epoch's last batch (the loader is built before
    # ``num_training_batches`` is known): the next epoch starts from its beginning.
    if not loop.restarting or _restored_at_last_batch(trainer) or done >= trainer.num_training_batches:
        return 0
    return done


def _restored_at_last_batch(trainer) -> bool:
    """True while a trainer restores a checkpoint saved at the last batch of an epoch (by step count): the epoch is
    over, but Lightning counts it completed only after the loaders were built."""
    progress = trainer.fit_loop.epoch_progress.current
    loop = trainer.fit_loop.epoch_loop
    return bool(loop.restarting and loop.batch_progress.is_last_batch and progress.completed < progress.started)


class _TrainingDataModule(L.LightningDataModule):
    """What both datamodules share: the process's rank, the exact validation loader, the shape / channel checks."""

    def __init__(
        self,
        val: Dataset | None,
        batch_size: int,
        val_batch_size: int | None,
        num_workers: int,
        seed: int,
        expected_channels: int | None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1 or None, got {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if expected_channels is not None and expected_channels < 1:
            raise ValueError(f"expected_channels must be >= 1 or None, got {expected_channels}")
        if val is not None and len(val) == 0:
            raise ValueError(f"the validation set {describe(val)} is empty; set val: null to train without one")
        self.val = val
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.expected_channels = expected_channels
        self._override: tuple[int, int] | None = None
        self._image_shape: tuple[int, int, int] | None = None
        self._checked = False

    # ------------------------------------------------------------------------------------------------ distribution
    def set_distributed(self, rank: int, world_size: int) -> None:
        """Act as rank ``rank`` of ``world_size`` processes without a Trainer (tests, custom launchers). An attached
        Trainer must agree; without either, the process is rank 0 of 1."""
        _check_place(rank, world_size)
        self._override = (rank, world_size)

    def process_place(self) -> tuple[int, int]:
        """``(rank, world_size)``: the attached Trainer's (global_rank, world_size), the :meth:`set_distributed`
        override, or (0, 1)."""
        trainer = self.trainer
        place = (trainer.global_rank, trainer.world_size) if trainer is not None else None
        if place is not None and self._override is not None and place != self._override:
            raise ValueError(
                f"set_distributed{self._override} disagrees with the attached trainer (rank {place[0]} of {place[1]})"
            )
        return place or self._override or (0, 1)

    # ------------------------------------------------------------------------------------------------ shapes
    @abstractmethod
    def _first_train_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the first training image."""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the training images (read from the first training item once)."""
        if self._image_shape is None:
            self._image_shape = self._first_train_shape()
        return self._image_shape

    @property
    def channels(self) -> int:
        """Channel count C of the training images."""
        return self.image_shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the training images."""
        return self.image_shape[1], self.image_shape[2]

    def _check_val_and_channels(self, train_source: str, check_sizes: bool) -> None:
        if self.val is not None:
            val_shape = _dataset_shape(self.val, check_sizes=check_sizes)
            if val_shape != self.image_shape:
                raise UserError(
                    f"validation images ({describe(self.val)}) have shape {val_shape} but training images "
                    f"({train_source}) have {self.image_shape}; give both the same size and mode (e.g. "
                    "data.val.size= beside data.train.size=, or data.val.image_size= / data.val.mode=)"
                )
        if self.expected_channels is not None:
            check_channels(self.channels, self.expected_channels, train_source)

    # ------------------------------------------------------------------------------------------------ loaders
    def val_dataloader(self) -> DataLoader | list:
        """This rank's share of the validation set, in order, each image once over all ranks; [] without a val set
        (Lightning then skips validation)."""
        if self.val is None:
            return []
        rank, world_size = self.process_place()
        return DataLoader(
            self.val,
            batch_size=self.val_batch_size,
            sampler=UnpaddedDistributedSampler(self.val, num_replicas=world_size, rank=rank),
            num_workers=self.num_workers,
            collate_fn=collate_images,
            persistent_workers=self.num_workers > 0,
        )


class ImageTrainingDataModule(_TrainingDataModule):
    """Training on a map-style image set (module docstring for batches and distributed semantics).

    Args:
        train: dataset of ``{"key": str, "image": (C, H, W) float in [0, 1], ...}`` items, all of one shape (Hydra
            instantiates it from a nested ``_target_``: ImageFolderDataset, CTPhantomDataset, ShardIndexDataset,
            InMemoryImageDataset). Needs at least world_size x batch_size items.
        val: optional validation dataset of the same kind and shape.
        batch_size: images per training batch and rank.
        num_workers: DataLoader worker processes (persistent).
        seed: seed of the DistributedSampler's shuffle (the order is a function of (seed, epoch, world_size)).
        val_batch_size: images per validation batch and rank; default ``batch_size``.
        expected_channels: the model's input channels; :meth:`setup` refuses data with another count.
        check_sizes: for an ImageFolderDataset (train or val) with ``image_size=None`` (native sizes) read every
            file's size from its header in :meth:`setup` and name the files when sizes differ; False checks the first
            image only.
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        val_batch_size: int | None = None,
        expected_channels: int | None = None,
        check_sizes: bool = True,
    ) -> None:
        super().__init__(val, batch_size, val_batch_size, num_workers, seed, expected_channels)
        if len(train) == 0:
            raise ValueError(f"the training set {describe(train)} is empty")
        self.train = train
        self.check_sizes = check_sizes

    def _first_train_shape(self) -> tuple[int, int, int]:
        return _dataset_shape(self.train, check_sizes=False)

    def setup(self, stage: str | None = None) -> None:
        """Check once that every training (and validation) image has one shape, and the channel count."""
        if self._checked:
            return
        self._image_shape = _dataset_shape(self.train, check_sizes=self.check_sizes)
        self._check_val_and_channels(describe(self.train), self.check_sizes)
        self._checked = True

    def train_dataloader(self) -> DataLoader:
        """Shuffled, equal-size batches: ``DistributedSampler(shuffle=True, seed, drop_last=True)`` over the whole
        training set, ``drop_last=True``; the same number of batches on every rank."""
        rank, world_size = self.process_place()
        n = len(self.train)
        if n < world_size * self.batch_size:
            raise ValueError(
                f"the training set {describe(self.train)} has {n} images, fewer than world_size x batch_size = "
                f"{world_size} x {self.batch_size} = {world_size * self.batch_size}: every rank needs one full batch; "
                "lower data.batch_size or add training images"
            )
        return _ResumableLoader(
            self.train,
            batch_size=self.batch_size,
            sampler=ResumableDistributedSampler(self.train, world_size, rank, self.seed),
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=collate_images,
            persistent_workers=self.num_workers > 0,
            batches_done=lambda: _batches_done_in_restored_epoch(self.trainer),
        )


def _dataset_shape(dataset: Dataset, check_sizes: bool) -> tuple[int, int, int]:
    """(C, H, W) shared by the dataset's images. An ImageFolderDataset with native sizes and ``check_sizes`` has
    every file's header read (mixed sizes are refused, naming files); otherwise the first item is checked."""
    if isinstance(dataset, ImageFolderDataset) and dataset.image_size is None and check_sizes:
        return _folder_shape(dataset)
    item = dataset[0]
    if not isinstance(item, dict) or "image" not in item or "key" not in item:
        raise TypeError(f"{describe(dataset)}: items must be dicts with 'key' and 'image', got {type(item).__name__}")
    image = item["image"]
    if not isinstance(image, Tensor) or image.ndim != 3 or not image.is_floating_point():
        raise ValueError(
            f"{describe(dataset)}: 'image' must be a (C, H, W) float tensor, got "
            f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))} {getattr(image, 'dtype', '')}"
        )
    lo, hi = float(image.min()), float(image.max())
    if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
        path = item.get("path")
        raise UserError(
            f"{describe(dataset)}: image {item['key']!r}" + (f" (file {str(path)!r})" if path is not None else "")
            + f" has values in [{lo:.4g}, {hi:.4g}], not in the allowed range [0, 1]; fix the data "
            "(8-bit data: divide by 255)"
        )
    return tuple(image.shape)


def _folder_shape(dataset: ImageFolderDataset) -> tuple[int, int, int]:
    """Every file's (H, W) from its header (no decoding); one size or a ValueError listing the files per size."""
    channels = 3 if dataset.mode == "RGB" else 1
    by_size: dict[tuple[int, int], list[str]] = {}
    for rel in dataset.files:
        with Image.open(dataset.root / rel) as im:
            width, height = im.size
        by_size.setdefault((height, width), []).append(rel)
    if len(by_size) > 1:
        listing = "\n".join(
            f"  {h}x{w} (H x W), {len(files)} file(s): {', '.join(files[:MAX_LISTED_FILES])}"
            + (", ..." if len(files) > MAX_LISTED_FILES else "")
            for (h, w), files in sorted(by_size.items(), key=lambda kv: -len(kv[1]))
        )
        raise ValueError(
            f"images under {str(dataset.root)!r} have {len(by_size)} different sizes:\n{listing}\n"
            "training needs one size: set image_size in the data config (resize + centre crop) or resize the files"
        )
    ((height, width),) = by_size
    return channels, height, width


# ---------------------------------------------------------------------------------------------------- shards
def decode_shard_sample(sample: dict) -> dict:
    """A raw webdataset sample (``__key__``, ``png`` or ``npy`` bytes) as ``{"key", "image" (C, H, W) float32}``,
    decoded like :class:`~diffinv_pl.data.shards.ShardIndexDataset` (:func:`~diffinv_pl.data.shards.decode_image`)."""
    key = sample["__key__"]
    formats = [f for f in IMAGE_FORMATS if f in sample]
    if not formats:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise UserError(
            f"sample {key!r} in shard {sample.get('__url__')!r} has no .png or .npy member (has {members}); write "
            "the shards with data_prep/make_shards.py"
        )
    where = member_where(key, formats[0], sample.get("__url__"))
    return {"key": key, "image": decode_image(sample[formats[0]], formats[0], where)}


class ResampledShardStream(IterableDataset):
    """One rank's training batches from webdataset shards: ``batches_per_epoch`` batches of exactly ``batch_size``
    per epoch (a DataLoader with ``batch_size=None`` passes them through).

    Stream k = rank x num_workers + worker (worker 0 without DataLoader workers) owns shards k, k + S, k + 2S, ... of
    the S = world_size x num_workers streams, draws them with replacement (weighted by ``shard_sizes`` when given, so
    each of its samples is equally likely; uniformly otherwise), shuffles samples in a buffer of ``shuffle_buffer``
    (filled before the first sample comes out) and cuts full batches. Worker w yields ``batches_per_epoch //
    num_workers`` batches, plus one when ``w < batches_per_epoch % num_workers``, so the rank yields exactly
    ``batches_per_epoch``. Every draw comes from seeds of (seed, epoch, rank, worker): set the epoch with
    :meth:`set_epoch` before iterating (workers receive it when they start).
    """

    def __init__(
        self,
        urls: Sequence[str],
        batch_size: int,
        batches_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        shard_sizes: Sequence[int] | None = None,
    ):
        _check_place(rank, world_size)
        streams = world_size * max(1, num_workers)
        if len(urls) < streams:
            raise ValueError(
                f"too few shards for world_size x workers: {len(urls)} shards, need >= {streams} "
                f"({world_size} x {max(1, num_workers)}); write more shards with data_prep/make_shards.py "
                "--samples-per-shard <fewer samples per shard>, or lower data.num_workers"
            )
        if shard_sizes is not None and (len(shard_sizes) != len(urls) or min(shard_sizes) < 1):
            raise ValueError(f"shard_sizes must give a positive sample count for each of the {len(urls)} shards")
        self.urls = list(urls)
        self.shard_sizes = None if shard_sizes is None else list(shard_sizes)
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_skip(self, batches: int) -> None:
        """Start the next pass ``batches`` batches into the epoch (resuming from a mid-epoch checkpoint): the skipped
        batches are drawn (the shuffle buffer's state depends on them) but not decoded."""
        if not 0 <= batches <= self.batches_per_epoch:
            raise ValueError(f"can skip 0..{self.batches_per_epoch} batches, got {batches}")
        self.skip = batches

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != max(1, self.num_workers):
            raise RuntimeError(f"stream built for {self.num_workers} workers but iterated by {workers}")
        # The DataLoader takes batches from its workers in turn, starting at worker 0: in an uninterrupted pass worker
        # w gives the epoch's batches w, w + W, ... A pass resumed `skip` batches in starts at batch `skip`, so worker
        # w continues the batches of worker origin = (w + skip) mod W, of which the first ceil((skip - origin) / W)
        # were already trained on.
        origin = (worker + self.skip) % workers
        stream = self.rank * workers + origin
        step = self.world_size * workers
        urls = self.urls[stream::step]
        sizes = None if self.shard_sizes is None else self.shard_sizes[stream::step]
        base, extra = divmod(self.batches_per_epoch, workers)
        stages: list = [lambda: self._samples(urls, sizes, random.Random(self._seed("shards", origin)))]
        if self.shuffle_buffer > 0:
            stages.append(
                wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=self._seed("samples", origin))
            )
        stages.append(wds.batched(self.batch_size, collation_fn=list, partial=False))
        count = base + (origin < extra)
        skipped = max(0, -(-(self.skip - origin) // workers))
        raw = itertools.islice(wds.DataPipeline(*stages), skipped, count)
        for samples in raw:
            yield collate_images([decode_shard_sample(sample) for sample in samples])

    def _seed(self, what: str, worker: int) -> int:
        return hash_seed("shard-stream", what, self.seed, self.epoch, self.rank, worker)

    @staticmethod
    def _samples(urls: list[str], sizes: list[int] | None, rng: random.Random) -> Iterator[dict]:
        """Raw samples of shards drawn with replacement, forever."""
        from webdataset import tarfile_samples

        while True:
            url = rng.choices(urls, weights=sizes)[0]
            count = 0
            for sample in tarfile_samples([{"url": url}]):
                count += 1
                yield sample
            if count == 0:
                raise ValueError(f"shard {url!r} holds no samples")


class _StreamLoader(DataLoader):
    """A DataLoader over a :class:`ResampledShardStream` that hands the stream the trainer's epoch before each pass,
    and, when the trainer resumes mid-epoch, the number of batches to skip (resumable like :class:`_ResumableLoader`).
    Workers are started per pass (not persistent) so that each epoch's workers receive that epoch."""

    def __init__(
        self,
        stream: ResampledShardStream,
        num_workers: int,
        epoch: Callable[[], int | None],
        batches_done: Callable[[], int],
    ):
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False)
        self._epoch = epoch
        self._batches_done = batches_done

    def __iter__(self):
        epoch = self._epoch()
        if epoch is not None:
            self.dataset.set_epoch(epoch)
        self.dataset.set_skip(self._batches_done())
        return super().__iter__()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to load: the restored trainer's batch progress says where the epoch stopped."""


class ShardTrainingDataModule(_TrainingDataModule):
    """Streaming training from webdataset shards (module docstring; :class:`ResampledShardStream` for the draws).

    Args:
        urls_or_dir: a folder holding a ``write_shards`` index (``index.json``; its shard sizes weight the draws), a
            brace pattern / ``::``-separated string of shard URLs ("data/shard-{000000..000099}.tar"), or a list of
            URLs. Samples need a ``.png`` (8-bit L / RGB) or ``.npy`` (float32 (C, H, W)) member; images of one shape.
        batch_size: images per batch and rank.
        batches_per_epoch: batches per epoch and rank (with W workers, worker w yields batches_per_epoch // W, plus
            one for the first batches_per_epoch % W workers).
        num_workers: DataLoader worker processes; needs >= world_size x max(1, num_workers) shards. The stream, hence
            the data order, depends on num_workers.
        shuffle_buffer: samples held (as undecoded bytes) for shuffling in each worker; 0 keeps shard order.
        seed: seed of the shard draws and the shuffle.
        val: optional map-style validation dataset (e.g. ShardIndexDataset), loaded as by ImageTrainingDataModule.
        val_batch_size: images per validation batch and rank; default ``batch_size``.
        expected_channels: the model's input channels; :meth:`setup` refuses data with another count.
    """

    def __init__(
        self,
        urls_or_dir: str | Path | Sequence[str],
        batch_size: int = 32,
        batches_per_epoch: int = 1000,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        val: Dataset | None = None,
        val_batch_size: int | None = None,
        expected_channels: int | None = None,
    ) -> None:
        super().__init__(val, batch_size, val_batch_size, num_workers, seed, expected_channels)
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.urls, self.shard_sizes = _resolve_shards(urls_or_dir)
        self.batches_per_epoch = batches_per_epoch
        self.shuffle_buffer = shuffle_buffer

    def _first_train_shape(self) -> tuple[int, int, int]:
        from webdataset import tarfile_samples

        url = self.urls[0]
        sample = next(iter(tarfile_samples([{"url": url}])), None)
        if sample is None:
            raise ValueError(f"shard {url!r} holds no samples")
        image = decode_shard_sample(sample)["image"]
        if image.ndim != 3:
            raise ValueError(f"shard {url!r}: images must be (C, H, W), got shape {tuple(image.shape)}")
        return tuple(image.shape)

    def setup(self, stage: str | None = None) -> None:
        """Check once that the validation images have the training shape (first sample of the first shard), and the
        channel count."""
        if self._checked:
            return
        self._check_val_and_channels(f"shards {self.urls[0]!r}, ...", check_sizes=True)
        self._checked = True

    def train_dataloader(self) -> DataLoader:
        """This rank's ``batches_per_epoch`` batches; the epoch is the trainer's ``current_epoch`` when attached,
        otherwise whatever ``loader.dataset.set_epoch`` was given (default 0)."""
        rank, world_size = self.process_place()
        stream = ResampledShardStream(
            self.urls,
            batch_size=self.batch_size,
            batches_per_epoch=self.batches_per_epoch,
            rank=rank,
            world_size=world_size,
            num_workers=self.num_workers,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            shard_sizes=self.shard_sizes,
        )
        return _StreamLoader(
            stream, self.num_workers, self._trainer_epoch, lambda: _batches_done_in_restored_epoch(self.trainer)
        )

    def _trainer_epoch(self) -> int | None:
        """The epoch about to be trained (the next one when restoring a checkpoint saved at an epoch's last batch)."""
        if self.trainer is None:
            return None
        return self.trainer.current_epoch + int(_restored_at_last_batch(self.trainer))


def _resolve_shards(urls_or_dir: str | Path | Sequence[str]) -> tuple[list[str], list[int] | None]:
    """(shard URLs, sample count per shard or None): from a write_shards folder, a URL pattern or a list."""
    from webdataset.shardlists import expand_urls

    if isinstance(urls_or_dir, (str, Path)) and Path(urls_or_dir).is_dir():
        index = ShardIndexDataset(urls_or_dir)  # validates the index and that its shards exist
        counts = json.loads((index.root / INDEX_NAME).read_text())["shards"]
        return index.urls, [len(counts[Path(url).name]) for url in index.urls]
    urls = expand_urls(str(urls_or_dir)) if isinstance(urls_or_dir, (str, Path)) else [str(u) for u in urls_or_dir]
    if not urls:
        raise ValueError(f"no shard URLs in {urls_or_dir!r}")
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard file(s) do not exist, e.g. {missing[:MAX_LISTED_FILES]} (give a folder holding "
            "index.json, a brace pattern such as shard-{000000..000009}.tar, or a list of files)"
        )
    return urls, None
