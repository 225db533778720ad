"""FID pieces: the Frechet distance, reference statistics (mean/covariance of features) and their CLI.

FID itself is torchmetrics ``FrechetInceptionDistance``; this module only adds

* :func:`frechet_distance` on precomputed statistics (torchmetrics' own formula, in float64);
* :class:`FIDStats`, a ``.npz`` of (mu, sigma, num_samples, feature) for a reference image set;
* :class:`ReferenceFID`, torchmetrics FID whose "real" side may be such precomputed statistics;
* :func:`build_fid`: the pinned Inception protocol (torch-fidelity TF-Inception, 2048-d pool features,
  ``antialias=False``, float [0, 1] inputs, weights resolved offline) or an injected feature extractor;
* a CLI that precomputes reference statistics from an image folder::

    python -m diffinv_pl.metrics.fid_stats --images <folder> --out stats.npz [--weights-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

from diffinv_pl.metrics.weights import MANIFEST, resolve_weights

INCEPTION_FEATURE = "inception-v3-compat-2048/torch-fidelity/antialias=False"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def torch_fidelity_available() -> bool:
    return bool(_TORCH_FIDELITY_AVAILABLE)


def missing_fidelity_message() -> str:
    return (
        "FID with the Inception extractor needs the package torch-fidelity, which is not installed: "
        "`pip install torch-fidelity` (or `pip install torchmetrics[image]`), and the weights file "
        f"{MANIFEST['inception_fid'].filename} (see diffinv_pl.metrics.weights). Otherwise pass your own "
        "feature extractor (fid_feature=<nn.Module>) or switch FID off (fid=False)."
    )


def _as_float64(x, name: str) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN/Inf: recompute the statistics (too few samples or a diverged run?)")
    return t


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})``.

    Accepts NumPy arrays or tensors (mu: (d,), sigma: (d, d)); computed in float64 with torchmetrics' FID formula.
    """
    named = ((mu1, "mu1"), (sigma1, "sigma1"), (mu2, "mu2"), (sigma2, "sigma2"))
    m1, s1, m2, s2 = (_as_float64(v, n) for v, n in named)
    d = m1.reshape(-1).shape[0]
    if m2.reshape(-1).shape[0] != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"Frechet distance needs mu (d,) and sigma (d, d) of the same d for both sets; got mu1 {tuple(m1.shape)}, "
            f"sigma1 {tuple(s1.shape)}, mu2 {tuple(m2.shape)}, sigma2 {tuple(s2.shape)}: were the statistics computed "
            "with the same feature extractor?"
        )
    return float(_compute_fid(m1.reshape(-1), s1, m2.reshape(-1), s2))


@dataclass
class FIDStats:
    """Feature statistics of an image set: mean (d,), covariance (d, d) with the 1/(N-1) normalisation, N and the
    name of the feature extractor (statistics from different extractors must never be compared)."""

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int
    feature: str

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64).reshape(-1)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        d = self.mu.shape[0]
        if self.sigma.shape != (d, d):
            raise ValueError(f"FID statistics: sigma must be ({d}, {d}) for mu of length {d}, got {self.sigma.shape}")
        if int(self.num_samples) < 2:
            raise ValueError(f"FID statistics need at least 2 samples, got {self.num_samples}")
        self.num_samples = int(self.num_samples)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:  # a file handle: np.savez would append .npz to other suffixes
            np.savez(handle, mu=self.mu, sigma=self.sigma, num_samples=np.int64(self.num_samples),
                     feature=np.array(self.feature))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FIDStats:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"FID reference statistics {path} not found: create them with "
                f"`python -m diffinv_pl.metrics.fid_stats --images <reference folder> --out {path}`"
            )
        with np.load(path, allow_pickle=False) as data:
            missing = {"mu", "sigma", "num_samples", "feature"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not an FID statistics file (missing {sorted(missing)}); recreate it with "
                                 "`python -m diffinv_pl.metrics.fid_stats`")
            return cls(data["mu"], data["sigma"], int(data["num_samples"]), str(data["feature"]))


