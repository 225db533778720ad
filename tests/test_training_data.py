"""Training datamodules (diffinv_pl.data.training): equal per-rank batches, seeded order, shape / size / channel
checks, the conf/data training configs. Ranks are simulated with set_distributed (no process group)."""

from __future__ import annotations

import re

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from diffinv_pl.data.images import ImageFolderDataset
from diffinv_pl.data.phantoms import CTPhantomDataset
from diffinv_pl.data.shards import ShardIndexDataset, write_shards
from diffinv_pl.data.training import (
    ImageTrainingDataModule,
    InMemoryImageDataset,
    ShardTrainingDataModule,
    UnpaddedDistributedSampler,
)
from diffinv_pl.errors import UserError

from conftest import compose


def _keys(loader) -> list[list[str]]:
    return [batch["key"] for batch in loader]


def _image_module(rank: int | None, world_size: int, n: int = 23, train=None) -> ImageTrainingDataModule:
    """Batches of 3 from ``train`` (default n random 1x4x4 images); rank None leaves the place to a trainer."""
    train = InMemoryImageDataset(torch.rand(n, 1, 4, 4)) if train is None else train
    dm = ImageTrainingDataModule(train, batch_size=3, seed=5)
    if rank is not None:
        dm.set_distributed(rank, world_size)
    dm.setup("fit")
    return dm


