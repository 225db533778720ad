"""Image folders as indexable evaluation datasets (conventions.md §6: exact evaluation needs map-style datasets).

Files: every file under ``root`` (recursively) whose suffix is in ``extensions`` (case-insensitive), skipping hidden
files and folders (a path component starting with "."), sorted by relative POSIX path; or the files a manifest lists,
in the manifest's order. Key: the relative path without its extension ("sub/img_001"); keys must be unique, so
"a.png" next to "a.jpg" is refused.

Pre-processing (pillow via torchvision's PIL path): convert to ``mode`` ("RGB" or "L"), resize the shorter side to
``image_size`` (bicubic; PIL's resampling filters widen with the scale factor, i.e. they are antialiased) and centre
crop to ``image_size`` x ``image_size``; an image already of that size is untouched, so PNGs round-trip pixel-exactly.
8-bit images become ``uint8 / 255`` in float32; 16-bit grayscale PNGs (PIL modes "I;16*" / "I", which pillow's own
conversion to "L" would clip at 255) become ``value / 65535`` and are resized in float; 32-bit float images (mode
"F", e.g. float TIFFs when ``extensions`` admits them) are taken as they are and must be finite and in [0, 1] (a
:class:`~diffinv_pl.errors.UserError` names the file otherwise). EXIF orientation is ignored (as in torchvision's
ImageFolder).

Alpha: converting to "RGB" / "L" drops an alpha channel (or a palette's transparency), keeping the stored colours
also where pixels are transparent. When a file's alpha is not fully opaque, one UserWarning per dataset says so,
naming the files (with ``full_check=True`` all of them, at construction; otherwise at the first such image read,
with the files whose header carries alpha). Fully opaque alpha is dropped without a warning.

Corrupt files: at construction every file is opened and ``verify()``-ed (cheap: no full decode; ``full_check=True``
decodes each file completely, which also catches truncated JPEGs). ``corrupt="fail"`` raises one UserError listing
every bad file with pillow's message; ``corrupt="skip"`` drops them, logs a warning and lists them in ``.skipped``.
A file that passes the check but fails to decode later raises a UserError naming its key and path. Every problem
the user can fix (missing folder, no images, bad manifest, clashing keys) is a UserError naming the fix.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from diffinv_pl.errors import UserError, UserFileError

log = logging.getLogger(__name__)

MODES = ("RGB", "L")
CORRUPT_POLICIES = ("fail", "skip")
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
MAX_LISTED = 5  # files named in a warning or error before "... (N in all)"
FLATTEN_HINT = (
    "flatten the images onto a background before (e.g. PIL: Image.alpha_composite(Image.new('RGBA', im.size, "
    "'white'), im.convert('RGBA')).convert('RGB')), or save them without alpha if it carries no meaning"
)


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
            raise UserError(f"unknown image mode {mode!r}; valid: {', '.join(MODES)}")
        if corrupt not in CORRUPT_POLICIES:
            raise UserError(f"unknown corrupt-file policy {corrupt!r}; valid: {', '.join(CORRUPT_POLICIES)}")
        if image_size is not None and image_size < 1:
            raise UserError(f"image_size must be a positive int or None, got {image_size}")
        self.root = Path(root)
        self.image_size = image_size
        self.mode = mode
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not self.root.is_dir():
            raise UserFileError(
                f"image folder {str(self.root)!r} does not exist or is not a directory; point the path at a folder "
                "of images (data.root=DIR for evaluation, data.train.root=DIR for training)"
            )

        rel = self._listed(Path(manifest)) if manifest is not None else self._scan()
        if not rel:
            raise UserError(
                f"no images with extensions {', '.join(self.extensions)} under {str(self.root)!r}"
                + (f" (manifest {str(manifest)!r})" if manifest is not None else "")
                + "; point the path at a folder holding such files (searched recursively, hidden ones skipped)"
            )
        self._check_unique_keys(rel)

        bad = {}
        alpha: dict[str, bool] = {}  # file -> alpha not fully opaque (full_check) / header carries alpha (otherwise)
        for r in rel:
            reason, has_alpha = _check_file(self.root / r, full_check)
            if reason is not None:
                bad[r] = reason
            elif has_alpha:
                alpha[r] = True
        listing = "\n".join(f"  {self.root / r}: {reason}" for r, reason in bad.items())
        if bad and corrupt == "fail":
            raise UserError(
                f"{len(bad)} corrupt image file(s) under {str(self.root)!r}:\n{listing}\n"
                "replace or remove them, or pass corrupt='skip' (data_prep scripts: --corrupt skip) to leave them out"
            )
        if bad:
            log.warning("skipping %d corrupt image file(s) under %s:\n%s", len(bad), self.root, listing)
        self.skipped: list[Path] = [self.root / r for r in bad]
        self.files: list[str] = [r for r in rel if r not in bad]
        if not self.files:
            raise UserError(
                f"every image under {str(self.root)!r} is corrupt ({len(bad)} skipped); replace the files"
            )
        self.keys: list[str] = [_key(r) for r in self.files]
        self._alpha_files: list[str] = [r for r in self.files if r in alpha]
        self._alpha_warned = False
        if full_check and self._alpha_files:  # decoded already: these files do have non-opaque alpha
            self._warn_alpha(
                f"{len(self._alpha_files)} image(s) under {str(self.root)!r} have a non-opaque alpha channel, "
                f"which is dropped when they are converted to {mode}: {_listing(self._alpha_files)}"
            )

    def _scan(self) -> list[str]:
        found = []
        for p in self.root.rglob("*"):
            r = p.relative_to(self.root)
            if p.suffix.lower() in self.extensions and not any(s.startswith(".") for s in r.parts) and p.is_file():
                found.append(r.as_posix())
        return sorted(found)

    def _warn_alpha(self, what: str) -> None:
        """One UserWarning per dataset about dropped alpha (module docstring)."""
        if self._alpha_warned:
            return
        self._alpha_warned = True
        warnings.warn(
            f"{what}; the stored colours are kept as they are, also where pixels are transparent. To avoid this, "
            + FLATTEN_HINT,
            UserWarning,
            stacklevel=3,
        )

    def _listed(self, manifest: Path) -> list[str]:
        if not manifest.is_file():
            raise UserFileError(f"manifest {str(manifest)!r} does not exist; check the manifest path")
        rel = []
        for line in manifest.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = PurePosixPath(line)
            if p.is_absolute() or ".." in p.parts:
                raise UserError(
                    f"manifest {str(manifest)!r}: entries must be relative to the root, got {line!r}; list paths "
                    f"relative to {str(self.root)!r}"
                )
            if p.suffix.lower() not in self.extensions:
                raise UserError(
                    f"manifest {str(manifest)!r}: {line!r} does not have one of the extensions "
                    f"{', '.join(self.extensions)}; list image files only, or add the extension to extensions"
                )
            rel.append(p.as_posix())
        dup = sorted(r for r, n in Counter(rel).items() if n > 1)
        if dup:
            raise UserError(
                f"manifest {str(manifest)!r} lists these files more than once: {dup[:10]}; list each file once"
            )
        missing = [r for r in rel if not (self.root / r).is_file()]
        if missing:
            raise UserFileError(
                f"manifest {str(manifest)!r} lists {len(missing)} file(s) missing under {str(self.root)!r}: "
                f"{missing[:10]}; check the root folder or remove those lines"
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
            raise UserError(
                f"these files share a key (relative path without extension): {clashes[:10]}; rename or remove one "
                "of each pair"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for {len(self.files)} images")
        path = self.root / self.files[index]
        key = self.keys[index]
        try:
            image, alpha_dropped = _decode(path, self.mode, self.image_size)
        except UserError as e:
            raise UserError(f"sample {key!r}: {e}") from e
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(
                f"sample {key!r}: cannot decode image {str(path)!r}: {e}; replace or remove the file (or construct "
                "the dataset with corrupt='skip', full_check=True to leave undecodable files out)"
            ) from e
        if alpha_dropped and not self._alpha_warned:
            self._warn_alpha(
                f"image {str(path)!r} (sample {key!r}) has a non-opaque alpha channel, which is dropped when it is "
                f"converted to {self.mode}; {len(self._alpha_files)} file(s) under {str(self.root)!r} carry an "
                f"alpha channel: {_listing(self._alpha_files)}"
            )
        return {"key": key, "image": image, "path": self.files[index]}


def load_image(path: str | Path, mode: str = "RGB", image_size: int | None = None) -> Tensor:
    """One image file as a (C, H, W) float32 tensor in [0, 1]: mode conversion, shorter-side resize, centre crop.
    Warns (UserWarning) when a non-opaque alpha channel is dropped."""
    image, alpha_dropped = _decode(path, mode, image_size)
    if alpha_dropped:
        warnings.warn(
            f"image {str(path)!r} has a non-opaque alpha channel, which is dropped when it is converted to {mode}; "
            + FLATTEN_HINT,
            UserWarning,
            stacklevel=2,
        )
    return image


def check_image_values(image: Tensor | np.ndarray, where: str, fix: str) -> None:
    """Raise a :class:`UserError` naming ``where`` and ``fix`` when ``image`` holds NaN/Inf values or values outside
    [0, 1] (the range every image source decodes to)."""
    image = image.detach() if isinstance(image, Tensor) else torch.tensor(image)  # a copy: arrays may be read-only
    if image.numel() == 0:
        return
    finite = torch.isfinite(image)
    if not bool(finite.all()):
        raise UserError(f"{where}: image has {int((~finite).sum())} NaN/Inf value(s); {fix}")
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:
        scale = " (8-bit data: divide by 255)" if lo >= 0.0 and 1.0 < hi <= 255.0 else ""
        raise UserError(
            f"{where}: image values lie in [{lo:.4g}, {hi:.4g}], outside the allowed range [0, 1]; {fix}{scale}"
        )


def _decode(path: str | Path, mode: str, image_size: int | None) -> tuple[Tensor, bool]:
    """:func:`load_image`'s tensor, and whether a non-opaque alpha channel was dropped."""
    from torchvision.transforms import functional as TF

    alpha_dropped = False
    with Image.open(path) as im:
        im.load()
        high_bit = im.mode in _HIGH_BIT_MODES or im.mode == "F"
        if im.mode == "F":  # 32-bit float: taken as is, so it must already be in [0, 1]
            values = np.asarray(im, dtype=np.float32)
            check_image_values(
                values, f"image {str(path)!r}", "save it with values in [0, 1] (or as an 8/16-bit PNG)"
            )
            img = Image.fromarray(values)
        elif high_bit:  # 16-bit grayscale: scale to [0, 1] ourselves (pillow's "L" conversion clips at 255)
            img = Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0))  # mode "F"
        else:
            alpha_dropped = _has_alpha(im) and _alpha_not_opaque(im)
            img = im.convert(mode)
    if image_size is not None and img.size != (image_size, image_size):
        img = TF.resize(img, image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [image_size, image_size])
    arr = np.asarray(img)
    if high_bit:
        x = torch.from_numpy(arr.astype(np.float32)).clamp_(0.0, 1.0)[None]  # bicubic resizing may overshoot
        return (x.expand(3, -1, -1).contiguous() if mode == "RGB" else x), False
    x = torch.from_numpy(arr.copy()).to(torch.float32) / 255.0
    return (x[None] if x.ndim == 2 else x.permute(2, 0, 1).contiguous()), alpha_dropped