def _stats_from_states(feat_sum: Tensor, cov_sum: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance from torchmetrics FID states (the same formula as its ``compute``)."""
    mean = (feat_sum / n).unsqueeze(0)
    cov = (cov_sum - n * mean.t().mm(mean)) / (n - 1)
    return mean.squeeze(0), cov


class ReferenceFID(FrechetInceptionDistance):
    """torchmetrics FID whose real side can be precomputed :class:`FIDStats` (then only fake images are updated).

    States, DDP synchronisation and the feature accumulation are torchmetrics'; with a reference, ``compute`` takes
    the fake mean/covariance from the (synchronised) states and the real ones from the reference.
    """

    def __init__(self, *args, reference: FIDStats | None = None, feature_name: str = "custom", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.feature_name = feature_name
        self.reference = reference
        if reference is not None:
            num = self.fake_features_sum.shape[0]
            if reference.feature != feature_name or reference.mu.shape[0] != num:
                raise ValueError(
                    f"FID reference statistics were computed with feature extractor {reference.feature!r} "
                    f"({reference.mu.shape[0]}-d), but this FID uses {feature_name!r} ({num}-d): recompute them with "
                    "`python -m diffinv_pl.metrics.fid_stats` using the same extractor"
                )

    def compute(self) -> Tensor:
        if self.reference is None:
            return super().compute()
        if self.fake_features_num_samples < 2:
            raise RuntimeError("FID needs at least 2 generated images: call update_fid on more images first")
        mu, sigma = _stats_from_states(
            self.fake_features_sum, self.fake_features_cov_sum, self.fake_features_num_samples
        )
        ref_mu = torch.as_tensor(self.reference.mu, dtype=torch.float64, device=mu.device)
        ref_sigma = torch.as_tensor(self.reference.sigma, dtype=torch.float64, device=mu.device)
        return _compute_fid(mu, sigma, ref_mu, ref_sigma).to(self.orig_dtype)

    def real_stats(self) -> FIDStats:
        """Statistics of the real images accumulated so far (synchronised across processes under DDP)."""
        with self.sync_context():
            n = self.real_features_num_samples.clone()
            if n < 2:
                raise ValueError(f"FID reference statistics need at least 2 images, got {int(n)}")
            mu, sigma = _stats_from_states(self.real_features_sum, self.real_features_cov_sum, n)
        return FIDStats(mu.cpu().numpy(), sigma.cpu().numpy(), int(n), self.feature_name)


def build_fid(
    feature: nn.Module | None = None,
    *,
    weights_dir: str | os.PathLike | None = None,
    reference: FIDStats | str | os.PathLike | None = None,
    feature_name: str | None = None,
    input_img_size: Sequence[int] | None = None,
) -> ReferenceFID:
    """FID metric for float images in [0, 1].

    ``feature=None``: the pinned protocol, torch-fidelity's TF-Inception (2048-d) with ``antialias=False``; needs the
    torch-fidelity package and the manifest's Inception weights (resolved offline; missing -> FileNotFoundError).
    Otherwise ``feature`` is any module mapping a (B, C, H, W) float batch to (B, d) features; give it a
    ``num_features`` attribute or pass ``input_img_size`` (C, H, W) so torchmetrics can probe d.
    """
    if isinstance(reference, (str, os.PathLike)):
        reference = FIDStats.load(reference)
    if feature is None:
        missing_files = None
        try:
            path = resolve_weights(["fid"], weights_dir)["inception_fid"]
        except FileNotFoundError as err:
            missing_files = err
        if not torch_fidelity_available():
            msg = missing_fidelity_message()
            raise ModuleNotFoundError(msg + (f"\nAlso: {missing_files}" if missing_files else ""))
        if missing_files is not None:
            raise missing_files
        return ReferenceFID(feature=2048, normalize=True, antialias=False, feature_extractor_weights_path=str(path),
                            reference=reference, feature_name=INCEPTION_FEATURE)
    if not isinstance(feature, nn.Module):
        raise TypeError(f"fid feature extractor must be an nn.Module, got {type(feature).__name__}")
    kwargs = {}
    if not hasattr(feature, "num_features"):
        if input_img_size is None:
            raise ValueError(
                "custom FID feature extractor: set a `num_features` attribute (the feature dimension) on the module "
                "or pass input_img_size=(C, H, W) so the dimension can be probed"
            )
        kwargs["input_img_size"] = tuple(input_img_size)
    return ReferenceFID(feature=feature, normalize=True, reference=reference,
                        feature_name=feature_name or type(feature).__name__, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Image folders and the CLI


def list_images(folder: str | os.PathLike) -> list[Path]:
    """PNG/JPG files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no PNG/JPG images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(path: str | os.PathLike, channels: int = 3) -> Tensor:
    """An image file as a float tensor (C, H, W) in [0, 1] (RGB for channels=3, grey for channels=1)."""
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).float().div_(255.0)
    return t.permute(2, 0, 1) if t.ndim == 3 else t.unsqueeze(0)


def iter_image_batches(paths: Iterable[Path], batch_size: int, channels: int = 3) -> Iterator[Tensor]:
    """Batches (B, C, H, W) of consecutive images; a batch is cut early when the image size changes."""
    batch: list[Tensor] = []
    for path in paths:
        img = load_image(path, channels)
        if batch and (len(batch) == batch_size or img.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(img)
    if batch:
        yield torch.stack(batch)


@torch.no_grad()
def compute_reference_stats(
    batches: Iterable[Tensor], fid: ReferenceFID, device: str | torch.device = "cpu"
) -> FIDStats:
    """Feature statistics of image batches (float, [0, 1]) through the metric's feature extractor."""
    fid = fid.to(device)
    for batch in batches:
        fid.update(batch.to(device), real=True)
    return fid.real_stats()


def folder_stats(
    folder: str | os.PathLike,
    *,
    weights_dir: str | os.PathLike | None = None,
    feature: nn.Module | None = None,
    feature_name: str | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
) -> FIDStats:
    """Reference statistics of every PNG/JPG in ``folder`` (sorted), RGB in [0, 1]."""
    paths = list_images(folder)
    fid = build_fid(feature, weights_dir=weights_dir, feature_name=feature_name, input_img_size=None
                    if feature is None or hasattr(feature, "num_features") else tuple(load_image(paths[0]).shape))
    return compute_reference_stats(iter_image_batches(paths, batch_size), fid, device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffinv_pl.metrics.fid_stats",
        description="Precompute FID reference statistics (mean, covariance of Inception features) of an image folder.",
    )
    parser.add_argument("--images", required=True, help="folder of PNG/JPG images (read in sorted order)")
    parser.add_argument("--out", required=True, help="output .npz (mu, sigma, num_samples, feature)")
    parser.add_argument("--weights-dir", default=None,
                        help="directory holding the Inception weights "
                        "(else $DIFFINV_WEIGHTS_DIR, else the torch hub cache)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        stats = folder_stats(args.images, weights_dir=args.weights_dir, batch_size=args.batch_size, device=args.device)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = stats.save(args.out)
    print(f"wrote {out}: {stats.num_samples} images, {stats.mu.shape[0]}-d features ({stats.feature})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
