"""Write CT phantoms (diffinv_pl.data.phantoms: random ellipses or textured torso slices) to files named by key.

    python data_prep/make_ct_phantoms.py --output-root DIR --num-images N --size S --seed K [--format png|npy]
        [--kind ellipses|textured]

``--format png`` (default): 16-bit grayscale PNG, value round(x * 65535) (read back by ImageFolderDataset as
value / 65535, error <= 7.7e-6); ``--format npy``: float32 (1, S, S) arrays, exact. Files are
``DIR/phantom_00000.png`` ... (key = ``phantom_key(index, kind)``: ``textured_00000.png`` ... for
``--kind textured``, which uses the family's default parameters). Existing files are never overwritten unless
``--overwrite`` is given; the check covers every target file before anything is written (a refusal prints one
``error: ...`` line naming the fix and exits with status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


from diffinv_pl.data.phantoms import PHANTOM_KINDS, phantom_generator, phantom_key
from diffinv_pl.errors import UserError, report_user_errors

FORMATS = ("png", "npy")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-root", required=True, type=Path, help="directory the phantom files are written to")
    p.add_argument("--num-images", required=True, type=int, help="number of phantoms (indices 0 .. N-1)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="phantom set seed (default 0)")
    p.add_argument("--kind", choices=PHANTOM_KINDS, default="ellipses", help="phantom family (default ellipses)")
    p.add_argument("--format", choices=FORMATS, default="png", help="png (16-bit) or npy (float32)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    return p


def write_phantom(path: Path, image, fmt: str) -> None:
    arr = image.numpy()  # (1, S, S) float32 in [0, 1]
    if fmt == "npy":
        np.save(path, arr.astype(np.float32))
        return
    from PIL import Image

    q = np.round(np.clip(arr[0], 0.0, 1.0) * 65535.0).astype(np.uint16)
    Image.fromarray(q).save(path)  # mode I;16 -> 16-bit grayscale PNG


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f"--num-images must be >= 1, got {args.num_images}")
    if args.size < 2:
        parser.error(f"--size must be >= 2, got {args.size}")
    root: Path = args.output_root
    if root.exists() and not root.is_dir():
        raise UserError(f"--output-root {str(root)!r} is a file, not a folder; choose a folder to write into")
    targets = [root / f"{phantom_key(i, args.kind)}.{args.format}" for i in range(args.num_images)]
    existing = [t for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise UserError(
            f"{len(existing)} of the {len(targets)} target files already exist (first: {existing[0]}); pass "
            "--overwrite to replace them, or choose another --output-root"
        )
    root.mkdir(parents=True, exist_ok=True)
    generate = phantom_generator(args.kind)
    for i, path in enumerate(targets):
        write_phantom(path, generate(i, args.seed, args.size), args.format)
    shape = f"{args.size}x{args.size}, seed {args.seed}, {args.format}"
    print(f"wrote {len(targets)} {args.kind} phantoms ({shape}) to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
