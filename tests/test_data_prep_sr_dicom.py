"""data_prep CLIs: super-resolution folder preparation and DICOM slice export (called through main(argv))."""

from __future__ import annotations

import csv
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import user_error
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from diffinv_pl.data.images import ImageFolderDataset, load_image

DATA_PREP = Path(__file__).resolve().parents[1] / "data_prep"



def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"data_prep_{name}", DATA_PREP / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is being created
    spec.loader.exec_module(mod)
    return mod


sr_cli = _load("prepare_super_resolution_dataset")
dicom_cli = _load("export_dicom_slices")


# ----------------------------------------------------------------------------------------- super-resolution folders


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _make_splits(tmp_path: Path) -> tuple[Path, Path]:
    train, test = tmp_path / "raw_train", tmp_path / "raw_test"
    (train / "sub").mkdir(parents=True)
    test.mkdir()
    Image.fromarray(_rgb(40, 60, 0)).save(train / "a.png")
    Image.fromarray(_rgb(50, 30, 1)).save(train / "sub" / "b.jpg", quality=95)
    Image.fromarray(_rgb(32, 32, 2)).save(train / "c.PNG")  # already at the target size: must round-trip exactly
    Image.fromarray(_rgb(32, 32, 3)).save(train / ".hidden.png")  # hidden: ignored
    (train / "notes.txt").write_text("not an image")  # other extension: ignored
    Image.fromarray(_rgb(64, 48, 4)[..., 0]).save(test / "d.png")  # grayscale input
    return train, test


def _sr_argv(train: Path, test: Path, out: Path, *extra: str) -> list[str]:
    return ["--train-dir", str(train), "--test-dir", str(test), "--output-root", str(out), "--size", "32", *extra]


