"""data_prep CLIs: phantoms -> files -> shards -> ShardIndexDataset (called through main(argv))."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from diffinv_pl.data.phantoms import phantom_key, random_ellipses_phantom
from diffinv_pl.data.shards import ShardIndexDataset, validate_shards

DATA_PREP = Path(__file__).resolve().parents[1] / "data_prep"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"data_prep_{name}", DATA_PREP / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


phantoms_cli = _load("make_ct_phantoms")
shards_cli = _load("make_shards")


def test_png_phantoms_to_shards_round_trip(tmp_path, capsys):
    src, out = tmp_path / "phantoms", tmp_path / "shards"
    assert phantoms_cli.main(["--output-root", str(src), "--num-images", "5", "--size", "32", "--seed", "3"]) == 0
    keys = [phantom_key(i) for i in range(5)]
    assert sorted(p.name for p in src.iterdir()) == [f"{k}.png" for k in keys]
    argv = ["--images", str(src), "--output", str(out), "--samples-per-shard", "2", "--grayscale", "--format", "npy"]
    assert shards_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "5 samples" in printed and str(out / "index.json") in printed
    ds = ShardIndexDataset(out)
    assert len(ds) == 5 and ds.keys == keys and len(ds.urls) == 3
    for i in (0, 4):
        s = ds[i]
        ref = random_ellipses_phantom(i, 3, 32)
        assert s["image"].shape == (1, 32, 32)
        assert float((s["image"] - ref).abs().max()) <= 0.5 / 65535 + 1e-7  # 16-bit PNG quantisation only


def test_npy_phantoms_to_shards_exact(tmp_path):
    src, out = tmp_path / "phantoms", tmp_path / "shards"
    phantoms_cli.main(
        ["--output-root", str(src), "--num-images", "3", "--size", "16", "--seed", "1", "--format", "npy"]
    )
    arr = np.load(src / f"{phantom_key(2)}.npy")
    assert arr.dtype == np.float32 and arr.shape == (1, 16, 16)
    shards_cli.main(["--images", str(src), "--output", str(out), "--samples-per-shard", "10", "--input-format", "npy",
                     "--format", "npy"])
    ds = ShardIndexDataset(out)
    assert ds.keys == [phantom_key(i) for i in range(3)]
    assert torch.equal(ds[2]["image"], random_ellipses_phantom(2, 1, 16))


def test_overwrite_refused(tmp_path):
    src, out = tmp_path / "phantoms", tmp_path / "shards"
    argv = ["--output-root", str(src), "--num-images", "2", "--size", "16", "--seed", "0"]
    phantoms_cli.main(argv)
    target = src / f"{phantom_key(1)}.png"
    target.write_bytes(b"sentinel")
    with pytest.raises(SystemExit) as e:
        phantoms_cli.main(argv + ["--num-images", "3", "--seed", "1"])
    assert e.value.code != 0
    assert target.read_bytes() == b"sentinel" and not (src / f"{phantom_key(2)}.png").exists()  # nothing written
    phantoms_cli.main(argv + ["--overwrite"])
    assert target.read_bytes() != b"sentinel"

    shard_argv = ["--images", str(src), "--output", str(out), "--samples-per-shard", "1", "--grayscale"]
    shards_cli.main(shard_argv)
    with pytest.raises(SystemExit) as e:
        shards_cli.main(shard_argv)
    assert e.value.code != 0
    assert shards_cli.main(shard_argv + ["--overwrite"]) == 0
    assert len(ShardIndexDataset(out)) == 2


def test_shards_are_validated_after_writing_and_corruption_is_found(tmp_path, capsys):
    src, out = tmp_path / "phantoms", tmp_path / "shards"
    phantoms_cli.main(["--output-root", str(src), "--num-images", "5", "--size", "16", "--seed", "0"])
    assert shards_cli.main(["--images", str(src), "--output", str(out), "--samples-per-shard", "2", "--grayscale"]) == 0
    assert "valid: 5 samples in 3 shard(s): shard-000000.tar 2, shard-000001.tar 2, shard-000002.tar 1" in capsys.readouterr().out
    assert validate_shards(out) == {"shard-000000.tar": 2, "shard-000001.tar": 2, "shard-000002.tar": 1}

    # corrupt the PNG bytes of one sample in place (same length, so the index offsets still point at it)
    ds = ShardIndexDataset(out)
    name, (img_off, img_size, _, _) = ds._where[3]
    with open(out / name, "r+b") as f:
        f.seek(img_off + 8)
        f.write(b"\0" * 16)
    with pytest.raises(ValueError, match=r"sample 'phantom_00003' in .*shard-000001.tar.*PNG does not decode"):
        validate_shards(out)
    assert shards_cli.main(["--validate", str(out)]) == 1
    assert "phantom_00003" in capsys.readouterr().err


def test_corrupt_input_images_fail_or_are_skipped(tmp_path, capsys):
    src, out = tmp_path / "phantoms", tmp_path / "shards"
    phantoms_cli.main(["--output-root", str(src), "--num-images", "3", "--size", "16", "--seed", "0"])
    bad = src / f"{phantom_key(1)}.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: header fine, pixel data missing
    argv = ["--images", str(src), "--output", str(out), "--samples-per-shard", "2", "--grayscale"]
    with pytest.raises(ValueError, match="phantom_00001.png"):
        shards_cli.main(argv)
    assert not out.exists() or not list(out.iterdir())
    assert shards_cli.main(argv + ["--corrupt", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "skipped unreadable image" in printed and "phantom_00001.png" in printed
    assert ShardIndexDataset(out).keys == [phantom_key(0), phantom_key(2)]