def _epoch_keys(dm: ImageTrainingDataModule, epoch: int) -> list[list[str]]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning does at each epoch start
    return _keys(loader)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Two npy shard folders: a/ holds 17 phantoms in shards of 7, 7, 3; b/ 12 random images in shards of 5, 5, 2."""
    out = tmp_path_factory.mktemp("shards")
    write_shards(CTPhantomDataset(17, seed=1, size=8), out / "a", samples_per_shard=7, image_format="npy")
    write_shards(InMemoryImageDataset(torch.rand(12, 1, 8, 8), keys=[f"r{i}" for i in range(12)]), out / "b",
                 samples_per_shard=5, image_format="npy")
    return out


def test_in_memory_dataset_validates(tmp_path):
    ds = InMemoryImageDataset(torch.rand(3, 2, 4, 4), keys=["a", "b", "c"])
    assert len(ds) == 3 and ds[1]["key"] == "b" and ds[1]["image"].shape == (2, 4, 4)
    np.save(tmp_path / "x.npy", np.full((2, 1, 3, 3), 0.5, dtype=np.float32))
    assert InMemoryImageDataset(tmp_path / "x.npy")[0]["key"] == "image_00000"
    torch.save(torch.zeros(1, 3, 2, 2), tmp_path / "x.pt")
    assert InMemoryImageDataset(str(tmp_path / "x.pt"))[0]["image"].shape == (3, 2, 2)
    with pytest.raises(ValueError, match=r"\[0, 1\].*divide by 255"):
        InMemoryImageDataset(torch.full((1, 1, 2, 2), 255.0))
    with pytest.raises(ValueError, match="NaN"):
        InMemoryImageDataset(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        InMemoryImageDataset(torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="2 keys for 3"):
        InMemoryImageDataset(torch.rand(3, 1, 2, 2), keys=["a", "b"])


def test_in_memory_bad_values_name_the_key_and_file(tmp_path):
    images = np.full((4, 1, 3, 3), 0.5, dtype=np.float32)
    images[2, 0, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", images)
    source = re.escape(str(tmp_path / "nan.npy"))
    with pytest.raises(UserError, match=rf"{source}: 1 image\(s\) contain NaN or infinite values, "
                                        r"first image 2 \(key 'image_00002'\); clean or drop them"):
        InMemoryImageDataset(tmp_path / "nan.npy")
    images[2, 0, 1, 1] = 0.5
    images[1:3] *= 3.0
    with pytest.raises(UserError, match=r"images: 2 image\(s\) have values outside the allowed range \[0, 1\], "
                                        r"first image 1 \(key 'b'\) in \[1.5, 1.5\]; rescale"):
        InMemoryImageDataset(images, keys=["a", "b", "c", "d"])


def test_image_module_equal_disjoint_batches_per_rank():
    per_rank = [_epoch_keys(_image_module(r, 2), epoch=0) for r in range(2)]
    # 23 images, 2 ranks: DistributedSampler(drop_last) gives 11 each -> 3 full batches of 3 per rank
    assert [len(k) for k in per_rank] == [3, 3]
    assert all(len(batch) == 3 for keys in per_rank for batch in keys)
    flat = [sorted(k for batch in keys for k in batch) for keys in per_rank]
    assert not set(flat[0]) & set(flat[1])
    batch = next(iter(_image_module(0, 2).train_dataloader()))
    assert set(batch) == {"image", "key"} and batch["image"].shape == (3, 1, 4, 4)


def test_image_module_order_is_a_function_of_seed_and_epoch():
    a, b = _image_module(0, 2), _image_module(0, 2)
    assert _epoch_keys(a, 0) == _epoch_keys(b, 0)
    assert _epoch_keys(a, 0) != _epoch_keys(a, 1)
    other_seed = ImageTrainingDataModule(a.train, batch_size=3, seed=6)
    other_seed.set_distributed(0, 2)
    assert _epoch_keys(other_seed, 0) != _epoch_keys(a, 0)


def test_image_module_refuses_too_small_train_set():
    dm = _image_module(0, 4, n=11)  # 11 < 4 x 3
    with pytest.raises(ValueError, match=r"11 images, fewer than world_size x batch_size = 4 x 3 = 12"):
        dm.train_dataloader()


def test_val_loader_is_exact_and_unpadded():
    val = InMemoryImageDataset(torch.rand(7, 1, 4, 4))
    shares = []
    for rank in range(3):
        dm = ImageTrainingDataModule(InMemoryImageDataset(torch.rand(9, 1, 4, 4)), val=val, batch_size=2)
        dm.set_distributed(rank, 3)
        dm.setup("fit")
        loader = dm.val_dataloader()
        assert isinstance(loader.sampler, UnpaddedDistributedSampler)  # Lightning keeps DistributedSamplers
        shares.append([k for batch in _keys(loader) for k in batch])
    assert sorted(k for share in shares for k in share) == val.keys  # each image exactly once, no padding
    assert [len(s) for s in shares] == [3, 2, 2]


def _png(path, size, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray(np.zeros((h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)).save(path)


def test_mixed_size_folder_names_the_files(tmp_path):
    for name in ("a", "b", "c"):
        _png(tmp_path / f"{name}.png", (8, 8))
    _png(tmp_path / "sub" / "odd.png", (8, 6))
    dm = ImageTrainingDataModule(ImageFolderDataset(tmp_path, image_size=None, mode="L"), batch_size=2)
    with pytest.raises(ValueError, match=r"2 different sizes(.|\n)*6x8 \(H x W\), 1 file\(s\): sub/odd.png"):
        dm.setup("fit")
    resized = ImageTrainingDataModule(ImageFolderDataset(tmp_path, image_size=4, mode="L"), batch_size=2)
    resized.setup("fit")
    assert resized.image_shape == (1, 4, 4)


def test_channel_mismatch_is_refused(tmp_path):
    for name in ("a", "b"):
        _png(tmp_path / f"{name}.png", (4, 4))
    folder = ImageFolderDataset(tmp_path, image_size=None, mode="L")
    dm = ImageTrainingDataModule(folder, batch_size=1, expected_channels=3)
    assert dm.channels == 1 and dm.image_size == (4, 4)
    with pytest.raises(UserError, match=r"data has 1 channel\(s\) but the model expects 3 .*data.train.mode=L .* RGB"):
        dm.setup("fit")
    val = InMemoryImageDataset(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"validation images .* shape \(1, 8, 8\) .* \(1, 4, 4\)"):
        ImageTrainingDataModule(folder, val=val, batch_size=1).setup("fit")


def _shard_module(shard_dir, rank: int | None, world_size: int, **kw) -> ShardTrainingDataModule:
    """Batches of 4 from the 6 shards of ``shard_dir`` as a URL list; rank None leaves the place to a trainer."""
    kw = {"batch_size": 4, "batches_per_epoch": 5, "shuffle_buffer": 8, "seed": 3} | kw
    dm = ShardTrainingDataModule([*ShardIndexDataset(shard_dir / "a").urls, *ShardIndexDataset(shard_dir / "b").urls],
                                 **kw)
    if rank is not None:
        dm.set_distributed(rank, world_size)
    dm.setup("fit")
    return dm


def _shard_epoch(dm: ShardTrainingDataModule, epoch: int) -> list[list[str]]:
    loader = dm.train_dataloader()
    loader.dataset.set_epoch(epoch)  # a trainer's current_epoch replaces this when one is attached
    batches = list(loader)
    assert all(b["image"].shape == (4, 1, 8, 8) and b["image"].dtype == torch.float32 for b in batches)
    return [b["key"] for b in batches]


def test_shard_module_exact_batches_per_rank_and_seeded_order(shard_dir):
    ranks = [_shard_module(shard_dir, r, 2) for r in range(2)]
    assert [len(_shard_epoch(dm, 0)) for dm in ranks] == [5, 5]
    assert len(ranks[0].train_dataloader()) == 5
    again = _shard_module(shard_dir, 0, 2)
    assert _shard_epoch(again, 0) == _shard_epoch(ranks[0], 0)
    assert _shard_epoch(ranks[0], 1) != _shard_epoch(ranks[0], 0)
    assert _shard_epoch(ranks[1], 0) != _shard_epoch(ranks[0], 0)
    # rank 0 of 2 streams shards 0, 2, 4 (a/0, a/2, b/1) only
    mine = {k for batch in _shard_epoch(ranks[0], 0) for k in batch}
    assert mine <= {f"phantom_{i:05d}" for i in [*range(7), *range(14, 17)]} | {f"r{i}" for i in range(5, 10)}


def test_shard_module_workers_split_the_epoch_exactly(shard_dir):
    dm = _shard_module(shard_dir, 1, 2, num_workers=2, batches_per_epoch=5)  # workers yield 3 + 2 batches
    assert len(_shard_epoch(dm, 0)) == 5
    assert _shard_epoch(dm, 2) == _shard_epoch(_shard_module(shard_dir, 1, 2, num_workers=2), 2)


def test_shard_module_reads_an_index_folder_and_refuses_too_few_shards(shard_dir):
    dm = ShardTrainingDataModule(shard_dir / "a", batch_size=2, batches_per_epoch=1, num_workers=2)
    assert dm.shard_sizes == [7, 7, 3] and dm.image_shape == (1, 8, 8)
    dm.set_distributed(0, 2)
    with pytest.raises(ValueError, match=r"too few shards for world_size x workers: 3 shards, need >= 4 .*"
                                         r"make_shards.py --samples-per-shard"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match=r"data has 1 channel\(s\) but the model expects 3"):
        ShardTrainingDataModule(shard_dir / "a", batch_size=2, expected_channels=3).setup("fit")


class _Recorder(L.LightningModule):
    """Records the keys of every training batch, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[int, list[list[str]]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(batch["key"])
        return (self.w * batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("kind", ["images", "shards"])
def test_trainer_passes_the_epoch_and_keeps_the_sampler(kind, shard_dir, tmp_path):
    if kind == "images":
        train = InMemoryImageDataset(torch.rand(10, 1, 4, 4))
        dm = _image_module(None, 1, train=train)
        expected = [_epoch_keys(_image_module(0, 1, train=train), e) for e in range(2)]
    else:
        dm = _shard_module(shard_dir, None, 1)
        expected = [_shard_epoch(_shard_module(shard_dir, 0, 1), e) for e in range(2)]
    model = _Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert [model.seen[e] for e in range(2)] == expected and expected[0] != expected[1]
    if kind == "images":
        assert isinstance(trainer.train_dataloader.sampler, DistributedSampler)


@pytest.mark.parametrize("name", ["train_ct_phantoms", "train_images", "train_shards"])
def test_training_data_configs_compose_and_load(name, shard_dir, tmp_path):
    overrides = {
        "train_ct_phantoms": ["data.train.num_images=8", "data.train.size=32", "data.val.num_images=3"],
        "train_images": [f"data.train.root={tmp_path / 'imgs'}", "data.train.image_size=16"],
        "train_shards": [f"data.urls_or_dir={shard_dir / 'a'}", "data.batches_per_epoch=3", "data.shuffle_buffer=4"],
    }[name]
    if name == "train_images":
        for i in range(4):
            _png(tmp_path / "imgs" / f"{i}.png", (20, 24), mode="RGB")
    cfg = compose("train", [f"data={name}", f"paths.output_dir={tmp_path}", "data.batch_size=2",
                            "data.num_workers=0", *overrides])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    channels, size = {"train_ct_phantoms": (1, 32), "train_images": (3, 16), "train_shards": (1, 8)}[name]
    assert batch["image"].shape == (2, channels, size, size) and len(batch["key"]) == 2
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0
    if name == "train_ct_phantoms":
        assert dm.val.seed != dm.train.seed and dm.val.size == 32
        assert len(list(dm.val_dataloader())) == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shard_stream_resumes_mid_epoch_with_the_remaining_batches(shard_dir, num_workers):
    # a trainer resuming mid-epoch makes the loader call set_skip(batches already trained); the pass must then be the
    # tail of the uninterrupted pass, whatever the worker interleaving (worker w gives batches w, w + W, ...)
    dm = _shard_module(shard_dir, 1, 2, num_workers=num_workers, batches_per_epoch=5)
    stream = dm.train_dataloader().dataset
    stream.set_epoch(1)
    full = [b["key"] for b in DataLoader(stream, batch_size=None, num_workers=num_workers)]
    assert len(full) == 5
    for skip in (1, 2, 3, 5):
        stream.set_skip(skip)
        rest = [b["key"] for b in DataLoader(stream, batch_size=None, num_workers=num_workers)]
        assert rest == full[skip:], skip
        assert stream.skip == skip  # workers consume a copy; the next resume sets it again
        stream.set_skip(0)
    with pytest.raises(ValueError, match="can skip 0..5 batches, got 6"):
        stream.set_skip(6)
