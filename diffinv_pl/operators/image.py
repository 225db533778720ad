"""Image forward operators on (..., C, H, W) tensors (methods.md §1.2, §6.4 and §7).

Linear: identity (denoising), blur (Gaussian, motion, uniform) with a ``circular`` or ``reflect`` boundary,
super-resolution as antialiased bicubic down-sampling (Shocher/DDRM ``Resizer`` semantics) or as blur + stride
(CoDPS), box and random inpainting masks. Nonlinear: phase retrieval and HDR.

Conventions: a blur *correlates* the image with its kernel, ``y[i] = sum_j k[j] x[i + j - c]`` (torch ``conv2d``,
as the DPS code family), c the kernel centre. ``circular`` wraps around (exact FFT diagonalisation, so the CoDPS Gram
inverse and the pseudo-inverse are exact); ``reflect`` pads by reflection as the DPS code does (its Gram inverse uses
the circulant model, an approximation the CoDPS code makes too). Random parameters (motion kernels, masks) are drawn by
``sample_params(batch, generator)`` and installed with ``set_params``; a fresh operator holds one draw from its
``seed``. Parameters with batch 1 apply to every sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from diffinv_pl.operators.base import ForwardOperator, LinearOperator
from diffinv_pl.operators.kernels import gaussian_kernel, motion_kernel, uniform_kernel

BOUNDARIES = ("circular", "reflect")


def _apply_real_spectrum(images: Tensor, spectrum: Tensor) -> Tensor:
    """ifft2(fft2(images) * spectrum) for real images and a Hermitian-symmetric full (..., H, W) ``spectrum`` (that
    of a real filter), through the real-input FFT: only the first W//2 + 1 columns of ``spectrum`` are used."""
    h, w = images.shape[-2:]
    return torch.fft.irfft2(torch.fft.rfft2(images) * spectrum[..., : w // 2 + 1], s=(h, w))


def _fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (fast FFT lengths)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _per_sample(v: Tensor | float, like: Tensor) -> Tensor | float:
    """The Gram-inverse variance v: a scalar, or one value per sample shaped (B, 1, 1, 1) to broadcast on images."""
    if torch.is_tensor(v) and v.ndim:
        return v.to(like.dtype).reshape(-1, 1, 1, 1)
    return v


def _install_params(op: LinearOperator, buffer: str, params: Tensor) -> None:
    """Replace an operator's per-sample parameter buffer (B, ...) after checking the per-sample shape."""
    current = getattr(op, buffer)
    if params.ndim != current.ndim or params.shape[1:] != current.shape[1:]:
        expected = ", ".join(map(str, current.shape[1:]))
        raise ValueError(f"{type(op).__name__} parameters must be (B, {expected}), got {tuple(params.shape)}")
    setattr(op, buffer, params.to(current))
    op._norm_cache = None  # the norm depends on the parameters


def _flatten_images(x: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, tuple[int, ...]]:
    batch = x.shape[: x.ndim - len(shape)]
    return x.reshape(-1, *shape), batch


class Identity(LinearOperator):
    """y = x (denoising)."""

    def __init__(self, channels: int = 3, image_size: int = 256, input_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        self.in_shape = self.out_shape = (channels, image_size, image_size)
        self.input_range = tuple(input_range)

    def _forward(self, x: Tensor) -> Tensor:
        return x.clone()

    def _adjoint(self, y: Tensor) -> Tensor:
        return y.clone()

    def _pinv(self, y: Tensor, num_iterations: int = 0, tol: float = 0.0) -> Tensor:
        return y.clone()

    def gram_inverse(self, y: Tensor, sigma_y: float, v: Tensor | float) -> Tensor:
        return y / (sigma_y**2 + _per_sample(v, y))


class Blur(LinearOperator):
    """Correlation with a (per-sample) kernel; see the module docstring for boundary models.

    ``kernel`` is (kh, kw) for a fixed blur; subclasses with random kernels hold (B, kh, kw) parameters.
    """

    def __init__(
        self,
        kernel: Tensor,
        channels: int = 3,
        image_size: int = 256,
        boundary: str = "reflect",
        input_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        if boundary not in BOUNDARIES:
            raise ValueError(f"unknown boundary {boundary!r}; valid: {', '.join(BOUNDARIES)}")
        kernel = kernel if kernel.ndim == 3 else kernel[None]
        kh, kw = kernel.shape[-2:]
        if kh % 2 == 0 or kw % 2 == 0 or kh > image_size or kw > image_size:
            raise ValueError(f"kernel {kh}x{kw} must be odd-sized and not larger than the {image_size}px image")
        self.boundary = boundary
        self.in_shape = self.out_shape = (channels, image_size, image_size)
        self.input_range = tuple(input_range)
        self.register_buffer("kernel", kernel.to(torch.float64))
        # kernel spectra per (dtype, device, grid size), valid while the kernel tensor and its version are unchanged
        self._spectra: tuple[Tensor | None, int, dict[tuple, Tensor]] = (None, -1, {})

    # -- kernel spectrum: kernel embedded with its centre at (0, 0) of a (h, w) grid (the image grid by default)
    def _spectrum(self, dtype: torch.dtype, device: torch.device, size: tuple[int, int] | None = None) -> Tensor:
        H, W = size if size is not None else self.in_shape[-2:]
        ref, version, spectra = self._spectra
        if ref is not self.kernel or version != self.kernel._version:  # set_params, .to() or an in-place update
            spectra = {}
            self._spectra = (self.kernel, self.kernel._version, spectra)
        key = (dtype, str(device), H, W)
        if key not in spectra:
            spectra[key] = self._compute_spectrum(dtype, device, H, W)
        return spectra[key]

    def _compute_spectrum(self, dtype: torch.dtype, device: torch.device, H: int, W: int) -> Tensor:
        kh, kw = self.kernel.shape[-2:]
        grid = torch.zeros(self.kernel.shape[0], H, W, dtype=torch.float64, device=self.kernel.device)
        grid[:, :kh, :kw] = self.kernel
        grid = torch.roll(grid, shifts=(-(kh // 2), -(kw // 2)), dims=(-2, -1))
        spec = torch.fft.fft2(grid)
        return spec.to(torch.complex128 if dtype == torch.float64 else torch.complex64).to(device)[:, None]

    def _batched(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        flat, batch = _flatten_images(x, self.in_shape)
        if self.kernel.shape[0] not in (1, flat.shape[0]):
            raise ValueError(f"{self.kernel.shape[0]} kernels for a batch of {flat.shape[0]} images")
        return flat, batch

    @staticmethod
    def _correlate(images: Tensor, spec: Tensor, conj: bool) -> Tensor:
        """Circular correlation (conj=True) or its adjoint, the circular convolution (conj=False), by FFT.

        Real images: the real-input FFT keeps the W//2 + 1 non-redundant columns of the full spectrum ``spec``
        (about half the work of a complex FFT)."""
        return _apply_real_spectrum(images, spec.conj() if conj else spec)

    @property
    def _padding(self) -> tuple[int, int, int, int]:
        kh, kw = self.kernel.shape[-2:]
        return (kw // 2, kw // 2, kh // 2, kh // 2)

    def _forward(self, x: Tensor) -> Tensor:
        """circular: FFT correlation on the image grid; reflect: reflection-pad by half the kernel, FFT-correlate on
        the padded grid (no wrap-around reaches the centre crop, so this equals conv2d on the padded image), crop."""
        flat, batch = self._batched(x)
        if self.boundary == "circular":
            out = self._correlate(flat, self._spectrum(x.dtype, x.device), conj=True)
        else:
            left, _, top, _ = self._padding
            padded = F.pad(flat, self._padding, mode="reflect")
            grid = _fft_size(padded.shape[-2]), _fft_size(padded.shape[-1])  # zero tail: a faster FFT, no wrap-around
            padded = F.pad(padded, (0, grid[1] - padded.shape[-1], 0, grid[0] - padded.shape[-2]))
            full = self._correlate(padded, self._spectrum(x.dtype, x.device, grid), conj=True)
            out = full[..., top : top + flat.shape[-2], left : left + flat.shape[-1]]
        return out.reshape(*batch, *self.in_shape)

    def _adjoint(self, y: Tensor) -> Tensor:
        flat, batch = self._batched(y)
        if self.boundary == "circular":
            out = self._correlate(flat, self._spectrum(y.dtype, y.device), conj=False)
        else:  # adjoint of crop (zero-embed), of the correlation, then of the reflection padding (fold back)
            left, right, top, bottom = self._padding
            h, w = flat.shape[-2] + top + bottom, flat.shape[-1] + left + right
            grid = _fft_size(h), _fft_size(w)
            embedded = F.pad(flat, (left, grid[1] - w + right, top, grid[0] - h + bottom))
            full = self._correlate(embedded, self._spectrum(y.dtype, y.device, grid), conj=False)[..., :h, :w]
            _, pad_vjp = torch.func.vjp(lambda z: F.pad(z, self._padding, mode="reflect"), torch.zeros_like(flat))
            out = pad_vjp(full)[0]
        return out.reshape(*batch, *self.in_shape)

    def gram_inverse(self, y: Tensor, sigma_y: float, v: Tensor | float) -> Tensor:
        """(sigma_y^2 + v |K^|^2)^-1 in Fourier: exact for ``circular``, the circulant model for ``reflect``."""
        flat, batch = self._batched(y)
        power = self._spectrum(y.dtype, y.device).abs() ** 2
        v = _per_sample(v, y)
        return _apply_real_spectrum(flat, 1.0 / (sigma_y**2 + v * power)).reshape(*batch, *self.in_shape)

    def _pinv(self, y: Tensor, num_iterations: int = 200, tol: float = 1e-10) -> Tensor:
        """``circular``: the exact pseudo-inverse in Fourier (frequencies with |K^| <= 1e-8 max set to 0);
        ``reflect``: conjugate gradients (the base class)."""
        if self.boundary == "reflect":
            return super()._pinv(y, num_iterations, tol)
        flat, batch = self._batched(y)
        spec = self._spectrum(y.dtype, y.device)
        mag = spec.abs()
        keep = mag > 1e-8 * mag.amax(dim=(-2, -1), keepdim=True)
        inv = torch.where(keep, 1.0 / torch.where(keep, spec.conj(), torch.ones_like(spec)), torch.zeros_like(spec))
        return _apply_real_spectrum(flat, inv).reshape(*batch, *self.in_shape)


class GaussianBlur(Blur):
    """Gaussian blur, 61x61 kernel with std 3 by default (DPS family)."""

    def __init__(self, kernel_size: int = 61, std: float = 3.0, **kwargs) -> None:
        super().__init__(gaussian_kernel(kernel_size, std), **kwargs)


class UniformBlur(Blur):
    """Uniform (box) blur, 17x17 by default (PaDIS)."""

    def __init__(self, kernel_size: int = 17, **kwargs) -> None:
        super().__init__(uniform_kernel(kernel_size), **kwargs)


class MotionBlur(Blur):
    """Random-trajectory motion blur (61x61, intensity 0.5); one kernel per sample, drawn from a generator."""

    def __init__(self, kernel_size: int = 61, intensity: float = 0.5, seed: int = 0, **kwargs) -> None:
        self.kernel_size, self.intensity = kernel_size, intensity
        super().__init__(self._draw(1, torch.Generator().manual_seed(seed)), **kwargs)

    def _draw(self, batch_size: int, generator: torch.Generator) -> Tensor:
        return torch.stack([motion_kernel(self.kernel_size, self.intensity, generator) for _ in range(batch_size)])

    def sample_params(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """(batch_size, k, k) kernels; the same generator state gives the same kernels."""
        return self._draw(batch_size, generator)

    def set_params(self, kernels: Tensor) -> None:
        """Install (B, k, k) kernels (B = 1 applies one kernel to every sample)."""
        _install_params(self, "kernel", kernels)

    @property
    def param_batch_size(self) -> int:
        return self.kernel.shape[0]


class BlurStrideSR(LinearOperator):
    """Super-resolution as in CoDPS: circular Gaussian blur (9x9, std 3) then keep every ``factor``-th pixel.

    With S the subsampling, A A^T = S C C^T S^T is diagonal in the Fourier basis of the low-resolution grid with
    eigenvalues lam(f) = (1 / s^2) sum over the s^2 aliases a of |K^(f + a h)|^2 (the "Gamma from Lambda" mapping),
    which makes the Gram inverse and the pseudo-inverse A^T (A A^T)^-1 exact. The CoDPS code blurs with reflection
    padding; the circular boundary is our choice so that these are exact (the interior is identical).
    """

    def __init__(self, factor: int = 4, kernel_size: int = 9, std: float = 3.0, channels: int = 3, image_size: int = 256,
                 input_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        if factor < 1 or image_size % factor:
            raise ValueError(f"image size {image_size} must be a multiple of the factor {factor}")
        self.factor = factor
        self.blur = Blur(gaussian_kernel(kernel_size, std), channels, image_size, boundary="circular")
        self.in_shape = (channels, image_size, image_size)
        self.out_shape = (channels, image_size // factor, image_size // factor)
        self.input_range = tuple(input_range)

    def _forward(self, x: Tensor) -> Tensor:
        return self.blur._forward(x)[..., :: self.factor, :: self.factor]

    def _adjoint(self, y: Tensor) -> Tensor:
        up = torch.zeros(*y.shape[:-2], *self.in_shape[-2:], dtype=y.dtype, device=y.device)
        up[..., :: self.factor, :: self.factor] = y
        return self.blur._adjoint(up)

    def _gram_eigenvalues(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        power = self.blur._spectrum(dtype, device)[0, 0].abs() ** 2  # (H, W)
        s, h = self.factor, self.out_shape[-1]
        return power.reshape(s, h, s, h).mean(dim=(0, 2))  # average over the s^2 aliases

    def gram_inverse(self, y: Tensor, sigma_y: float, v: Tensor | float) -> Tensor:
        lam = self._gram_eigenvalues(y.dtype, y.device)
        v = _per_sample(v, y)
        return torch.fft.ifft2(torch.fft.fft2(y) / (sigma_y**2 + v * lam)).real

    def _pinv(self, y: Tensor, num_iterations: int = 0, tol: float = 0.0) -> Tensor:
        """A^T (A A^T)^-1 y: exact, the Gaussian kernel's aliased spectrum is strictly positive."""
        lam = self._gram_eigenvalues(y.dtype, y.device)
        return self._adjoint(torch.fft.ifft2(torch.fft.fft2(y) / lam).real)


def cubic(x: Tensor) -> Tensor:
    """Keys cubic convolution kernel with a = -0.5 (MATLAB imresize / ResizeRight ``cubic``)."""
    ax = x.abs()
    return torch.where(
        ax <= 1, 1.5 * ax**3 - 2.5 * ax**2 + 1, torch.where(ax <= 2, -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2, torch.zeros_like(ax))
    )


def bicubic_resize_matrix(in_size: int, out_size: int) -> Tensor:
    """1-D antialiased bicubic resize matrix (out_size, in_size), float64, with MATLAB ``imresize`` semantics as in
    the Shocher resizer used by DDRM/DPS: output pixel i sits at input coordinate (i + 0.5) / s - 0.5 with
    s = out/in; when down-scaling the kernel is stretched by 1/s (antialiasing); out-of-range taps are mirrored
    (symmetric padding); each row is normalised to sum 1."""
    scale = out_size / in_size
    stretch = min(scale, 1.0)
    support = 4.0 / stretch
    centres = (torch.arange(out_size, dtype=torch.float64) + 0.5) / scale - 0.5
    left = torch.floor(centres - support / 2).long()
    taps = left[:, None] + torch.arange(int(math.ceil(support)) + 2)[None]
    weights = stretch * cubic(stretch * (centres[:, None] - taps))
    weights = weights / weights.sum(1, keepdim=True)
    mirrored = torch.where(taps < 0, -taps - 1, taps)
    mirrored = torch.where(mirrored >= in_size, 2 * in_size - 1 - mirrored, mirrored).clamp(0, in_size - 1)
    mat = torch.zeros(out_size, in_size, dtype=torch.float64)
    mat.scatter_add_(1, mirrored, weights)
    return mat


class BicubicSR(LinearOperator):
    """Super-resolution by antialiased bicubic down-sampling (x1/4 by default), y = M_h x M_w^T per channel.

    Separable, so A^T, the exact pseudo-inverse pinv(M_h) y pinv(M_w)^T and the exact Gram inverse (eigen-
    decompositions of M M^T per axis) are cheap.
    """

    def __init__(self, factor: int = 4, channels: int = 3, image_size: int = 256,
                 input_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        if factor < 1 or image_size % factor:
            raise ValueError(f"image size {image_size} must be a multiple of the factor {factor}")
        low = image_size // factor
        mat = bicubic_resize_matrix(image_size, low)
        self.register_buffer("matrix", mat)
        self.register_buffer("matrix_pinv", torch.linalg.pinv(mat))
        gram_eig, gram_vec = torch.linalg.eigh(mat @ mat.T)
        self.register_buffer("gram_eig", gram_eig)
        self.register_buffer("gram_vec", gram_vec)
        self.in_shape = (channels, image_size, image_size)
        self.out_shape = (channels, low, low)
        self.input_range = tuple(input_range)

    @staticmethod
    def _sandwich(left: Tensor, x: Tensor, right: Tensor) -> Tensor:
        return left.to(x.dtype) @ x @ right.to(x.dtype).T

    def _forward(self, x: Tensor) -> Tensor:
        return self._sandwich(self.matrix, x, self.matrix)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._sandwich(self.matrix.T, y, self.matrix.T)

    def _pinv(self, y: Tensor, num_iterations: int = 0, tol: float = 0.0) -> Tensor:
        return self._sandwich(self.matrix_pinv, y, self.matrix_pinv)

    def gram_inverse(self, y: Tensor, sigma_y: float, v: Tensor | float) -> Tensor:
        """A A^T = (M M^T) (x) (M M^T) = (Q (x) Q) diag(e_i e_j) (Q (x) Q)^T."""
        Q = self.gram_vec.to(y.dtype)
        lam = self.gram_eig.to(y.dtype)
        v = _per_sample(v, y)
        z = Q.T @ y @ Q
        return Q @ (z / (sigma_y**2 + v * lam[:, None] * lam[None, :])) @ Q.T


class Inpainting(LinearOperator):
    """y = m * x with a 0/1 mask m shared by the channels; dropped pixels read 0. One mask per sample.

    ``mask_type="random"`` drops a fraction p ~ U[lo, hi) of the pixels (``drop_range``; 0.7 fixed with
    lo = hi = 0.7); ``"box"`` drops one box of ``box_size`` at a uniform random position at least ``margin`` px
    from the border (128x128 with margin 16 as DPS/ReSample; DAPS uses 32).
    """

    MASK_TYPES = ("random", "box")

    def __init__(self, mask_type: str = "random", drop_range: tuple[float, float] = (0.7, 0.7), box_size: int = 128,
                 margin: int = 16, channels: int = 3, image_size: int = 256, seed: int = 0,
                 input_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        if mask_type not in self.MASK_TYPES:
            raise ValueError(f"unknown mask type {mask_type!r}; valid: {', '.join(self.MASK_TYPES)}")
        lo, hi = drop_range
        if not 0 <= lo <= hi < 1:
            raise ValueError(f"drop_range must satisfy 0 <= lo <= hi < 1, got {drop_range}")
        if mask_type == "box" and box_size + 2 * margin > image_size:
            raise ValueError(f"a {box_size}px box with a {margin}px margin does not fit a {image_size}px image")
        self.mask_type, self.drop_range, self.box_size, self.margin = mask_type, (lo, hi), box_size, margin
        self.in_shape = self.out_shape = (channels, image_size, image_size)
        self.input_range = tuple(input_range)
        self.register_buffer("mask", self.sample_params(1, torch.Generator().manual_seed(seed)))

    def sample_params(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """(batch_size, 1, H, W) float masks (1 = observed)."""
        size = self.in_shape[-1]
        masks = torch.ones(batch_size, 1, size, size, dtype=torch.float64)
        for b in range(batch_size):
            if self.mask_type == "random":
                lo, hi = self.drop_range
                p = lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))
                masks[b, 0] = (torch.rand(size, size, generator=generator, dtype=torch.float64) >= p).double()
            else:
                span = size - 2 * self.margin - self.box_size + 1
                top, left = (self.margin + int(torch.randint(span, (), generator=generator)) for _ in range(2))
                masks[b, 0, top : top + self.box_size, left : left + self.box_size] = 0
        return masks

    def set_params(self, masks: Tensor) -> None:
        """Install (B, 1, H, W) masks (B = 1 applies one mask to every sample)."""
        _install_params(self, "mask", masks)

    @property
    def param_batch_size(self) -> int:
        return self.mask.shape[0]

    def _apply_mask(self, x: Tensor) -> Tensor:
        flat, batch = _flatten_images(x, self.in_shape)
        if self.mask.shape[0] not in (1, flat.shape[0]):
            raise ValueError(f"{self.mask.shape[0]} masks for a batch of {flat.shape[0]} images")
        return (flat * self.mask.to(x.dtype)).reshape(*batch, *self.in_shape)

    def _forward(self, x: Tensor) -> Tensor:
        return self._apply_mask(x)

    def _adjoint(self, y: Tensor) -> Tensor:
        return self._apply_mask(y)

    def _pinv(self, y: Tensor, num_iterations: int = 0, tol: float = 0.0) -> Tensor:
        return self._apply_mask(y)

    def gram_inverse(self, y: Tensor, sigma_y: float, v: Tensor | float) -> Tensor:
        """(sigma_y^2 + v m)^-1 y, diagonal (CoDPS)."""
        flat, batch = _flatten_images(y, self.in_shape)
        v = _per_sample(v, y)
        return (flat / (sigma_y**2 + v * self.mask.to(y.dtype))).reshape(*batch, *self.in_shape)


class PhaseRetrieval(ForwardOperator):
    """y = |F(pad(x))|: zero-pad by floor(oversample / 8 * H) px per side, centred orthonormal 2-D FFT magnitude.

    Oversampling 2 on 256 px pads 64 px per side (384 x 384), as the DPS code. The DPS family applies it to
    [-1, 1] images, DAPS to [0, 1] (``input_range``).
    """

    def __init__(self, oversample: float = 2.0, channels: int = 3, image_size: int = 256,
                 input_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        self.pad = int(oversample / 8.0 * image_size)
        self.in_shape = (channels, image_size, image_size)
        self.out_shape = (channels, image_size + 2 * self.pad, image_size + 2 * self.pad)
        self.input_range = tuple(input_range)

    def _forward(self, x: Tensor) -> Tensor:
        padded = F.pad(x, (self.pad,) * 4)
        spectrum = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(padded, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
        return spectrum.abs()


class HighDynamicRange(ForwardOperator):
    """y = clip(scale * x, -1, 1) on [-1, 1] images (DAPS HDR, scale 2)."""

    def __init__(self, scale: float = 2.0, channels: int = 3, image_size: int = 256) -> None:
        super().__init__()
        self.scale = scale
        self.in_shape = self.out_shape = (channels, image_size, image_size)
        self.input_range = (-1.0, 1.0)

    def _forward(self, x: Tensor) -> Tensor:
        return (self.scale * x).clamp(-1.0, 1.0)
