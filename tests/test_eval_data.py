"""Evaluation data: image folders, indexed webdataset shards, CT phantoms, exact rank splits."""

from __future__ import annotations

import gc
import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from diffinv_pl.data.distributed import rank_indices, skip_finished
from diffinv_pl.data.images import ImageFolderDataset
from diffinv_pl.data.phantoms import CTPhantomDataset, random_ellipses_phantom
from diffinv_pl.data.shards import ShardIndexDataset, validate_shards, write_shards
from diffinv_pl.data.training import decode_shard_sample
from diffinv_pl.errors import UserError


def _save(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


@pytest.fixture
def image_dir(tmp_path):
    """b.png RGB 40x60, c.jpg RGB 50x30, d.png gray 20x48, sub/a.png gray 32x32; plus files that must be ignored."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    _save(root / "b.png", rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    _save(root / "c.jpg", rng.integers(0, 256, (50, 30, 3), dtype=np.uint8), quality=95)
    _save(root / "d.png", rng.integers(0, 256, (20, 48), dtype=np.uint8))
    _save(root / "sub" / "a.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"resource fork, not an image")
    return root


# ----------------------------------------------------------------------------------------------------- image folders


def test_folder_order_keys_shapes(image_dir):
    ds = ImageFolderDataset(image_dir, image_size=16)
    assert ds.keys == ["b", "c", "d", "sub/a"]
    assert len(ds) == 4 and ds.skipped == []
    for i, key in enumerate(ds.keys):
        s = ds[i]
        assert s["key"] == key and s["path"].startswith(key)
        assert s["image"].shape == (3, 16, 16) and s["image"].dtype == torch.float32
        assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    with pytest.raises(IndexError):
        ds[4]


def test_folder_modes(image_dir):
    gray = ImageFolderDataset(image_dir, image_size=16, mode="L")
    assert all(gray[i]["image"].shape == (1, 16, 16) for i in range(len(gray)))
    # native size: no resampling, so the pixels are exactly uint8 / 255; a gray file read as RGB repeats its channel
    native = np.asarray(Image.open(image_dir / "sub" / "a.png"), dtype=np.float32) / 255.0
    x_l = ImageFolderDataset(image_dir, image_size=32, mode="L")[3]["image"]
    x_rgb = ImageFolderDataset(image_dir, image_size=32, mode="RGB")[3]["image"]
    assert torch.equal(x_l[0], torch.from_numpy(native))
    assert torch.equal(x_rgb, x_l.expand(3, -1, -1))
    with pytest.raises(ValueError, match="mode"):
        ImageFolderDataset(image_dir, mode="CMYK")


def test_resize_shorter_side_then_centre_crop(tmp_path):
    wide = np.zeros((40, 80), np.uint8)
    wide[:, 20:60] = 255  # the central square is white: shorter side 40 -> 20, then the crop keeps exactly it
    _save(tmp_path / "w.png", wide)
    x = ImageFolderDataset(tmp_path, image_size=20, mode="L")[0]["image"]
    assert x.shape == (1, 20, 20)
    assert torch.all(x[:, :, 1:-1] == 1.0) and torch.all(x[:, :, [0, -1]] > 0.8)  # bicubic blur at the edges only


def test_sixteen_bit_png_scaled_not_clipped(tmp_path):
    _save(tmp_path / "ct.png", np.full((8, 8), 32768, np.uint16))
    x = ImageFolderDataset(tmp_path, image_size=8, mode="L")[0]["image"]
    assert torch.allclose(x, torch.full((1, 8, 8), 32768 / 65535))


def test_corrupt_fail_lists_every_file(image_dir):
    (image_dir / "z_bad.png").write_bytes(b"\x89PNG garbage bytes")
    (image_dir / "sub" / "bad2.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="2 corrupt") as err:
        ImageFolderDataset(image_dir, image_size=16)
    assert "z_bad.png" in str(err.value) and "bad2.jpg" in str(err.value)


def test_corrupt_skip_reports(image_dir, caplog):
    (image_dir / "z_bad.png").write_bytes(b"\x89PNG garbage bytes")
    with caplog.at_level(logging.WARNING, logger="diffinv_pl.data.images"):
        ds = ImageFolderDataset(image_dir, image_size=16, corrupt="skip")
    assert ds.keys == ["b", "c", "d", "sub/a"]
    assert [p.name for p in ds.skipped] == ["z_bad.png"]
    assert "z_bad.png" in caplog.text


def test_truncated_jpeg_needs_full_check(image_dir):
    data = (image_dir / "c.jpg").read_bytes()
    (image_dir / "c.jpg").write_bytes(data[: len(data) // 2])
    ds = ImageFolderDataset(image_dir, image_size=16)  # verify() is a header check only
    with pytest.raises(ValueError, match="c.jpg"):
        ds[1]
    with pytest.raises(ValueError, match="c.jpg"):
        ImageFolderDataset(image_dir, image_size=16, full_check=True)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError) as err:
        ImageFolderDataset(tmp_path / "empty")
    assert "empty" in str(err.value) and ".png" in str(err.value)


def test_duplicate_keys_refused(tmp_path):
    _save(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    _save(tmp_path / "a.jpg", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="share a key"):
        ImageFolderDataset(tmp_path, image_size=4)


def test_manifest_selects_in_its_order(image_dir, tmp_path):
    manifest = tmp_path / "test_split.txt"
    manifest.write_text("# evaluation split\nsub/a.png\n\nb.png\n")
    ds = ImageFolderDataset(image_dir, image_size=16, manifest=manifest)
    assert ds.keys == ["sub/a", "b"]
    manifest.write_text("b.png\nmissing.png\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ImageFolderDataset(image_dir, manifest=manifest)


# ------------------------------------------------------------------------------------------------------------ shards


def test_shards_round_trip_equals_folder(image_dir, tmp_path):
    import webdataset as wds

    ds = ImageFolderDataset(image_dir, image_size=16)
    write_shards(ds, tmp_path / "shards", samples_per_shard=3)
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["num_samples"] == 4 and list(index["shards"].values()) == [["b", "c", "d"], ["sub/a"]]
    sd = ShardIndexDataset(tmp_path / "shards")
    assert sd.keys == ds.keys
    for i in reversed(range(len(ds))):  # random access, any order, pixel-exact
        s = sd[i]
        assert s["key"] == ds.keys[i] and torch.equal(s["image"], ds[i]["image"])
        assert s["meta"]["path"] == ds.files[i]
    assert sd.index_of("sub/a") == 3
    write_shards(ds, tmp_path / "again", samples_per_shard=3)  # fixed mtime: the same data gives the same bytes
    assert all(Path(u).read_bytes() == (tmp_path / "again" / Path(u).name).read_bytes() for u in sd.urls)
    # the shards are plain webdataset shards too
    with warnings.catch_warnings():  # webdataset 1.0.2 leaves the last shard's file to the garbage collector
        warnings.simplefilter("ignore", ResourceWarning)
        streamed = list(wds.WebDataset(sd.urls, shardshuffle=False).decode("torchrgb"))
        gc.collect()
    assert [s["__key__"] for s in streamed] == ds.keys
    assert torch.equal(streamed[0]["png"], ds[0]["image"])


def test_shards_grayscale_and_float(image_dir, tmp_path):
    gray = ImageFolderDataset(image_dir, image_size=16, mode="L")
    sd = ShardIndexDataset(write_shards(gray, tmp_path / "gray", samples_per_shard=2))
    assert all(torch.equal(sd[i]["image"], gray[i]["image"]) for i in range(len(gray)))
    phantoms = CTPhantomDataset(3, seed=1, size=32)
    sp = ShardIndexDataset(write_shards(phantoms, tmp_path / "ct", samples_per_shard=2, image_format="npy"))
    assert all(torch.equal(sp[i]["image"], phantoms[i]["image"]) for i in range(3))


def test_shard_errors(image_dir, tmp_path):
    ds = ImageFolderDataset(image_dir, image_size=8)
    out = tmp_path / "shards"
    with pytest.raises(FileNotFoundError, match="index.json"):
        ShardIndexDataset(out)
    write_shards(ds, out, samples_per_shard=2)
    with pytest.raises(FileExistsError):
        write_shards(ds, out, samples_per_shard=2)
    write_shards(ds, out, samples_per_shard=4, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar"]
    # duplicate keys in an index
    index = json.loads((out / "index.json").read_text())
    index["shards"]["shard-000000.tar"][1] = "b"
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="duplicate keys"):
        ShardIndexDataset(out)
    # a listed shard that is missing
    (out / "shard-000000.tar").unlink()
    with pytest.raises(FileNotFoundError, match="shard-000000.tar"):
        ShardIndexDataset(out)


def test_write_shards_refuses_duplicate_and_bad_keys(tmp_path):
    img = torch.zeros(1, 4, 4)
    samples = [{"key": "x", "image": img}, {"key": "y", "image": img}, {"key": "x", "image": img}]
    with pytest.raises(ValueError, match="duplicate sample key 'x'"):
        write_shards(samples, tmp_path / "dup", samples_per_shard=1)  # found while writing ...
    assert not list((tmp_path / "dup").glob("*.tar"))  # ... and the partial shards are removed
    with pytest.raises(ValueError, match="webdataset key"):
        write_shards([{"key": "scan.v2", "image": img}], tmp_path / "dot")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_shards([{"key": "hot", "image": img + 2}], tmp_path / "range")


def _npy_shards(out: Path, n: int = 3) -> ShardIndexDataset:
    samples = [{"key": f"s{i}", "image": torch.full((1, 2, 2), 0.25 * (i + 1))} for i in range(n)]
    write_shards(samples, out, samples_per_shard=2, image_format="npy")
    return ShardIndexDataset(out)


def _poke_last_value(ds: ShardIndexDataset, index: int, value: float) -> Path:
    """Overwrite the last float32 of sample ``index``'s npy member in place (the index offsets stay valid)."""
    name, (img_off, img_size, _, _) = ds._where[index]
    with open(ds.root / name, "r+b") as f:
        f.seek(img_off + img_size - 4)
        f.write(np.float32(value).tobytes())
    return ds.root / name


@pytest.mark.parametrize("value, problem", [(float("nan"), "1 NaN/Inf value"), (float("inf"), "1 NaN/Inf value"),
                                            (1.5, r"values lie in \[0.5, 1.5\], outside the allowed range \[0, 1\]")])
def test_bad_values_in_a_shard_name_the_key_member_and_shard(tmp_path, value, problem):
    from webdataset import tarfile_samples

    ds = _npy_shards(tmp_path / "shards")
    shard = _poke_last_value(ds, 1, value)
    where = rf"sample 's1' \(member s1.npy of shard '{re.escape(str(shard))}'\)"
    with pytest.raises(UserError, match=rf"{where}: image has {problem}.*make_shards.py --overwrite"
                       if "NaN" in problem else rf"{where}: image {problem}.*make_shards.py --overwrite"):
        ds[1]
    assert ds[0]["image"].shape == (1, 2, 2)  # the other samples still read
    with pytest.raises(UserError, match=rf"shards in .* are invalid: {where}"):
        validate_shards(tmp_path / "shards")
    raw = [s for s in tarfile_samples([{"url": str(shard)}]) if s["__key__"] == "s1"]  # the training stream's path
    with pytest.raises(UserError, match=where):
        decode_shard_sample(raw[0])


def test_write_shards_refuses_nan_naming_key_and_file(image_dir, tmp_path):
    class WithNaN(ImageFolderDataset):
        def __getitem__(self, index):
            item = super().__getitem__(index)
            if item["key"] == "d":
                item["image"][0, 0, 0] = float("nan")
            return item

    ds = WithNaN(image_dir, image_size=8)
    for fmt in ("png", "npy"):  # png used to write the NaN as 0, npy as NaN, both silently
        path = re.escape(str(image_dir / "d.png"))
        with pytest.raises(UserError, match=rf"sample 'd' \(file '{path}'\): image has 1 NaN/Inf value"):
            write_shards(ds, tmp_path / fmt, samples_per_shard=2, image_format=fmt)
        assert not list((tmp_path / fmt).glob("*.tar"))


def _rgba(path: Path, alpha: int) -> None:
    arr = np.full((6, 6, 4), 90, np.uint8)
    arr[..., 3] = 255
    arr[2, 3, 3] = alpha
    _save(path, arr)


def test_translucent_alpha_warns_once_naming_the_files(tmp_path):
    root = tmp_path / "imgs"
    _rgba(root / "a.png", 255)  # opaque: dropped without a word
    _rgba(root / "b.png", 0)
    _rgba(root / "c.png", 128)
    _save(root / "d.png", np.stack([np.full((6, 6), 200, np.uint8), np.full((6, 6), 255, np.uint8)], -1))  # LA
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = ImageFolderDataset(tmp_path / "imgs", image_size=None)
        quiet[0], quiet[3]
    ds = ImageFolderDataset(root, image_size=None)  # cheap check: warned when the first translucent file is read
    with pytest.warns(UserWarning, match=r"image '.*b.png' \(sample 'b'\) has a non-opaque alpha channel, which is "
                                         r"dropped when it is converted to RGB.*a.png, b.png, c.png.*flatten"):
        for i in range(len(ds)):
            ds[i]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per dataset
        ds[2]
    torch.testing.assert_close(ds[1]["image"], torch.full((3, 6, 6), 90 / 255))  # colours kept, alpha dropped
    with pytest.warns(UserWarning) as record:  # full check: at construction, exactly the translucent files
        ImageFolderDataset(root, image_size=None, mode="L", full_check=True)
    (message,) = [str(w.message) for w in record if "alpha" in str(w.message)]
    assert message.startswith(f"2 image(s) under {str(root)!r} have a non-opaque alpha channel")
    assert "converted to L: b.png, c.png;" in message


def test_float_image_outside_unit_range_names_key_and_file(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(root / "ok.tif")
    Image.fromarray(np.full((4, 4), 2.0, np.float32)).save(root / "hot.tif")
    ds = ImageFolderDataset(root, image_size=None, mode="L", extensions=(".tif",))
    torch.testing.assert_close(ds[1]["image"], torch.full((1, 4, 4), 0.5))  # float taken as is, not quantised
    path = re.escape(str(root / "hot.tif"))
    with pytest.raises(UserError, match=rf"sample 'hot': image '{path}': image values lie in \[2, 2\]"):
        ds[0]


# ---------------------------------------------------------------------------------------------------------- phantoms


def test_phantoms_deterministic_and_structured():
    a = random_ellipses_phantom(7, seed=3, size=64)
    assert a.shape == (1, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, random_ellipses_phantom(7, seed=3, size=64))
    assert not torch.equal(a, random_ellipses_phantom(8, seed=3, size=64))
    assert not torch.equal(a, random_ellipses_phantom(7, seed=4, size=64))
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert a[0, 0, 0] == 0 and a[0, 32, 32] > 0  # background outside the head, tissue inside
    assert (a == 1.0).any() and len(torch.unique(a)) >= 4  # a skull and several inner intensities
    ds = CTPhantomDataset(50, seed=3, size=64)
    assert len(ds) == 50 and ds[42]["key"] == "phantom_00042" and ds.keys[7] == "phantom_00007"
    assert torch.equal(ds[7]["image"], a)


# ------------------------------------------------------------------------------------------------ exact rank splits


@pytest.mark.parametrize("split", ["strided", "contiguous"])
def test_rank_indices_exact_cover(split):
    for world in range(1, 5):
        for n in range(12):
            shares = [rank_indices(n, r, world, split) for r in range(world)]
            flat = [i for s in shares for i in s]
            assert sorted(flat) == list(range(n)), (world, n)  # every index once: no duplicates, no padding
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            if split == "contiguous":
                assert flat == list(range(n))
    assert rank_indices(10, 1, 4) == [1, 5, 9]
    with pytest.raises(ValueError):
        rank_indices(10, 4, 4)


def test_skip_finished_and_exact_evaluation(image_dir, tmp_path):
    keys = ["k0", "k1", "k2", "k3", "k4"]
    assert skip_finished([0, 2, 4], keys, {"k2", "k3"}) == [0, 4]
    # exact evaluation over 3 "ranks" of an indexed shard dataset: each key once
    sd = ShardIndexDataset(write_shards(ImageFolderDataset(image_dir, image_size=8), tmp_path / "s", 3))
    seen = []
    for rank in range(3):
        loader = DataLoader(Subset(sd, rank_indices(len(sd), rank, 3)), batch_size=2)
        seen += [k for batch in loader for k in batch["key"]]
    assert sorted(seen) == sorted(sd.keys) and len(seen) == len(set(seen))