def test_sr_writes_resized_rgb_pngs_and_manifests(tmp_path, capsys):
    train, test = _make_splits(tmp_path)
    out = tmp_path / "out"
    assert sr_cli.main(_sr_argv(train, test, out, "--write-manifests")) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("train: wrote 3 images (32x32 RGB PNG)") and "skipped 0 corrupt" in printed[0]
    assert printed[1].startswith("test: wrote 1 images")

    written = sorted(p.relative_to(out / "train").as_posix() for p in (out / "train").rglob("*") if p.is_file())
    assert written == ["a.png", "c.png", "sub/b.png"]  # no stray temporary files
    assert (out / "train_images.txt").read_text() == "a.png\nc.png\nsub/b.png\n"
    assert (out / "test_images.txt").read_text() == "d.png\n"
    for rel, src in (("a.png", "a.png"), ("sub/b.png", "sub/b.jpg"), ("c.png", "c.PNG")):
        with Image.open(out / "train" / rel) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)
            got = np.asarray(im)
        # identical to what evaluation's loader makes of the source, quantised to 8 bits
        expected = np.round(load_image(train / src, "RGB", 32).numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        np.testing.assert_array_equal(got, expected)
    with Image.open(out / "train" / "c.png") as im:
        np.testing.assert_array_equal(np.asarray(im), _rgb(32, 32, 2))  # pixel-exact round trip
    with Image.open(out / "test" / "d.png") as im:
        assert im.mode == "RGB" and im.size == (32, 32)

    ds = ImageFolderDataset(out / "train", image_size=32, manifest=out / "train_images.txt")
    assert ds.keys == ["a", "c", "sub/b"] and ds[2]["image"].shape == (3, 32, 32)


def test_sr_grayscale_gives_one_channel(tmp_path):
    train, test = _make_splits(tmp_path)
    out = tmp_path / "out"
    result = sr_cli.prepare_split(train, out / "train", size=32, grayscale=True, manifest=out / "train.txt")
    assert result.written == ["a.png", "c.png", "sub/b.png"] and result.skipped == []
    with Image.open(out / "train" / "c.png") as im:
        assert im.mode == "L" and im.size == (32, 32)
        expected = np.asarray(Image.fromarray(_rgb(32, 32, 2)).convert("L"))
        np.testing.assert_array_equal(np.asarray(im), expected)
    ds = ImageFolderDataset(out / "train", image_size=32, mode="L", manifest=out / "train.txt")
    assert ds[0]["image"].shape == (1, 32, 32)


def _add_corrupt(folder: Path) -> list[Path]:
    buf = io.BytesIO()
    Image.fromarray(_rgb(40, 40, 5)).save(buf, format="JPEG")
    truncated = folder / "truncated.jpg"  # passes pillow's cheap verify(), fails a full decode
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    garbage = folder / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    return [garbage, truncated]


def test_sr_corrupt_fail_names_every_file_and_writes_nothing(tmp_path, capsys):
    train, test = _make_splits(tmp_path)
    bad = _add_corrupt(train)
    out = tmp_path / "out"
    err = user_error(sr_cli.main, _sr_argv(train, test, out), capsys)
    assert "--train-dir" in err and "2 corrupt image file(s)" in err and "corrupt='skip'" in err
    assert all(str(p) in err for p in bad)
    assert not out.exists()


def test_sr_corrupt_skip_reports_files(tmp_path, capsys):
    train, test = _make_splits(tmp_path)
    bad = _add_corrupt(train)
    out = tmp_path / "out"
    assert sr_cli.main(_sr_argv(train, test, out, "--corrupt", "skip", "--write-manifests")) == 0
    printed = capsys.readouterr().out
    assert "train: wrote 3 images" in printed and "skipped 2 corrupt" in printed
    assert all(f"skipped corrupt file {p}" in printed for p in bad)
    assert (out / "train_images.txt").read_text() == "a.png\nc.png\nsub/b.png\n"


def test_sr_refuses_to_overwrite(tmp_path, capsys):
    train, test = _make_splits(tmp_path)
    out = tmp_path / "out"
    assert sr_cli.main(_sr_argv(train, test, out)) == 0
    target = out / "train" / "a.png"
    target.write_bytes(b"finished result")
    err = user_error(sr_cli.main, _sr_argv(train, test, out), capsys)
    assert "already exist" in err and "--overwrite" in err
    assert target.read_bytes() == b"finished result"
    with pytest.raises(FileExistsError, match="--overwrite"):
        sr_cli.prepare_split(train, out / "train", size=32)
    assert sr_cli.main(_sr_argv(train, test, out, "--overwrite")) == 0
    with Image.open(target) as im:
        assert im.size == (32, 32)


def test_sr_missing_empty_and_overlapping_dirs(tmp_path, capsys):
    train, test = _make_splits(tmp_path)
    missing, empty = tmp_path / "nope", tmp_path / "empty"
    empty.mkdir()
    err = user_error(sr_cli.main, _sr_argv(missing, test, tmp_path / "out"), capsys)
    assert "--train-dir" in err and str(missing) in err and "does not exist" in err
    err = user_error(sr_cli.main, _sr_argv(train, empty, tmp_path / "out"), capsys)
    assert "--test-dir" in err and str(empty) in err and "no images" in err
    assert "overlaps input folder" in user_error(sr_cli.main, _sr_argv(train, test, train / "prepared"), capsys)
    assert not (tmp_path / "out").exists() and not (train / "prepared").exists()


# ------------------------------------------------------------------------------------------------- DICOM export

SERIES = "1.2.826.0.1.3680043.8.498.1"


def _write_ct(
    path: Path,
    hu: np.ndarray,
    *,
    series: str | None = SERIES,
    instance: int | None = None,
    z: float | None = None,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
) -> None:
    """A minimal CT image file: 16-bit signed stored values ``(hu - intercept) / slope``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    if series is not None:
        ds.SeriesInstanceUID = series
    if instance is not None:
        ds.InstanceNumber = instance
    if z is not None:
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    stored = np.round((hu - (intercept or 0.0)) / (slope or 1.0)).astype(np.int16)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


HU = np.array([[-1000, -160, 0, 40], [240, 400, 1000, 3000], [-600, 150, -100, 90]], dtype=np.float64)


def _ct_series(folder: Path) -> None:
    """Three slices whose file names, instance numbers and z positions all disagree; HU + 100 * slice rank."""
    for name, instance, z, rank in (("s1.dcm", 3, 10.0, 2), ("s2.dcm", 1, -5.0, 0), ("s3.dcm", 2, 2.5, 1)):
        _write_ct(folder / "series" / name, HU + 100 * rank, instance=instance, z=z)


def _rows(out: Path) -> list[dict]:
    with open(out / "slices.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_dicom_window_formula_and_order_by_position(tmp_path, capsys):
    src, out = tmp_path / "dicom", tmp_path / "out"
    _ct_series(src)
    argv = ["--input", str(src), "--output", str(out), "--window-center", "40", "--window-width", "400"]
    assert dicom_cli.main([*argv, "--format", "npy"]) == 0
    assert "wrote 3 slices from 1 series" in capsys.readouterr().out
    for rank in range(3):
        v = np.load(out / SERIES / f"{rank:04d}.npy")
        assert v.dtype == np.float32 and v.shape == (1, 3, 4)
        expected = np.clip((HU + 100 * rank - (40 - 200)) / 400, 0, 1).astype(np.float32)
        np.testing.assert_array_equal(v[0], expected)  # ranks 0, 1, 2 = z -5, 2.5, 10
    assert np.load(out / SERIES / "0000.npy")[0, 0, 3] == 0.5  # HU 40 is the window centre
    rows = _rows(out)
    assert [r["source"] for r in rows] == ["series/s2.dcm", "series/s3.dcm", "series/s1.dcm"]
    assert [r["file"] for r in rows] == [f"{SERIES}/{i:04d}.npy" for i in range(3)]
    assert [r["instance_number"] for r in rows] == ["1", "2", "3"]
    assert [float(r["position_mm"]) for r in rows] == [-5.0, 2.5, 10.0]
    assert {(r["slope"], r["intercept"], r["window_center"], r["window_width"]) for r in rows} == {
        ("1.0", "-1024.0", "40.0", "400.0")
    }

    assert dicom_cli.main([*argv, "--output", str(tmp_path / "png")]) == 0
    with Image.open(tmp_path / "png" / SERIES / "0000.png") as im:
        assert im.mode == "L"
        png = np.asarray(im)
    expected = np.round(np.clip((HU + 160) / 400, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(png, expected)
    assert png[0, 3] == 128 and png[0, 1] == 0 and png[1, 0] == 255  # HU 40 -> 0.5 -> 128; -160 -> 0; 240 -> 255


def test_dicom_presets_fallback_series_and_default_rescale(tmp_path, capsys):
    src, out = tmp_path / "dicom", tmp_path / "out"
    # no SeriesInstanceUID, no position, no rescale tags: folder name as series, instance order, HU = stored
    for instance in (2, 1):
        _write_ct(src / "scanB" / f"i{instance}.dcm", HU + instance, series=None, instance=instance, slope=None,
                  intercept=None)
    assert dicom_cli.main(["--input", str(src), "--output", str(out), "--window", "lung", "--format", "npy"]) == 0
    rows = _rows(out)
    assert [r["file"] for r in rows] == ["scanB/0000.npy", "scanB/0001.npy"]
    assert [r["source"] for r in rows] == ["scanB/i1.dcm", "scanB/i2.dcm"]
    assert {(r["slope"], r["intercept"], r["window_center"], r["window_width"]) for r in rows} == {
        ("1.0", "0.0", "-600.0", "1500.0")
    }
    v = np.load(out / "scanB" / "0000.npy")[0]
    np.testing.assert_array_equal(v, np.clip((HU + 1 + 1350) / 1500, 0, 1).astype(np.float32))
    assert v[2, 0] == np.float32(751 / 1500)  # HU -599: lung centre + 1 HU -> 0.5 + 1 / 1500
    assert dicom_cli.WINDOW_PRESETS == {
        "abdomen": (40.0, 400.0), "soft_tissue": (50.0, 350.0), "lung": (-600.0, 1500.0),
        "bone": (400.0, 1800.0), "brain": (40.0, 80.0),
    }
    with pytest.raises(SystemExit):  # a preset and an explicit window together are ambiguous
        dicom_cli.main(["--input", str(src), "--output", str(out), "--window", "bone", "--window-center", "0"])
    assert "not both" in capsys.readouterr().err


def test_dicom_resize_non_square(tmp_path):
    src, out = tmp_path / "dicom", tmp_path / "out"
    hu = np.full((20, 30), 40.0)
    hu[:5] = -1000  # top band of air: kept (the shorter side is not cropped)
    hu[:, :3] = -1000  # left strip of air: 30 -> 24 columns, centre crop keeps 4..19, so it is cropped away
    _write_ct(src / "wide.dcm", hu, instance=1, z=0.0)
    assert dicom_cli.main(["--input", str(src), "--output", str(out), "--size", "16", "--format", "npy"]) == 0
    v = np.load(out / SERIES / "0000.npy")[0]
    assert v.shape == (16, 16)
    assert np.all(v[:2] == 0.0)  # rows 0-1 only see input rows 0-3 (bicubic support 2.5 input pixels): HU -1000
    np.testing.assert_allclose(v[7:], 0.5, atol=1e-5)  # constant HU 40 (window centre); no air column left


def test_dicom_invalid_files_named_or_skipped(tmp_path, capsys):
    src, out = tmp_path / "dicom", tmp_path / "out"
    _ct_series(src)
    notes = src / "series" / "notes.txt"
    notes.write_text("not DICOM")
    no_pixels = src / "report.dcm"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.PatientName = meta, "header only"
    ds.save_as(no_pixels, enforce_file_format=True)
    assert pydicom.dcmread(no_pixels).PatientName == "header only"

    argv = ["--input", str(src), "--output", str(out)]
    err = user_error(dicom_cli.main, argv, capsys)
    assert f"{str(notes)!r} is not a DICOM file" in err
    assert f"{str(no_pixels)!r} is DICOM but has no pixel data" in err
    assert "--skip-invalid" in err and not out.exists()

    assert dicom_cli.main([*argv, "--skip-invalid"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 slices" in printed and "skipped 2 invalid file(s)" in printed and str(notes) in printed
    assert len(_rows(out)) == 3


def test_dicom_refuses_overwrite_and_bad_inputs(tmp_path, capsys):
    src, out = tmp_path / "dicom", tmp_path / "out"
    _ct_series(src)
    argv = ["--input", str(src), "--output", str(out)]
    assert dicom_cli.main(argv) == 0
    first = out / SERIES / "0000.png"
    first.write_bytes(b"finished result")
    err = user_error(dicom_cli.main, argv, capsys)
    assert "already exist" in err and "--overwrite" in err
    assert first.read_bytes() == b"finished result"
    assert dicom_cli.main([*argv, "--overwrite"]) == 0
    with Image.open(first) as im:
        assert im.size == (4, 3)

    missing, empty = tmp_path / "nope", tmp_path / "empty"
    empty.mkdir()
    o2 = str(tmp_path / "o2")
    assert str(missing) in user_error(dicom_cli.main, ["--input", str(missing), "--output", o2], capsys)
    assert "no files under" in user_error(dicom_cli.main, ["--input", str(empty), "--output", o2], capsys)
    assert "inside --input" in user_error(dicom_cli.main, ["--input", str(src), "--output", str(src / "png")], capsys)
