"""data_prep CLIs: phantoms -> files -> shards -> ShardIndexDataset (called through main(argv))."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import user_error
import torch
from PIL import Image

from diffinv_pl.data.phantoms import phantom_key, random_ellipses_phantom
from diffinv_pl.data.shards import ShardIndexDataset, validate_shards

REPO = Path(__file__).resolve().parents[1]
DATA_PREP = REPO / "data_prep"


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


def test_overwrite_refused(tmp_path, capsys):
    src, out = tmp_path / "phantoms", tmp_path / "shards"
    argv = ["--output-root", str(src), "--num-images", "2", "--size", "16", "--seed", "0"]
    phantoms_cli.main(argv)
    target = src / f"{phantom_key(1)}.png"
    target.write_bytes(b"sentinel")
    err = user_error(phantoms_cli.main, argv + ["--num-images", "3", "--seed", "1"], capsys)
    assert "already exist" in err and "--overwrite" in err
    assert target.read_bytes() == b"sentinel" and not (src / f"{phantom_key(2)}.png").exists()  # nothing written
    phantoms_cli.main(argv + ["--overwrite"])
    assert target.read_bytes() != b"sentinel"

    shard_argv = ["--images", str(src), "--output", str(out), "--samples-per-shard", "1", "--grayscale"]
    shards_cli.main(shard_argv)
    err = user_error(shards_cli.main, shard_argv, capsys)
    assert str(out) in err and "--overwrite" in err
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
    with pytest.raises(
        ValueError,
        match=r"sample 'phantom_00003' \(member phantom_00003.png of shard .*shard-000001.tar'\): PNG does not decode"
        r".*make_shards.py --overwrite",
    ):
        validate_shards(out)
    err = user_error(shards_cli.main, ["--validate", str(out)], capsys)
    assert "phantom_00003" in err


def test_corrupt_input_images_fail_or_are_skipped(tmp_path, capsys):
    src, out = tmp_path / "phantoms", tmp_path / "shards"
    phantoms_cli.main(["--output-root", str(src), "--num-images", "3", "--size", "16", "--seed", "0"])
    bad = src / f"{phantom_key(1)}.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: header fine, pixel data missing
    argv = ["--images", str(src), "--output", str(out), "--samples-per-shard", "2", "--grayscale"]
    err = user_error(shards_cli.main, argv, capsys)
    assert "phantom_00001.png" in err and "--corrupt skip" in err
    assert not out.exists() or not list(out.iterdir())
    assert shards_cli.main(argv + ["--corrupt", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "skipped unreadable image" in printed and "phantom_00001.png" in printed
    assert ShardIndexDataset(out).keys == [phantom_key(0), phantom_key(2)]


def _npy_folder(root: Path) -> dict[str, Path]:
    """ok.npy in [0, 1], nan.npy with one NaN, range.npy with values up to ~3."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ok = rng.random((1, 4, 4), dtype=np.float32)
    nan, big = ok.copy(), ok * 3 + 0.1
    nan[0, 1, 2] = np.nan
    files = {"ok": root / "ok.npy", "nan": root / "nan.npy", "range": root / "range.npy"}
    for name, arr in (("ok", ok), ("nan", nan), ("range", big)):
        np.save(files[name], arr)
    return files


def test_make_shards_script_refuses_nan_arrays_with_one_error_line(tmp_path):
    """A user mistake in a data_prep script run as a program: exit status 2, one ``error:`` line naming every bad
    file and the fix, no traceback, nothing written (NaN arrays used to be packed silently)."""
    files = _npy_folder(tmp_path / "arrays")
    out = tmp_path / "shards"
    argv = ["--images", str(tmp_path / "arrays"), "--output", str(out), "--samples-per-shard", "2",
            "--input-format", "npy", "--format", "npy"]
    run = subprocess.run([sys.executable, str(DATA_PREP / "make_shards.py"), *argv], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert [line for line in run.stderr.splitlines() if "error:" in line] == [run.stderr.splitlines()[0]]
    assert run.stderr.startswith("error: 2 of 3 .npy file(s)")
    assert f"sample 'nan' (file {str(files['nan'])!r}): image has 1 NaN/Inf value(s)" in run.stderr
    assert f"sample 'range' (file {str(files['range'])!r}): image values lie in" in run.stderr
    assert "outside the allowed range [0, 1]" in run.stderr and "clean or remove the file" in run.stderr
    assert str(files["ok"]) not in run.stderr
    assert not out.exists()


def test_make_shards_missing_input_is_one_line(tmp_path, capsys):
    argv = ["--images", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--samples-per-shard", "2"]
    err = user_error(shards_cli.main, argv, capsys)
    assert str(tmp_path / "nope") in err and "does not exist" in err and err.count("\n") == 1
    err = user_error(shards_cli.main, [*argv, "--input-format", "npy"], capsys)
    assert "--images" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    err = user_error(shards_cli.main, ["--images", str(tmp_path / "empty"), *argv[2:]], capsys)
    assert "no images with extensions" in err
    err = user_error(shards_cli.main, ["--validate", str(tmp_path / "nope")], capsys)
    assert "no shard index" in err and "make_shards.py" in err


def test_make_shards_warns_once_about_dropped_alpha(tmp_path):
    src, out = tmp_path / "rgba", tmp_path / "shards"
    src.mkdir()
    rgba = np.full((8, 8, 4), 200, np.uint8)
    for i in range(7):  # 7 translucent files (listed: first 5 + count), one opaque RGBA, one RGB
        rgba[0, 0, 3] = 10 * i
        Image.fromarray(rgba, "RGBA").save(src / f"t{i}.png")
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(src / "opaque.png")
    Image.fromarray(rgba[..., :3], "RGB").save(src / "rgb.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert shards_cli.main(["--images", str(src), "--output", str(out), "--samples-per-shard", "4"]) == 0
    alpha = [w for w in caught if "alpha" in str(w.message)]
    assert len(alpha) == 1 and issubclass(alpha[0].category, UserWarning)
    message = str(alpha[0].message)
    assert "7 image(s)" in message and "t0.png, t1.png" in message and "(7 in all)" in message
    assert "opaque.png" not in message and "rgb.png" not in message and "flatten" in message
    assert len(ShardIndexDataset(out)) == 9
