"""Pack an image folder into webdataset shards with a random-access index (diffinv_pl.data.shards).

    python data_prep/make_shards.py --images DIR --output DIR --samples-per-shard N [--image-size S] [--grayscale]
        [--format png|npy] [--input-format image|npy] [--overwrite]

Input: ``--input-format image`` (default) reads every PNG/JPEG under ``--images`` with ``ImageFolderDataset``
(sorted, key = relative path without extension; ``--image-size`` resizes + centre-crops, omitted keeps native
sizes; ``--grayscale`` converts to one channel, 16-bit PNGs become value / 65535). ``--input-format npy`` reads
float32 ``(C, H, W)`` (or ``(H, W)``) ``.npy`` files, sorted by relative path, as written by
``make_ct_phantoms.py --format npy`` (no resizing: ``--image-size`` must then match or be omitted).
Output: ``write_shards`` with ``--format png`` (8-bit) or ``npy`` (float32, exact); keys must be unique (checked
before anything is written). Every input image is fully decoded first (``--corrupt fail``: one error listing every
unreadable file; ``skip``: leave them out and list them). After writing, the shards are validated end to end
(``validate_shards``: index integrity, keys streamed in tar order, every member decodes to its recorded shape) and the
per-shard sample counts are printed.

Values: images must be finite and in [0, 1]; an ``.npy`` input with NaN/Inf or values outside [0, 1] is refused
before anything is written, naming every such file. RGBA / LA inputs whose alpha is not fully opaque are converted
with the alpha dropped, and one warning names them.

User mistakes (missing or empty input folder, corrupt inputs with ``--corrupt fail``, bad values, existing output
without ``--overwrite``, invalid shards) print one ``error: ...`` line naming the fix and exit with status 2.

    python data_prep/make_shards.py --validate DIR     # validate existing shards only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


from diffinv_pl.data.images import CORRUPT_POLICIES, ImageFolderDataset, check_image_values
from diffinv_pl.data.shards import IMAGE_FORMATS, validate_shards, write_shards
from diffinv_pl.errors import UserError, UserFileError, report_user_errors

MAX_LISTED = 10


class NpyFolderDataset(Dataset):
    """Sorted ``*.npy`` files under ``root`` as ``{"key", "image" (C, H, W) float32, "path"}``."""

    def __init__(self, root: Path, image_size: int | None = None, grayscale: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserFileError(
                f"--images {str(self.root)!r} does not exist or is not a directory; pass the folder holding the .npy "
                "files"
            )
        self.files = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*.npy")
            if p.is_file() and not any(s.startswith(".") for s in p.relative_to(self.root).parts)
        )
        if not self.files:
            raise UserError(
                f"no .npy files under {str(self.root)!r}; pass the folder holding them as --images (PNG/JPEG input: "
                "drop --input-format npy)"
            )
        self.keys = [f[: -len(".npy")] for f in self.files]
        self.image_size, self.grayscale = image_size, grayscale

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.root / self.files[index]
        where = f"sample {self.keys[index]!r} (file {str(path)!r})"
        try:
            array = np.load(path, allow_pickle=False)
            image = torch.from_numpy(np.asarray(array, dtype=np.float32))
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"{where}: not a readable numeric .npy array ({err}); replace or remove the file") from err
        image = image[None] if image.ndim == 2 else image
        if image.ndim != 3:
            raise UserError(f"{where}: expected a (C, H, W) or (H, W) array, got shape {tuple(image.shape)}")
        if self.image_size is not None and image.shape[-2:] != (self.image_size, self.image_size):
            raise UserError(
                f"{where} is {tuple(image.shape[-2:])}, not {self.image_size}^2 (npy: no resizing); omit --image-size "
                "or resize the arrays"
            )
        check_image_values(image, where, "clean or remove the file")
        if self.grayscale and image.shape[0] == 3:
            image = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
        return {"key": self.keys[index], "image": image, "path": self.files[index]}

    def check(self) -> None:
        """Read every file first: one UserError naming every unusable one (unreadable, wrong shape, NaN/Inf or values
        outside [0, 1]) before anything is written."""
        problems = []
        for index in range(len(self)):
            try:
                self[index]
            except UserError as err:
                problems.append(str(err))
        if problems:
            more = f"\n  ... ({len(problems)} in all)" if len(problems) > MAX_LISTED else ""
            raise UserError(
                f"{len(problems)} of {len(self)} .npy file(s) under {str(self.root)!r} are unusable:\n  "
                + "\n  ".join(problems[:MAX_LISTED]) + more
            )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--validate", type=Path, default=None, help="only validate the shards in this folder")
    p.add_argument("--images", type=Path, help="input image folder")
    p.add_argument("--output", type=Path, help="output folder for shard-*.tar and index.json")
    p.add_argument("--samples-per-shard", type=int, help="samples per shard")
    p.add_argument("--corrupt", choices=CORRUPT_POLICIES, default="fail", help="unreadable input images: fail or skip")
    p.add_argument("--image-size", type=int, default=None, help="resize + centre crop to S (default: native size)")
    p.add_argument("--grayscale", action="store_true", help="one channel (mode L) instead of RGB")
    p.add_argument("--format", choices=IMAGE_FORMATS, default="png", help="png (8-bit) or npy (float32) members")
    p.add_argument("--input-format", choices=("image", "npy"), default="image", help="PNG/JPEG files or .npy arrays")
    p.add_argument("--overwrite", action="store_true", help="replace shards / index already in --output")
    return p


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.validate is not None:
        return _report(args.validate)
    missing = [f"--{n.replace('_', '-')}" for n in ("images", "output", "samples_per_shard") if getattr(args, n) is None]
    if missing:
        parser.error(f"{', '.join(missing)} required (or --validate DIR)")
    if args.samples_per_shard < 1:
        parser.error(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    if args.image_size is not None and args.image_size < 1:
        parser.error(f"--image-size must be >= 1, got {args.image_size}")
    if _holds_shards(args.output) and not args.overwrite:  # before the (slow) full decode of every input
        raise UserError(_exists_message(args.output))
    if args.input_format == "npy":
        dataset = NpyFolderDataset(args.images, args.image_size, args.grayscale)
        dataset.check()
    else:
        try:
            dataset = ImageFolderDataset(
                args.images, image_size=args.image_size, mode="L" if args.grayscale else "RGB", corrupt=args.corrupt,
                full_check=True,
            )
        except UserError as e:
            raise UserError(f"--images: {e}") from e
        for path in dataset.skipped:
            print(f"skipped unreadable image {path}")
    try:
        index_path = write_shards(
            dataset, args.output, samples_per_shard=args.samples_per_shard, image_format=args.format,
            overwrite=args.overwrite,
        )
    except FileExistsError as e:
        raise UserError(_exists_message(args.output)) from e
    print(f"wrote {len(dataset)} samples; index: {index_path}")
    return _report(args.output)


def _holds_shards(folder: Path) -> bool:
    return (folder / "index.json").exists() or any(folder.glob("shard-*.tar"))


def _exists_message(folder: Path) -> str:
    return (
        f"--output {str(folder)!r} already holds shards or an index; pass --overwrite to replace them, or choose "
        "another --output"
    )


def _report(folder: Path) -> int:
    """Validate the shards in ``folder`` and print the per-shard counts (invalid shards: a UserError naming every
    problem, reported by ``main`` as one ``error:`` message, exit status 2)."""
    counts = validate_shards(folder)
    print(f"valid: {sum(counts.values())} samples in {len(counts)} shard(s): "
          + ", ".join(f"{name} {n}" for name, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