def _has_alpha(im: Image.Image) -> bool:
    """The image carries an alpha channel or a transparency entry (header only, no decoding)."""
    return "A" in im.getbands() or "transparency" in im.info


def _alpha_not_opaque(im: Image.Image) -> bool:
    """Some pixel of a loaded image is (partly) transparent."""
    alpha = im.getchannel("A") if "A" in im.getbands() else im.convert("RGBA").getchannel("A")
    return alpha.getextrema()[0] < 255


def _listing(files: Sequence[str | Path]) -> str:
    """The first MAX_LISTED files, and how many there are in all."""
    shown = ", ".join(str(f) for f in files[:MAX_LISTED])
    return shown + (f", ... ({len(files)} in all)" if len(files) > MAX_LISTED else "")


def _key(rel: str) -> str:
    p = PurePosixPath(rel)
    return p.with_suffix("").as_posix()


def _check_file(path: Path, full: bool) -> tuple[str | None, bool]:
    """(None if pillow can read the file, otherwise pillow's complaint; alpha): with ``full`` the file is decoded and
    alpha says whether some pixel is transparent, otherwise whether the header announces alpha / transparency."""
    try:
        with Image.open(path) as im:
            has_alpha = _has_alpha(im)
            if full:
                im.load()
                has_alpha = has_alpha and _alpha_not_opaque(im)
            else:
                im.verify()
    except Exception as e:  # any failure means the file is unusable; the message is reported, never swallowed
        return f"{type(e).__name__}: {e}", False
    return None, has_alpha
