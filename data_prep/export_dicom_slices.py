"""Export CT DICOM slices as HU-windowed 8-bit PNG (or float32 NPY) images, one folder per series.

    python data_prep/export_dicom_slices.py --input DIR --output DIR
        [--window-center 40 --window-width 400 | --window abdomen|lung|bone|soft_tissue|brain]
        [--size S] [--format png|npy] [--skip-invalid] [--overwrite]

Input: every regular file under ``--input``, recursively, sorted; hidden files and folders and DICOMDIR index files
are skipped. A file must be DICOM Part 10 (128-byte preamble + "DICM"; read with ``pydicom``, no ``force``) holding
one single-frame, single-sample (grayscale) image whose pixel data pydicom can decode. Any other file is an error
naming it; ``--skip-invalid`` leaves such files out and lists them after the summary. Every file is read and
decoded once to check it before anything is written, and again when it is exported.

Hounsfield units: ``HU = RescaleSlope * stored + RescaleIntercept`` (slope 1 and intercept 0 where the tags are
absent; stored values as pydicom decodes them, signed or unsigned per PixelRepresentation). With ``--size S`` the
HU image is resized, shorter side to ``S`` pixels (bicubic, antialiased: PIL float mode via torchvision, as
``ImageFolderDataset`` does), then centre cropped to ``S x S``; without it slices keep their native size.
Pixels are taken as square (PixelSpacing is not used), as they are in practically all CT slices.

Window (center ``c``, width ``w``, both in HU): ``v = clip((HU - (c - w / 2)) / w, 0, 1)``, i.e. linear from
``c - w/2`` (black, 0) to ``c + w/2`` (white, 1). This is the plain linear ramp, not DICOM's VOI LUT function
(which uses ``c - 0.5`` and ``w - 1``); VOI LUT tags and PhotometricInterpretation are ignored, so higher HU is
always brighter. Presets ``--window NAME`` (``c``, ``w``) in HU, usual radiology values (e.g. Radiopaedia,
"Windowing (CT)"):

    abdomen      (40, 400)     soft_tissue  (50, 350)     lung  (-600, 1500)
    bone         (400, 1800)   brain        (40, 80)

The default is ``--window-center 40 --window-width 400`` (= abdomen).

Output, per series (key: SeriesInstanceUID; where that tag is absent or not a valid UID, the file's folder
relative to ``--input``, or the input folder's own name for top-level files), slices sorted by position along the
slice normal, ``ImagePositionPatient . (row x column direction of ImageOrientationPatient)`` in mm
(``ImagePositionPatient[2]`` without orientation; both are z for axial slices), else by InstanceNumber, else by
file path, ties broken by InstanceNumber then path: ``OUT/<series>/<index:04d>.png`` (index from 0; 8-bit
grayscale, value ``round(255 v)``) or ``.npy`` (float32 array ``(1, H, W)`` of ``v`` in [0, 1], exact).
``OUT/slices.csv`` lists one row per exported file: file (relative to ``OUT``), source (relative to ``--input``),
series, instance_number, position_mm, slope, intercept, window_center, window_width. Each file is written to a
hidden temporary file and moved into place with ``os.replace``; existing outputs (any target file or
``slices.csv``) are never replaced unless ``--overwrite`` is given, and that check covers every target before
anything is written. ``--output`` may not lie inside ``--input`` (its files would be read back as input). A refusal
prints one ``error: ...`` line naming the fix and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from diffinv_pl.errors import UserError, UserFileError, report_user_errors
from diffinv_pl.utils.io import atomic_write_text, csv_text, save_npy, save_png

WINDOW_PRESETS: dict[str, tuple[float, float]] = {  # name -> (center, width) in HU
    "abdomen": (40.0, 400.0),
    "soft_tissue": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_WINDOW = WINDOW_PRESETS["abdomen"]
FORMATS = ("png", "npy")


@dataclass(frozen=True)
class SliceInfo:
    """One valid DICOM slice: where it is and the tags needed to order it and convert it to HU."""

    path: Path
    source: str  # path relative to the input folder (POSIX)
    series: str  # SeriesInstanceUID, or the folder fallback (module docstring)
    instance_number: int | None
    position: float | None  # mm along the slice normal (module docstring); None without ImagePositionPatient
    slope: float
    intercept: float


def apply_window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """``clip((hu - (center - width / 2)) / width, 0, 1)`` as float32 (HU in, [0, 1] out; ``width`` > 0)."""
    if width <= 0:
        raise UserError(f"window width must be > 0 HU, got {width}")
    low = center - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float64) - low) / width, 0.0, 1.0).astype(np.float32)


def _read(path: Path):
    """The decoded dataset and its pixel array; UserError naming the file when it is not a usable CT slice."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise UserError(f"{str(path)!r} is not a DICOM file ({e})") from e
    except Exception as e:  # truncated / malformed files raise assorted errors; report them, never swallow
        raise UserError(f"{str(path)!r} cannot be read as DICOM ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds:
        raise UserError(f"{str(path)!r} is DICOM but has no pixel data (SOP class {ds.get('SOPClassUID', '?')})")
    frames, samples = int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("SamplesPerPixel", 1))
    if frames != 1 or samples != 1:
        raise UserError(
            f"{str(path)!r} has {frames} frame(s) of {samples} sample(s) per pixel; only single-frame grayscale "
            "slices are supported"
        )
    try:
        pixels = ds.pixel_array
    except Exception as e:  # e.g. a compressed transfer syntax without a decoder plugin; pydicom names the fix
        raise UserError(f"{str(path)!r}: cannot decode pixel data ({type(e).__name__}: {e})") from e
    return ds, pixels


