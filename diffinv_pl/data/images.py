"""Image folders as indexable evaluation datasets (conventions.md §6: exact evaluation needs map-style datasets).

Files: every file under ``root`` (recursively) whose suffix is in ``extensions`` (case-insensitive), skipping hidden
files and folders (a path component starting with "."), sorted by relative POSIX path; or the files a manifest lists,
in the manifest's order. Key: the relative path without its extension ("sub/img_001"); keys must be unique, so
"a.png" next to "a.jpg" is refused.

Pre-processing (pillow via torchvision's PIL path): convert to ``mode`` ("RGB" or "L"), resize the shorter side to
``image_size`` (bicubic; PIL's resampling filters widen with the scale factor, i.e. they are antialiased) and centre
crop to ``image_size`` x ``image_size``; an image already of that size is untouched, so PNGs round-trip pixel-exactly.
8-bit images become ``uint8 / 255`` in float32; 16-bit grayscale PNGs (PIL modes "I;16*" / "I", which pillow's own
conversion to "L" would clip at 255) become ``value / 65535`` and are resized in float. EXIF orientation is ignored
(as in torchvision's ImageFolder).

Corrupt files: at construction every file is opened and ``verify()``-ed (cheap: no full decode; ``full_check=True``
decodes each file completely, which also catches truncated JPEGs). ``corrupt="fail"`` raises one ValueError listing
every bad file with pillow's message; ``corrupt="skip"`` drops them, logs a warning and lists them in ``.skipped``.
A file that passes the check but fails to decode later raises a ValueError naming it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

MODES = ("RGB", "L")
CORRUPT_POLICIES = ("fail", "skip")
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageFolderDataset(Dataset):
    """Sorted images under ``root`` as ``{"key", "image" (C, H, W) float32 in [0, 1], "path"}`` (module docstring)."""

    def __init__(
        self,
        root: str | Path,
        image_size: int | None = 256,  # shorter side resized to this, then centre crop; None keeps native sizes
        mode: str = "RGB",  # "RGB" (3 channels) or "L" (1 channel, ITU-R 601-2 luma)
        extensions: Sequence[str] = (".png", ".jpg", ".jpeg"),
        corrupt: str = "fail",  # "fail": one ValueError naming every corrupt file; "skip": drop, warn, .skipped
        manifest: str | Path | None = None,  # text file of relative paths (one a line, "#" comments), kept in order
        full_check: bool = False,  # decode every file at construction instead of PIL's cheap verify()
    ):
        if mode not in MODES:
            raise ValueError(f"unknown image mode {mode!r}; valid: {', '.join(MODES)}")
        if corrupt not in CORRUPT_POLICIES:
            raise ValueError(f"unknown corrupt-file policy {corrupt!r}; valid: {', '.join(CORRUPT_POLICIES)}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive int or None, got {image_size}")
        self.root = Path(root)
        self.image_size = image_size
        self.mode = mode
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a directory")

        rel = self._listed(Path(manifest)) if manifest is not None else self._scan()
        if not rel:
            raise ValueError(
                f"no images with extensions {', '.join(self.extensions)} under {str(self.root)!r}"
                + (f" (manifest {str(manifest)!r})" if manifest is not None else "")
            )
        self._check_unique_keys(rel)

        bad = {}
        for r in rel:
            reason = _check_file(self.root / r, full_check)
            if reason is not None:
                bad[r] = reason
        listing = "\n".join(f"  {self.root / r}: {reason}" for r, reason in bad.items())
        if bad and corrupt == "fail":
            raise ValueError(
                f"{len(bad)} corrupt image file(s) under {str(self.root)!r}:\n{listing}\n"
                "(pass corrupt='skip' to leave them out)"
            )
        if bad:
            log.warning("skipping %d corrupt image file(s) under %s:\n%s", len(bad), self.root, listing)
        self.skipped: list[Path] = [self.root / r for r in bad]
        self.files: list[str] = [r for r in rel if r not in bad]
        if not self.files:
            raise ValueError(f"every image under {str(self.root)!r} is corrupt ({len(bad)} skipped)")
        self.keys: list[str] = [_key(r) for r in self.files]

    def _scan(self) -> list[str]:
        found = []
        for p in self.root.rglob("*"):
            r = p.relative_to(self.root)
            if p.suffix.lower() in self.extensions and not any(s.startswith(".") for s in r.parts) and p.is_file():
                found.append(r.as_posix())
        return sorted(found)

    def _listed(self, manifest: Path) -> list[str]:
        if not manifest.is_file():
            raise FileNotFoundError(f"manifest {str(manifest)!r} does not exist")
        rel = []
        for line in manifest.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = PurePosixPath(line)
            if p.is_absolute() or ".." in p.parts:
                raise ValueError(f"manifest {str(manifest)!r}: entries must be relative to the root, got {line!r}")
            if p.suffix.lower() not in self.extensions:
                raise ValueError(
                    f"manifest {str(manifest)!r}: {line!r} does not have one of the extensions "
                    f"{', '.join(self.extensions)}"
                )
            rel.append(p.as_posix())
        dup = sorted(r for r, n in Counter(rel).items() if n > 1)
        if dup:
            raise ValueError(f"manifest {str(manifest)!r} lists these files more than once: {dup[:10]}")
        missing = [r for r in rel if not (self.root / r).is_file()]
        if missing:
            raise FileNotFoundError(
                f"manifest {str(manifest)!r} lists {len(missing)} file(s) missing under {str(self.root)!r}: "
                f"{missing[:10]}"
            )
        return rel

    @staticmethod
    def _check_unique_keys(rel: list[str]) -> None:
        seen: dict[str, str] = {}
        clashes = []
        for r in rel:
            k = _key(r)
            if k in seen:
                clashes.append(f"{seen[k]} / {r}")
            seen.setdefault(k, r)
        if clashes:
            raise ValueError(f"these files share a key (relative path without extension): {clashes[:10]}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for {len(self.files)} images")
        path = self.root / self.files[index]
        try:
            image = load_image(path, self.mode, self.image_size)
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"cannot decode image {str(path)!r}: {e}") from e
        return {"key": self.keys[index], "image": image, "path": self.files[index]}


def load_image(path: str | Path, mode: str = "RGB", image_size: int | None = None) -> Tensor:
    """One image file as a (C, H, W) float32 tensor in [0, 1]: mode conversion, shorter-side resize, centre crop."""
    from torchvision.transforms import functional as TF

    with Image.open(path) as im:
        im.load()
        high_bit = im.mode in _HIGH_BIT_MODES
        if high_bit:  # 16-bit grayscale: scale to [0, 1] ourselves (pillow's "L" conversion clips at 255)
            img = Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0))  # mode "F"
        else:
            img = im.convert(mode)
    if image_size is not None and img.size != (image_size, image_size):
        img = TF.resize(img, image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [image_size, image_size])
    arr = np.asarray(img)
    if high_bit:
        x = torch.from_numpy(arr.astype(np.float32)).clamp_(0.0, 1.0)[None]
        return x.expand(3, -1, -1).contiguous() if mode == "RGB" else x
    x = torch.from_numpy(arr.copy()).to(torch.float32) / 255.0
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


def _key(rel: str) -> str:
    p = PurePosixPath(rel)
    return p.with_suffix("").as_posix()


def _check_file(path: Path, full: bool) -> str | None:
    """None if pillow can read the file, otherwise pillow's complaint."""
    try:
        with Image.open(path) as im:
            if full:
                im.load()
            else:
                im.verify()
    except Exception as e:  # any failure means the file is unusable; the message is reported, never swallowed
        return f"{type(e).__name__}: {e}"
    return None
