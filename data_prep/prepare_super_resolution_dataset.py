"""Turn train / test folders of PNG/JPEG images into fixed-size 8-bit PNG folders for super-resolution experiments.

    python data_prep/prepare_super_resolution_dataset.py --train-dir DIR --test-dir DIR --output-root OUT
        [--size 256] [--grayscale] [--write-manifests] [--corrupt fail|skip] [--overwrite]

Input: every ``.png`` / ``.jpg`` / ``.jpeg`` file (case-insensitive) under each split folder, recursively, sorted by
relative path, hidden files and folders skipped -- read with ``diffinv_pl.data.images.ImageFolderDataset``, so the
pre-processing is exactly the one evaluation applies: convert to RGB (or ITU-R 601-2 luma "L" with
``--grayscale``), resize the shorter side to ``--size`` pixels (bicubic, antialiased; smaller images are enlarged)
and centre crop to ``size x size``; an image already ``size x size`` is left untouched. Two inputs that differ only
in their extension ("a.png" next to "a.jpg") would both become "a.png" and are refused.

Output: ``OUT/train/<relative path>.png`` and ``OUT/test/<relative path>.png`` (extension replaced by ``.png``),
8-bit RGB or L, value ``round(255 x)`` of the loaded ``x`` in [0, 1]. 8-bit inputs therefore round-trip
pixel-exactly; 16-bit grayscale PNGs are quantised to 8 bits (error <= 1/510). With ``--write-manifests``,
``OUT/train_images.txt`` and ``OUT/test_images.txt`` list the written files, one per line, sorted, relative to
``OUT/train`` resp. ``OUT/test`` -- what ``ImageFolderDataset(root=OUT/train, manifest=OUT/train_images.txt)``
reads directly. Every file is written to a hidden temporary file next to its target and moved into place with
``os.replace``, so an interrupted run never leaves a truncated image or manifest.

Checks, all done for both splits before anything is written: each split folder exists and holds images; every
image decodes completely (``full_check``: catches truncated JPEGs that pillow's cheap ``verify()`` accepts, at the
cost of decoding each file twice). ``--corrupt fail`` (default) refuses with one error listing every corrupt file;
``--corrupt skip`` leaves them out and lists them after the split's summary. Existing target files or manifests are
never replaced unless ``--overwrite`` is given; an output folder may not lie inside its input folder or contain it.
One summary line per split is printed: images written, corrupt files skipped, output folder. RGBA / LA inputs whose
alpha is not fully opaque are converted with the alpha dropped, and one warning per split names them. A refusal
prints one ``error: ...`` line naming the fix and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path


from diffinv_pl.data.images import CORRUPT_POLICIES, ImageFolderDataset
from diffinv_pl.errors import UserError, UserFileError, report_user_errors
from diffinv_pl.utils.io import atomic_write_text, save_png

SPLITS = ("train", "test")


@dataclass(frozen=True)
class SplitPlan:
    """A validated split: the dataset to read and the files it will produce (relative to ``output_dir``)."""

    dataset: ImageFolderDataset
    output_dir: Path
    targets: list[str]  # "<key>.png" per dataset item, in dataset order
    manifest: Path | None

    def existing(self) -> list[Path]:
        """Target files (and the manifest) that are already on disk."""
        paths = [self.output_dir / t for t in self.targets] + ([self.manifest] if self.manifest is not None else [])
        return [p for p in paths if p.exists()]


@dataclass(frozen=True)
class SplitResult:
    """What ``prepare_split`` did: files written (relative to the output folder, sorted) and corrupt inputs skipped."""

    written: list[str]
    skipped: list[Path]
    manifest: Path | None


def plan_split(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    size: int = 256,
    grayscale: bool = False,
    corrupt: str = "fail",
    manifest: str | Path | None = None,
) -> SplitPlan:
    """Scan and fully decode-check ``input_dir``; raise UserFileError / UserError on unusable input or layout."""
    if size < 1:
        raise UserError(f"size must be a positive number of pixels, got {size}")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise UserFileError(
            f"input folder {str(input_dir)!r} does not exist or is not a directory; point it at a folder of "
            "PNG/JPEG images"
        )
    _refuse_overlap(input_dir, output_dir)
    dataset = ImageFolderDataset(
        input_dir, image_size=size, mode="L" if grayscale else "RGB", corrupt=corrupt, full_check=True
    )
    targets = [f"{key}.png" for key in dataset.keys]
    return SplitPlan(dataset, output_dir, targets, Path(manifest) if manifest is not None else None)


def write_split(plan: SplitPlan) -> SplitResult:
    """Write every image of a planned split (and its manifest) atomically; returns what was written."""
    for index, target in enumerate(plan.targets):
        save_png(plan.output_dir / target, plan.dataset[index]["image"])  # (C, size, size) float32 in [0, 1]
    written = sorted(plan.targets)
    if plan.manifest is not None:
        atomic_write_text(plan.manifest, "".join(f"{rel}\n" for rel in written))
    return SplitResult(written, list(plan.dataset.skipped), plan.manifest)


def prepare_split(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    size: int = 256,
    grayscale: bool = False,
    corrupt: str = "fail",
    manifest: str | Path | None = None,
    overwrite: bool = False,
) -> SplitResult:
    """Convert one split folder to ``size x size`` 8-bit PNGs under ``output_dir`` (module docstring).

    ``manifest``: where to write the sorted list of written files, relative to ``output_dir`` (None: no manifest).
    Raises FileExistsError when a target or the manifest exists and ``overwrite`` is False (nothing is written).
    """
    plan = plan_split(input_dir, output_dir, size=size, grayscale=grayscale, corrupt=corrupt, manifest=manifest)
    _refuse_existing(plan.existing(), overwrite)
    return write_split(plan)


def _refuse_overlap(input_dir: Path, output_dir: Path) -> None:
    src, dst = input_dir.resolve(), output_dir.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise UserError(
            f"output folder {str(output_dir)!r} overlaps input folder {str(input_dir)!r} (one contains the other); "
            "choose an --output-root outside the input folders"
        )


def _refuse_existing(existing: list[Path], overwrite: bool) -> None:
    if existing and not overwrite:
        raise FileExistsError(
            f"{len(existing)} output file(s) already exist (first: {str(existing[0])!r}); pass --overwrite "
            "(overwrite=True) to replace them, or choose another --output-root"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-dir", required=True, type=Path, help="folder of training images (searched recursively)")
    p.add_argument("--test-dir", required=True, type=Path, help="folder of test images (searched recursively)")
    p.add_argument("--output-root", required=True, type=Path, help="writes OUT/train, OUT/test (and manifests)")
    p.add_argument("--size", type=int, default=256, help="output side in pixels (default 256)")
    p.add_argument("--grayscale", action="store_true", help="one channel (L, ITU-R 601-2 luma) instead of RGB")
    p.add_argument(
        "--write-manifests", action="store_true",
        help="also write OUT/train_images.txt and OUT/test_images.txt (paths relative to OUT/train resp. OUT/test)",
    )
    p.add_argument("--corrupt", choices=CORRUPT_POLICIES, default="fail", help="fail (default) or skip corrupt files")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    return p


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error(f"--size must be >= 1, got {args.size}")
    root: Path = args.output_root
    inputs = dict(zip(SPLITS, (args.train_dir, args.test_dir)))
    for split, input_dir in inputs.items():  # a split's output inside the other split's input would be read back
        for other in SPLITS:
            if other != split:
                _refuse_overlap(input_dir, root / other)
    plans = {}
    for split, input_dir in inputs.items():
        try:
            plans[split] = plan_split(
                input_dir, root / split, size=args.size, grayscale=args.grayscale, corrupt=args.corrupt,
                manifest=root / f"{split}_images.txt" if args.write_manifests else None,
            )
        except UserError as e:
            raise UserError(f"--{split}-dir {str(input_dir)!r}: {e}") from e
    try:
        _refuse_existing([p for plan in plans.values() for p in plan.existing()], args.overwrite)
    except FileExistsError as e:
        raise UserError(str(e)) from e
    mode = "L" if args.grayscale else "RGB"
    for split, plan in plans.items():
        result = write_split(plan)
        print(
            f"{split}: wrote {len(result.written)} images ({args.size}x{args.size} {mode} PNG) to {plan.output_dir}, "
            f"skipped {len(result.skipped)} corrupt"
            + (f"; manifest {result.manifest}" if result.manifest is not None else "")
        )
        for path in result.skipped:
            print(f"  skipped corrupt file {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