def read_slice_info(path: Path, input_dir: Path) -> SliceInfo:
    """Check one file (decodes its pixels) and return its ordering and rescale tags."""
    ds, _ = _read(path)
    rel = path.relative_to(input_dir)
    folder = rel.parent.as_posix()
    uid = UID(str(ds.get("SeriesInstanceUID", "")))
    series = str(uid) if uid.is_valid else (folder if folder != "." else input_dir.resolve().name)
    position = None
    if "ImagePositionPatient" in ds:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        if "ImageOrientationPatient" in ds:
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            position = float(np.cross(iop[:3], iop[3:]) @ ipp)
        else:
            position = float(ipp[2])
    number = ds.get("InstanceNumber")
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    return SliceInfo(
        path=path,
        source=rel.as_posix(),
        series=series,
        instance_number=int(number) if number not in (None, "") else None,
        position=position,
        slope=float(slope) if slope not in (None, "") else 1.0,
        intercept=float(intercept) if intercept not in (None, "") else 0.0,
    )


def collect_series(input_dir: Path, skip_invalid: bool) -> tuple[dict[str, list[SliceInfo]], dict[Path, str]]:
    """Valid slices grouped by series and sorted (module docstring), plus ``{invalid file: reason}`` when skipping.

    Raises UserFileError for a missing folder, UserError when it has no files, when a file is invalid and
    ``skip_invalid`` is False (one error listing every invalid file), or when no valid slice remains.
    """
    if not input_dir.is_dir():
        raise UserFileError(
            f"input folder {str(input_dir)!r} does not exist or is not a directory; pass the folder holding the "
            "DICOM files as --input"
        )
    files = sorted(
        p for p in input_dir.rglob("*")
        if p.is_file() and p.name.upper() != "DICOMDIR"
        and not any(part.startswith(".") for part in p.relative_to(input_dir).parts)
    )
    if not files:
        raise UserError(f"no files under {str(input_dir)!r}; pass the folder holding the DICOM files as --input")
    series: dict[str, list[SliceInfo]] = {}
    invalid: dict[Path, str] = {}
    for path in files:
        try:
            info = read_slice_info(path, input_dir)
        except ValueError as e:  # UserError from _read, or a malformed tag value
            invalid[path] = str(e)
            continue
        series.setdefault(info.series, []).append(info)
    if invalid and not skip_invalid:
        listing = "\n".join(f"  {reason}" for reason in invalid.values())
        raise UserError(
            f"{len(invalid)} of {len(files)} file(s) under {str(input_dir)!r} are not usable DICOM slices:\n"
            f"{listing}\n(pass --skip-invalid to leave them out)"
        )
    if not series:
        raise UserError(
            f"no usable DICOM slices under {str(input_dir)!r} ({len(invalid)} invalid file(s) skipped); pass the "
            "folder holding the CT slices as --input"
        )
    return {uid: sort_slices(slices) for uid, slices in sorted(series.items())}, invalid


def sort_slices(slices: list[SliceInfo]) -> list[SliceInfo]:
    """By position when every slice has one, else by InstanceNumber when every slice has one, else by path."""
    def number(s: SliceInfo) -> int:
        return s.instance_number if s.instance_number is not None else 0

    if all(s.position is not None for s in slices):
        return sorted(slices, key=lambda s: (s.position, number(s), s.source))
    if all(s.instance_number is not None for s in slices):
        return sorted(slices, key=lambda s: (number(s), s.source))
    return sorted(slices, key=lambda s: s.source)


