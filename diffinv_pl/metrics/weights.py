"""Manifest and offline resolution of the pretrained files the image metrics need (conventions.md §5).

No metric downloads anything. Each file is looked up, by its exact torch.hub file name, in

1. the explicit directory from the config (``weights_dir`` argument),
2. the directory in the environment variable ``DIFFINV_WEIGHTS_DIR``,
3. the torch hub cache, ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``),

and the first hit wins. If any needed file is missing, :func:`resolve_weights` raises *one*
:class:`FileNotFoundError` that lists every missing file, where it comes from, and the three places to put it;
this happens when the metrics are built, i.e. before any solving.

Hashes: the files cannot be downloaded here, so the manifest records the sha256 *prefix* that torch.hub encodes in
the file name (``<name>-<first 8 hex digits of sha256>.<ext>``, the ``HASH_REGEX`` convention of
``torch.hub.load_state_dict_from_url(check_hash=True)``, which torchvision uses for these files). A found file is
hashed and must start with that prefix (collision odds 1 in 2**32: a check against a wrong or truncated file, not a
security guarantee). The result is cached per (path, size, mtime) so large files are hashed once per process.

Not in the manifest because they ship inside the wheels: the LPIPS v0.1 linear heads
(``lpips/weights/v0.1/{alex,vgg}.pth`` in the ``lpips`` package).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from diffinv_pl.utils.io import file_sha256

ENV_VAR = "DIFFINV_WEIGHTS_DIR"


@dataclass(frozen=True)
class WeightFile:
    """One pretrained file: its torch.hub file name, the sha256 prefix it must have, its origin and consumer."""

    filename: str
    sha256_prefix: str
    url: str
    consumer: str


# Keys are the logical weight names; `METRIC_WEIGHTS` maps metric variants to them.
MANIFEST: dict[str, WeightFile] = {
    "alexnet": WeightFile(
        filename="alexnet-owt-7be5be79.pth",  # torchvision AlexNet_Weights.IMAGENET1K_V1
        sha256_prefix="7be5be79",
        url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        consumer="LPIPS AlexNet backbone (torchvision alexnet features, loaded into lpips.LPIPS(net='alex'))",
    ),
    "vgg16": WeightFile(
        filename="vgg16-397923af.pth",  # torchvision VGG16_Weights.IMAGENET1K_V1
        sha256_prefix="397923af",
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        consumer="LPIPS VGG backbone (torchvision vgg16 features, loaded into lpips.LPIPS(net='vgg'))",
    ),
    "inception_fid": WeightFile(
        # TF-ported InceptionV3 of torch-fidelity, used by torchmetrics FrechetInceptionDistance(feature=2048).
        # Public manifests report the full sha256 6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2
        # (95,628,359 bytes); only the name prefix is checked here.
        filename="weights-inception-2015-12-05-6726825d.pth",
        sha256_prefix="6726825d",
        url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth",
        consumer="FID Inception-v3 (torch-fidelity 'inception-v3-compat' via torchmetrics FrechetInceptionDistance)",
    ),
}

# Metric (variant) name -> the manifest entries it needs. PSNR and SSIM need none.
METRIC_WEIGHTS: dict[str, tuple[str, ...]] = {
    "psnr": (),
    "ssim": (),
    "lpips_alex": ("alexnet",),
    "lpips_vgg": ("vgg16",),
    "fid": ("inception_fid",),
}


class WeightsHashError(ValueError):
    """A weights file was found but its sha256 does not match the manifest."""


def hub_checkpoints_dir() -> Path:
    """The torch hub cache, where torch.hub/torchvision look for (and would download) these files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def search_dirs(weights_dir: str | os.PathLike | None = None) -> list[tuple[str, Path | None]]:
    """The three locations in resolution order, as (label, directory or None when not set)."""
    env = os.environ.get(ENV_VAR) or None
    return [
        ("config weights_dir", Path(weights_dir).expanduser() if weights_dir else None),
        (f"${ENV_VAR}", Path(env).expanduser() if env else None),
        ("torch hub cache", hub_checkpoints_dir()),
    ]


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (cached per path, size and modification time)."""
    stat = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def verify_file(path: str | os.PathLike, expected_sha256: str) -> None:
    """Check that the file's sha256 starts with ``expected_sha256`` (a prefix or the full hex digest).

    Raises :class:`WeightsHashError` naming the file, both hashes and the fix.
    """
    expected = expected_sha256.lower()
    actual = sha256_of(path)
    if not actual.startswith(expected):
        raise WeightsHashError(
            f"weights file {path} has sha256 {actual}, expected one starting with {expected}: the file is corrupt, "
            "truncated or a different release. Replace it with the original file (same name, from the URL in "
            "diffinv_pl.metrics.weights.MANIFEST)."
        )


def weights_for_metrics(metric_names: Iterable[str]) -> list[str]:
    """Manifest keys needed by the given metric names (``psnr``, ``ssim``, ``lpips_alex``, ``lpips_vgg``, ``fid``)
    or manifest keys themselves, without duplicates, in order."""
    keys: list[str] = []
    for name in metric_names:
        if name in METRIC_WEIGHTS:
            needed = METRIC_WEIGHTS[name]
        elif name in MANIFEST:
            needed = (name,)
        else:
            raise ValueError(
                f"unknown metric or weight name {name!r}; known metrics: {sorted(METRIC_WEIGHTS)}, "
                f"known weight files: {sorted(MANIFEST)}"
            )
        keys.extend(k for k in needed if k not in keys)
    return keys


def resolve_weights(
    metric_names: Iterable[str],
    weights_dir: str | os.PathLike | None = None,
    *,
    manifest: Mapping[str, WeightFile] | None = None,
    verify: bool | Callable[[Path, str], None] = True,
) -> dict[str, Path]:
    """Local paths of every file the metrics need: ``{manifest key: path}``.

    ``metric_names`` are metric names (see :data:`METRIC_WEIGHTS`) or manifest keys; with a custom ``manifest``
    (tests, extra extractors) they are keys of that manifest. ``verify`` is True (sha256-prefix check with
    :func:`verify_file`), False (no check), or a callable ``verify(path, expected_sha256)`` that raises on mismatch.

    Raises :class:`FileNotFoundError` listing every missing file and the directories searched, or
    :class:`WeightsHashError` for a file with the wrong hash. Never downloads.
    """
    table = MANIFEST if manifest is None else manifest
    names = list(metric_names)
    keys = weights_for_metrics(names) if manifest is None else [n for i, n in enumerate(names) if n not in names[:i]]
    dirs = search_dirs(weights_dir)
    check = verify_file if verify is True else verify if callable(verify) else None

    found: dict[str, Path] = {}
    missing: list[str] = []
    for key in keys:
        if key not in table:
            raise ValueError(f"weight name {key!r} is not in the manifest (known: {sorted(table)})")
        entry = table[key]
        hit = next((d / entry.filename for _, d in dirs if d is not None and (d / entry.filename).is_file()), None)
        if hit is None:
            missing.append(
                f"  - {entry.filename}  (sha256 {entry.sha256_prefix}..., for {entry.consumer}; {entry.url})"
            )
        else:
            found[key] = hit

    if missing:
        where = "\n".join(
            f"  {i}. {label}: {d if d is not None else '(not set)'}" for i, (label, d) in enumerate(dirs, start=1)
        )
        raise FileNotFoundError(
            f"{len(missing)} pretrained metric weight file(s) missing (nothing is downloaded):\n"
            + "\n".join(missing)
            + f"\nPut each file, under exactly this name, in one of (searched in this order):\n{where}\n"
            f"e.g. set {ENV_VAR}=/path/to/weights or the metrics' weights_dir option, or copy the files into the torch "
            "hub cache. Alternatively switch the metric off explicitly (the results then report it as 'off')."
        )
    if check is not None:
        for key, path in found.items():
            check(path, table[key].sha256_prefix)
    return found
