"""Atomic writes (diffinv_pl.utils.io) leave files with the umask's mode, like any file the user writes."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

import diffinv_pl.utils.io as io_mod
from diffinv_pl.data.shards import write_shards
from diffinv_pl.utils.io import atomic_write_text, current_umask, save_npy, save_png


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class _Images:
    keys = ["a", "b"]

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return {"key": self.keys[i], "image": torch.full((1, 4, 4), 0.25 * (i + 1))}


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_mode(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    png = save_png(tmp_path / "x.png", torch.rand(3, 4, 4))
    npy = save_npy(tmp_path / "x.npy", np.zeros((1, 2, 2), np.float32))
    js = atomic_write_text(tmp_path / "x.json", "{}")
    txt = atomic_write_text(tmp_path / "sub" / "x.txt", "hello\n")
    index = write_shards(_Images(), tmp_path / "shards", samples_per_shard=1, image_format="npy")
    for path in (png, npy, js, txt, index):
        assert _mode(path) == expected, path
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temporary file left behind


def test_umask_fallback_without_proc(tmp_path, umask, monkeypatch):
    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    umask(0o027)
    monkeypatch.setattr(io_mod, "open", no_proc, raising=False)  # module global shadows the builtin
    assert current_umask() == 0o027
    monkeypatch.undo()
    assert current_umask() == 0o027  # unchanged by the fallback's set-and-restore
    umask(0o027)
    assert _mode(atomic_write_text(tmp_path / "y.txt", "x")) == 0o640