def load_hu(info: SliceInfo, size: int | None) -> np.ndarray:
    """The slice in HU as float32 ``(H, W)``; with ``size``: shorter side resized to it, centre crop ``size^2``."""
    _, pixels = _read(info.path)
    hu = (pixels.astype(np.float64) * info.slope + info.intercept).astype(np.float32)
    if size is None or hu.shape == (size, size):
        return hu
    from torchvision.transforms import functional as TF

    img = Image.fromarray(hu)  # mode "F"
    img = TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return np.asarray(TF.center_crop(img, [size, size]), dtype=np.float32)


def write_slice(path: Path, v: np.ndarray, fmt: str) -> None:
    """Windowed values ``v`` (H, W) in [0, 1]: 8-bit grayscale PNG ``round(255 v)`` or float32 ``(1, H, W)`` NPY."""
    if fmt == "npy":
        save_npy(path, v[None].astype(np.float32))
    else:
        save_png(path, torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))[None])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path, help="folder of DICOM files (searched recursively)")
    p.add_argument("--output", required=True, type=Path, help="output folder: <series>/<index>.png and slices.csv")
    p.add_argument("--window-center", type=float, default=None, help=f"in HU (default {DEFAULT_WINDOW[0]:g})")
    p.add_argument("--window-width", type=float, default=None, help=f"in HU, > 0 (default {DEFAULT_WINDOW[1]:g})")
    p.add_argument(
        "--window", choices=sorted(WINDOW_PRESETS), default=None,
        help="preset (center, width) in HU: "
        + ", ".join(f"{k} {c:g}/{w:g}" for k, (c, w) in WINDOW_PRESETS.items()),
    )
    p.add_argument("--size", type=int, default=None, help="resize shorter side + centre crop to S (default: native)")
    p.add_argument("--format", choices=FORMATS, default="png", help="png (8-bit) or npy (float32 in [0, 1])")
    p.add_argument("--skip-invalid", action="store_true", help="skip (and list) files that are not usable DICOM")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    return p


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.window is not None and (args.window_center is not None or args.window_width is not None):
        parser.error("give either --window or --window-center/--window-width, not both")
    if args.window is not None:
        center, width = WINDOW_PRESETS[args.window]
    else:
        center = DEFAULT_WINDOW[0] if args.window_center is None else args.window_center
        width = DEFAULT_WINDOW[1] if args.window_width is None else args.window_width
    if width <= 0:
        parser.error(f"--window-width must be > 0 HU, got {width:g}")
    if args.size is not None and args.size < 1:
        parser.error(f"--size must be >= 1, got {args.size}")
    out: Path = args.output
    if out.resolve() == args.input.resolve() or args.input.resolve() in out.resolve().parents:
        raise UserError(
            f"--output {str(out)!r} lies inside --input {str(args.input)!r}; its files would be read back as "
            "invalid DICOM on the next run -- choose an output folder outside the input"
        )
    series, invalid = collect_series(args.input, args.skip_invalid)
    plan = [
        (f"{uid}/{index:04d}.{args.format}", info)
        for uid, slices in series.items()
        for index, info in enumerate(slices)
    ]
    existing = [p for p in [out / rel for rel, _ in plan] + [out / "slices.csv"] if p.exists()]
    if existing and not args.overwrite:
        raise UserError(
            f"{len(existing)} output file(s) already exist (first: {str(existing[0])!r}); pass --overwrite "
            "to replace them, or choose another --output"
        )
    rows = []
    for rel, info in plan:
        write_slice(out / rel, apply_window(load_hu(info, args.size), center, width), args.format)
        rows.append({
            "file": rel, "source": info.source, "series": info.series, "instance_number": info.instance_number,
            "position_mm": info.position, "slope": info.slope, "intercept": info.intercept,
            "window_center": center, "window_width": width,
        })
    atomic_write_text(out / "slices.csv", csv_text(rows))
    size = f"{args.size}x{args.size}" if args.size is not None else "native size"
    print(
        f"wrote {len(plan)} slices from {len(series)} series ({size}, window {center:g}/{width:g} HU, "
        f"{args.format}) to {out}; skipped {len(invalid)} invalid file(s); index {out / 'slices.csv'}"
    )
    for reason in invalid.values():
        print(f"  skipped {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
