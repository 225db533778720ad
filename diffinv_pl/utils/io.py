"""Atomic file writes: a finished file is either the old one or the complete new one, never a partial one.

The finished file gets the mode any file the process creates gets, ``0o666 & ~umask`` (e.g. 0644 under the usual
umask 022), not the 0600 of the temporary file it was written to.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffinv_pl.errors import UserError


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: ``/proc/self/status``); elsewhere
    by setting and restoring it under a lock, with 0o077 meanwhile so a file another thread creates in that instant
    is at worst too private, never too open."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def atomic_write_with(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a hidden, uniquely named temporary file beside ``path`` (e.g. ``image.save``), then move
    it onto ``path`` with ``os.replace``; the temporary file is removed if ``write`` fails. The finished file's mode
    is ``0o666 & ~umask``, like any file the user creates (``mkstemp``'s 0600 is not kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_png(path: str | Path, image: torch.Tensor) -> Path:
    """Atomically write a (C, H, W) image in [0, 1] (C = 1 or 3; values clamped) as an 8-bit PNG, value round(255 x)
    (grayscale "L" for one channel, "RGB" for three)."""
    arr = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    arr = arr[0] if arr.shape[0] == 1 else np.ascontiguousarray(arr.transpose(1, 2, 0))
    return atomic_write_with(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def save_npy(path: str | Path, array: np.ndarray | torch.Tensor) -> Path:
    """Atomically write an array as ``.npy`` (through a file object: ``np.save`` would append ".npy" to a path)."""
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, data)

    return atomic_write_with(path, write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text to ``path`` atomically (see :func:`atomic_write_with`)."""
    return atomic_write_with(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    """Rows (dicts with the same keys) as CSV text with a header."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def check_writable(directory: Path, what: str = "output directory") -> None:
    """Create ``directory`` (with its parents) and write and remove a small probe file in it, so that an unwritable
    output directory is refused before any work instead of at the first write (training, evaluation)."""
    probe = directory / f".diffinv_write_probe.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(
            f"cannot write to the {what} {str(directory)!r} ({reason}"
            f"{': ' + str(err.filename) if err.filename and str(err.filename) not in (str(probe), str(directory)) else ''}"
            "): "
            "choose another paths.output_dir=<dir>, or fix the directory's permissions"
        ) from err
