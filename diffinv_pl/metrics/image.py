"""Image metrics with one pinned protocol (conventions.md §4): PSNR, SSIM, LPIPS, FID.

Inputs are float tensors (B, C, H, W) in [0, 1] (values up to 1e-6 outside are tolerated and clamped), prediction
and target of the same shape. The protocol:

* **PSNR** per image with data range 1 (torchmetrics ``peak_signal_noise_ratio(dim=(1, 2, 3))``), then averaged
  over images (not the PSNR of the pooled MSE).
* **SSIM**, ``ssim_variant``:

  - ``"gaussian"`` (default): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, population covariance;
  - ``"skimage"``: scikit-image's default ``structural_similarity(data_range=1)``: 7x7 uniform window with the
    sample covariance (N/(N-1) with N = 49).

  The SSIM map is torchmetrics' (``return_full_image=True``) and is averaged over the interior only, cropping
  (window - 1)/2 pixels per side as scikit-image does; both variants then match scikit-image (the gaussian one
  ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``). Note torchmetrics' own reduction also
  averages the reflect-padded border, which gives slightly different numbers on small images. Sample covariance
  is obtained exactly by running the population formula with K2 * sqrt((N-1)/N) (the factor N/(N-1) on every
  (co)variance term cancels against C2). Colour SSIM is the mean over channels.
* **LPIPS** (``lpips="alex"`` or ``"vgg"``): the ``lpips`` package, v0.1 linear heads shipped in its wheel, the
  torchvision ImageNet backbone loaded from the offline weights file; [0, 1] inputs are mapped to [-1, 1]
  (``normalize=True``). One-channel images are repeated to RGB.
* **FID** (``fid=True``): torchmetrics ``FrechetInceptionDistance`` with torch-fidelity's TF-Inception 2048-d,
  ``antialias=False``, or an injected extractor (``fid_feature``); the real side is either the targets passed to
  :meth:`update_fid` or precomputed reference statistics (``fid_reference``, see :mod:`diffinv_pl.metrics.fid_stats`).
  Always report the number of images with it.

Every needed weight file is resolved at construction (config dir -> ``$DIFFINV_WEIGHTS_DIR`` -> torch hub cache),
so a missing file fails before any solving. A metric that is switched off is reported as ``"off"``.
Aggregation uses torchmetrics metric objects, so ``compute()`` is synchronised across processes under DDP.
"""

from __future__ import annotations

import os
import warnings
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric, SumMetric
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from diffinv_pl.metrics.fid_stats import FIDStats, build_fid, missing_fidelity_message, torch_fidelity_available
from diffinv_pl.metrics.weights import resolve_weights, weights_for_metrics

OFF = "off"
RANGE_TOLERANCE = 1e-6

# variant -> (gaussian window?, window size, sigma, K2 factor, description)
_SSIM_VARIANTS = {
    "gaussian": (True, 11, 1.5, 1.0, "11x11 Gaussian sigma=1.5, population covariance, interior mean"),
    "skimage": (False, 7, 1.5, (48 / 49) ** 0.5, "7x7 uniform, sample covariance (skimage default), interior mean"),
}
_LPIPS_NETS = {"alex": "lpips_alex", "vgg": "lpips_vgg"}


def check_images(pred: Tensor, target: Tensor | None = None, *, min_size: int = 1) -> None:
    """Raise one ValueError saying what is wrong and how to fix it unless the inputs follow the metric protocol."""
    for name, x in (("pred", pred), ("target", target)):
        if x is None:
            continue
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor (B, C, H, W), got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}: add the batch/channel "
                             "dimension with x.unsqueeze(0) / x.unsqueeze(1)")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor in [0, 1], got dtype {x.dtype}: use x.float() / 255 "
                             "for 8-bit images")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN/Inf: the reconstruction diverged; fix it before computing metrics")
        lo, hi = float(x.min()), float(x.max())
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise ValueError(
                f"{name} has values in [{lo:.4g}, {hi:.4g}], outside [0, 1]: metrics use data range 1 on [0, 1] "
                "images. Map [-1, 1] model outputs with (x + 1) / 2 and clamp with x.clamp(0, 1) before the metrics"
            )
        if min(x.shape[-2:]) < min_size:
            raise ValueError(f"{name} is {x.shape[-2]}x{x.shape[-1]} pixels, smaller than the {min_size}x{min_size} "
                             "SSIM window: use larger images or switch SSIM off")
    if target is not None and pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}; metrics "
                         "compare images pixel by pixel, so resize/crop the reconstruction to the target's shape")


def _prepare(x: Tensor) -> Tensor:
    return x.clamp(0.0, 1.0)


def _rgb(x: Tensor, what: str) -> Tensor:
    if x.shape[1] == 3:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    raise ValueError(f"{what} needs 1- or 3-channel images, got {x.shape[1]} channels: switch it off for this data")


def load_lpips_backbone(model: nn.Module, path: str | os.PathLike) -> None:
    """Load torchvision ImageNet weights (``alexnet-owt-*.pth`` / ``vgg16-*.pth``) into an ``lpips.LPIPS`` trunk.

    The trunk's slices hold torchvision's ``features`` modules under their original indices, so
    ``slice<k>.<i>.<param>`` is ``features.<i>.<param>`` in the torchvision state dict (strict).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    trunk = model.net
    mapped = {}
    for key in trunk.state_dict():
        _, index, param = key.split(".", 2)
        source = f"features.{index}.{param}"
        if source not in state:
            raise ValueError(f"{path} is not a torchvision {model.pnet_type} checkpoint (no {source!r}): "
                             "use the file named in diffinv_pl.metrics.weights.MANIFEST")
        mapped[key] = state[source]
    trunk.load_state_dict(mapped, strict=True)


def build_lpips(net: str, backbone_path: str | os.PathLike | None) -> nn.Module:
    """``lpips.LPIPS(net)`` with the shipped v0.1 heads and the backbone from ``backbone_path`` (None: random
    backbone, tests only). Never downloads."""
    import lpips

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    if backbone_path is not None:
        load_lpips_backbone(model, backbone_path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class ImageMetrics(nn.Module):
    """PSNR / SSIM / LPIPS per image and their means, plus FID, with the pinned protocol of this module.

    Args:
        psnr, ssim: switch PSNR / SSIM on or off.
        ssim_variant: ``"gaussian"`` (11x11, sigma 1.5) or ``"skimage"`` (7x7 uniform, sample covariance).
        lpips: ``None`` (off), ``"alex"`` or ``"vgg"``.
        fid: switch FID on.
        weights_dir: explicit directory for the pretrained files (first place searched).
        lpips_backbone_weights: ``"pretrained"`` (ImageNet backbone from the weights manifest) or ``"random"``
            (random backbone with the real heads: for tests only, numbers are not LPIPS).
        fid_feature: custom FID feature extractor (nn.Module, (B, C, H, W) -> (B, d)); None = TF-Inception.
        fid_feature_name: name stored with / checked against reference statistics (default: class name).
        fid_input_size: (C, H, W) used to probe a custom extractor without ``num_features``.
        fid_reference: precomputed reference statistics (path to .npz or :class:`FIDStats`); then targets are not
            used for FID.

    Raises at construction, before any solving: FileNotFoundError listing missing weight files,
    ModuleNotFoundError if the Inception FID needs torch-fidelity, ValueError for unknown options.
    """

    def __init__(
        self,
        psnr: bool = True,
        ssim: bool = True,
        ssim_variant: Literal["gaussian", "skimage"] = "gaussian",
        lpips: Literal["alex", "vgg"] | None = None,
        fid: bool = False,
        weights_dir: str | os.PathLike | None = None,
        *,
        lpips_backbone_weights: Literal["pretrained", "random"] = "pretrained",
        fid_feature: nn.Module | None = None,
        fid_feature_name: str | None = None,
        fid_input_size: tuple[int, int, int] | None = None,
        fid_reference: str | os.PathLike | FIDStats | None = None,
    ) -> None:
        super().__init__()
        if ssim_variant not in _SSIM_VARIANTS:
            raise ValueError(f"ssim_variant must be one of {sorted(_SSIM_VARIANTS)}, got {ssim_variant!r}")
        if lpips is not None and lpips not in _LPIPS_NETS:
            raise ValueError(f"lpips must be None (off), 'alex' or 'vgg', got {lpips!r}")
        if lpips_backbone_weights not in ("pretrained", "random"):
            raise ValueError(f"lpips_backbone_weights must be 'pretrained' or 'random', got {lpips_backbone_weights!r}")
        self.use_psnr, self.use_ssim, self.ssim_variant = bool(psnr), bool(ssim), ssim_variant
        self.lpips_net, self.use_fid = lpips, bool(fid)
        self.lpips_backbone_weights = lpips_backbone_weights

        # 1. Every pretrained file first, so that a missing one fails before anything is built or solved.
        #    (build_fid resolves the Inception file again, cached; resolving it here lists all missing files at once.)
        needed = []
        if lpips is not None and lpips_backbone_weights == "pretrained":
            needed.append(_LPIPS_NETS[lpips])
        if self.use_fid and fid_feature is None:
            needed.append("fid")
        missing: FileNotFoundError | None = None
        paths = {}
        try:
            paths = resolve_weights(needed, weights_dir)
        except FileNotFoundError as err:
            missing = err
        if self.use_fid and fid_feature is None and not torch_fidelity_available():
            raise ModuleNotFoundError(missing_fidelity_message() + (f"\nAlso: {missing}" if missing else ""))
        if missing is not None:
            raise missing

        # 2. The metric objects (torchmetrics aggregators: DDP-synchronised at compute()).
        self.lpips_model = None
        if lpips is not None:
            key = weights_for_metrics([_LPIPS_NETS[lpips]])[0]
            self.lpips_model = build_lpips(lpips, paths.get(key))
        self.fid_metric = None
        if self.use_fid:
            self.fid_metric = build_fid(fid_feature, weights_dir=weights_dir, reference=fid_reference,
                                        feature_name=fid_feature_name, input_img_size=fid_input_size)
        self.means = nn.ModuleDict({name: MeanMetric() for name in self.per_image_names()})
        self.num_images = SumMetric()

    # ------------------------------------------------------------------------------------------------ description
    def per_image_names(self) -> list[str]:
        return [n for n, on in (("psnr", self.use_psnr), ("ssim", self.use_ssim), ("lpips", self.lpips_net)) if on]

    def enabled(self) -> dict[str, bool]:
        """Which metrics are on."""
        return {"psnr": self.use_psnr, "ssim": self.use_ssim, "lpips": self.lpips_net is not None, "fid": self.use_fid}

    def protocol(self) -> dict[str, str]:
        """One line per metric describing the variant, or ``"off"``: put it next to the numbers in every table."""
        gauss, size, sigma, _, desc = _SSIM_VARIANTS[self.ssim_variant]
        fid_desc = OFF
        if self.use_fid:
            ref = "reference stats" if self.fid_metric.reference is not None else "paired targets"
            fid_desc = f"{self.fid_metric.feature_name}, real side: {ref}"
        lpips_desc = OFF
        if self.lpips_net is not None:
            lpips_desc = f"lpips v0.1 {self.lpips_net}, [0,1]->[-1,1]"
            if self.lpips_backbone_weights == "random":
                lpips_desc += ", RANDOM backbone (test only)"
        return {
            "psnr": "per image, data_range=1, mean over images" if self.use_psnr else OFF,
            "ssim": f"{self.ssim_variant}: {desc}, data_range=1" if self.use_ssim else OFF,
            "lpips": lpips_desc,
            "fid": fid_desc,
        }

    # ------------------------------------------------------------------------------------------------ computation
    def _ssim(self, pred: Tensor, target: Tensor) -> Tensor:
        gauss, size, sigma, k2_factor, _ = _SSIM_VARIANTS[self.ssim_variant]
        _, ssim_map = structural_similarity_index_measure(
            pred, target, gaussian_kernel=gauss, sigma=sigma, kernel_size=size, data_range=1.0,
            k2=0.03 * k2_factor, reduction="none", return_full_image=True,
        )
        pad = (size - 1) // 2
        return ssim_map[..., pad:-pad, pad:-pad].mean(dim=(1, 2, 3))

    def _ssim_min_size(self) -> int:
        _, size, _, _, _ = _SSIM_VARIANTS[self.ssim_variant]
        return size if self.use_ssim else 1

    @torch.no_grad()
    def per_image(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Per-image values (B,) of the enabled PSNR / SSIM / LPIPS; does not change the running means."""
        check_images(pred, target, min_size=self._ssim_min_size())
        pred, target = _prepare(pred), _prepare(target)
        out: dict[str, Tensor] = {}
        if self.use_psnr:
            p64, t64 = pred.double(), target.double()
            out["psnr"] = peak_signal_noise_ratio(p64, t64, data_range=1.0, reduction="none", dim=(1, 2, 3)).float()
        if self.use_ssim:  # float32: the 11x11 windows run on the fast convolution path (float64 is ~10x slower)
            out["ssim"] = self._ssim(pred.float(), target.float())
        if self.lpips_model is not None:
            p, t = _rgb(pred, "LPIPS").float(), _rgb(target, "LPIPS").float()
            out["lpips"] = self.lpips_model(p, t, normalize=True).reshape(-1)
        return out

    @torch.no_grad()
    def update_fid(self, pred: Tensor, target: Tensor | None = None) -> None:
        """Add generated images (and, without reference statistics, the real targets) to the FID accumulators."""
        if self.fid_metric is None:
            return
        if self.fid_metric.reference is None and target is None:
            raise ValueError("FID without precomputed reference statistics needs the real images: pass target, or "
                             "build ImageMetrics with fid_reference=<stats.npz> "
                             "(python -m diffinv_pl.metrics.fid_stats)")
        check_images(pred, target)
        inception = not self.fid_metric.used_custom_model
        prep = (lambda x: _rgb(_prepare(x), "FID (Inception)")) if inception else (lambda x: _prepare(x).float())
        self.fid_metric.update(prep(pred), real=False)
        if self.fid_metric.reference is None:
            self.fid_metric.update(prep(target), real=True)

    def update(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Add a batch to the running means (and the FID accumulators); returns its per-image values."""
        values = self.per_image(pred, target)
        for name, v in values.items():
            self.means[name].update(v)
        self.num_images.update(torch.tensor(float(pred.shape[0]), device=pred.device))
        self.update_fid(pred, target)
        return values

    def compute(self) -> dict[str, float | int | str]:
        """Means over all images seen (synchronised under DDP), FID, the image counts; ``"off"`` for metrics off."""
        n = 0
        if self.per_image_names():
            if not self.num_images.update_called:
                raise ValueError("no images were added: call update(pred, target) before compute()")
            n = int(self.num_images.compute())
        result: dict[str, float | int | str] = {}
        for name in ("psnr", "ssim", "lpips"):
            result[name] = float(self.means[name].compute()) if name in self.means else OFF
        result["fid"] = float(self.fid_metric.compute()) if self.fid_metric is not None else OFF
        result["num_images"] = n
        if self.fid_metric is not None:
            with self.fid_metric.sync_context():
                result["fid_num_images"] = int(self.fid_metric.fake_features_num_samples)
        return result

    def reset(self) -> None:
        for m in self.means.values():
            m.reset()
        self.num_images.reset()
        if self.fid_metric is not None:
            self.fid_metric.reset()
