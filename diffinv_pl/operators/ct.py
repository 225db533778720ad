"""2D CT forward operators (PaDIS set-up, methods.md §3.5 and §7) on top of ODL 1.0's ray transform and ASTRA.

Geometry (PaDIS ``odlstuff``; every length is in the same unitless coordinates):

* Reconstruction space: ``image_size`` x ``image_size`` pixels covering [-extent, extent]^2 (default 256 x 256 over
  [-20, 20]^2, pixel side 40 / 256 = 0.15625). Array axis 0 (rows, H) is ODL's x axis and axis 1 (columns, W) its
  y axis; pixel (i, j) is centred at (-extent + (i + 1/2) h, -extent + (j + 1/2) h) with h = 2 extent / image_size.
* Angles: ``num_views`` cell midpoints of a uniform partition of [0, angle_range) (ODL ``uniform_partition``, as
  PaDIS), i.e. phi_k = (k + 1/2) angle_range / num_views. angle_range = pi for ``parallel`` and ``fan``, and
  ``angle_range_deg`` (default 120 degrees = 2 pi / 3) for ``limited_angle`` (a parallel beam).
* Detector: ``num_detectors`` bins (cell midpoints) on [-detector_extent, detector_extent] (default 512 on [-40, 40]).
* ``parallel`` / ``limited_angle`` (ODL ``Parallel2dGeometry``): at angle phi the detector axis is
  u = (cos phi, sin phi) and the rays run along d = (-sin phi, cos phi), so the sinogram is
  ``p(phi, s) = integral f(s u + t d) dt`` (a point at (x, y) projects to s = x cos phi + y sin phi).
* ``fan`` (ODL ``FanBeamGeometry``, flat detector): the source sits at -src_radius (-sin phi, cos phi), the detector
  centre at det_radius (-sin phi, cos phi) with axis u = (cos phi, sin phi); detector coordinates are measured on the
  detector (magnification (src_radius + det_radius) / src_radius = 2 by default, so [-40, 40] covers [-20, 20] at
  the rotation centre, and the image corners are partly truncated as in PaDIS).

Units: the forward operator is the discretised line integral in these coordinates (ASTRA ``linear`` / ``line_fanflat``
projectors, no extra scaling), so sinogram values scale with the pixel size: a ray crossing n pixels of value 1 gives
about n h, not n. A uniform unit disc of radius r has the parallel projection 2 sqrt(r^2 - s^2).

Adjoint: ``adjoint`` (and therefore the autograd backward of ``forward``) is the *Euclidean* transpose A^T of the
matrix that ``forward`` applies to plain arrays, i.e. <A x, y> = <x, A^T y> with unweighted sums. ODL's own
``RayTransform.adjoint`` is the adjoint for the L2 inner products weighted by the pixel area (vol) and the
angle x detector cell size (proj); the two differ by the constant ``weight_ratio = w_vol / w_proj``
(A^T = weight_ratio * ODL adjoint), which is what ``odl.contrib.torch.OperatorModule`` applies in its backward too.

Backends: ``astra_cpu`` (exactly adjoint, used for tests and on CPU) and ``astra_cuda`` (picked by ``impl="auto"``
when torch sees a GPU and ASTRA was built with CUDA). The data round-trips through float32 numpy on the host in both
cases, one ODL call per image. ODL's ``skimage`` backend is refused: its back-projection is not the adjoint of its
forward projection (13-15 % mismatch), which breaks gradients, adjoint-based solvers and the power method.

``pinv`` is ODL's filtered back-projection (Hann filter, ``frequency_scaling`` 0.9 for parallel / limited angle and
0.3 for fan, as PaDIS), an approximate inverse for the L2 weighting, so ``pinv(forward(x)) ~ x`` in image units.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffinv_pl.operators.base import LinearOperator

GEOMETRIES = ("parallel", "fan", "limited_angle")
IMPLS = ("auto", "astra_cpu", "astra_cuda", "skimage")
DEFAULT_NUM_VIEWS = {"parallel": 20, "fan": 180, "limited_angle": 60}
DEFAULT_ANGLE_RANGE_DEG = {"parallel": 180.0, "fan": 180.0, "limited_angle": 120.0}
DEFAULT_FBP_FREQUENCY_SCALING = {"parallel": 0.9, "fan": 0.3, "limited_angle": 0.9}

_SKIMAGE_MESSAGE = (
    "impl='skimage' is not supported: ODL's skimage back-end back-projection is not the adjoint of its forward "
    "projection (13-15% error in <Ax, y> vs <x, A^T y>), so it cannot be used for gradients, adjoints, the power-method "
    "norm or adjoint-based solvers; use impl='astra_cpu' (exactly adjoint) or 'astra_cuda' (pip install astra-toolbox)"
)


def _import_astra() -> Any:
    try:
        import astra  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - exercised with a patched sys.modules
        raise ImportError(
            "CTOperator needs the ASTRA toolbox for ODL's ray transform; install it with `pip install astra-toolbox` "
            "(or `conda install -c astra-toolbox astra-toolbox`)"
        ) from err
    return astra


def _import_tomo() -> Any:
    try:
        import odl  # noqa: PLC0415
        import odl.applications.tomo as tomo  # noqa: PLC0415  (ODL >= 1.0; was odl.tomo before)
    except ImportError as err:  # pragma: no cover
        raise ImportError("CTOperator needs ODL >= 1.0 (`pip install 'odl>=1.0'`)") from err
    return odl, tomo


def resolve_impl(impl: str) -> str:
    """Back-end name for ``impl``: ``auto`` is ``astra_cuda`` when torch and ASTRA both see CUDA, else ``astra_cpu``."""
    if impl not in IMPLS:
        raise ValueError(f"unknown CT impl {impl!r}; valid: {', '.join(IMPLS)}")
    if impl == "skimage":
        raise ValueError(_SKIMAGE_MESSAGE)
    astra = _import_astra()
    if impl == "auto":
        return "astra_cuda" if torch.cuda.is_available() and bool(astra.use_cuda()) else "astra_cpu"
    if impl == "astra_cuda" and not bool(astra.use_cuda()):
        raise ValueError("impl='astra_cuda' requested but this ASTRA build reports no CUDA; use 'astra_cpu' or 'auto'")
    return impl


class CTOperator(LinearOperator):
    """2D ray transform y = A x on (..., 1, H, W) images in [0, 1] -> (..., 1, num_views, num_detectors) sinograms.

    See the module docstring for the coordinate system, angle and detector conventions, units and the adjoint.

    Args:
        geometry: ``"parallel"``, ``"fan"`` or ``"limited_angle"`` (parallel beam on [0, angle_range_deg)).
        num_views: number of projection angles; default 20 (parallel), 180 (fan), 60 (limited angle).
        image_size: H = W of the reconstruction grid.
        extent: the grid covers [-extent, extent]^2.
        num_detectors: detector bins on [-detector_extent, detector_extent].
        detector_extent: half-width of the (flat) detector.
        src_radius, det_radius: fan beam source-to-centre and centre-to-detector distances.
        angle_range_deg: angular range of the scan in degrees; default 180 (parallel, fan), 120 (limited angle).
        impl: ``"auto"``, ``"astra_cpu"``, ``"astra_cuda"``; ``"skimage"`` raises (not adjoint).
        fbp_filter: ODL FBP filter for ``pinv`` (PaDIS: ``"Hann"``).
        fbp_frequency_scaling: ODL FBP frequency scaling; default 0.9 (parallel, limited angle), 0.3 (fan).
    """

    def __init__(
        self,
        geometry: str = "parallel",
        num_views: int | None = None,
        image_size: int = 256,
        extent: float = 20.0,
        num_detectors: int = 512,
        detector_extent: float = 40.0,
        src_radius: float = 40.0,
        det_radius: float = 40.0,
        angle_range_deg: float | None = None,
        impl: str = "auto",
        fbp_filter: str = "Hann",
        fbp_frequency_scaling: float | None = None,
        input_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__()
        if geometry not in GEOMETRIES:
            raise ValueError(f"unknown CT geometry {geometry!r}; valid geometries: {', '.join(GEOMETRIES)}")
        self.impl = resolve_impl(impl)
        num_views = DEFAULT_NUM_VIEWS[geometry] if num_views is None else num_views
        angle_range_deg = DEFAULT_ANGLE_RANGE_DEG[geometry] if angle_range_deg is None else float(angle_range_deg)
        if fbp_frequency_scaling is None:
            fbp_frequency_scaling = DEFAULT_FBP_FREQUENCY_SCALING[geometry]
        for name, value in (("num_views", num_views), ("image_size", image_size), ("num_detectors", num_detectors)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("extent", extent), ("detector_extent", detector_extent), ("src_radius", src_radius),
                            ("det_radius", det_radius)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not 0 < angle_range_deg <= 360:
            raise ValueError(f"angle_range_deg must be in (0, 360], got {angle_range_deg}")
        if not 0 < fbp_frequency_scaling <= 1:
            raise ValueError(f"fbp_frequency_scaling must be in (0, 1], got {fbp_frequency_scaling}")

        self.geometry_name = geometry
        self.num_views, self.image_size, self.num_detectors = int(num_views), int(image_size), int(num_detectors)
        self.extent, self.detector_extent = float(extent), float(detector_extent)
        self.src_radius, self.det_radius = float(src_radius), float(det_radius)
        self.angle_range = math.radians(angle_range_deg)
        self.fbp_filter, self.fbp_frequency_scaling = fbp_filter, float(fbp_frequency_scaling)
        self.in_shape = (1, self.image_size, self.image_size)
        self.out_shape = (1, self.num_views, self.num_detectors)
        self.input_range = tuple(input_range)

        self._build_odl()

    def _build_odl(self) -> None:
        """Create the ODL space, geometry and ray transform from the stored parameters (also after unpickling)."""
        odl, tomo = _import_tomo()
        extent, detector_extent = self.extent, self.detector_extent
        space = odl.uniform_discr([-extent, -extent], [extent, extent], [self.image_size] * 2, dtype="float32")
        angles = odl.uniform_partition(0.0, self.angle_range, self.num_views)
        detector = odl.uniform_partition(-detector_extent, detector_extent, self.num_detectors)
        if self.geometry_name == "fan":
            geom = tomo.FanBeamGeometry(angles, detector, src_radius=self.src_radius, det_radius=self.det_radius)
        else:
            geom = tomo.Parallel2dGeometry(angles, detector)
        self.ray_trafo = tomo.RayTransform(space, geom, impl=self.impl)
        # Euclidean transpose = (w_vol / w_proj) * ODL's weighted L2 adjoint (see the module docstring).
        self.weight_ratio = float(space.weighting.const) / float(self.ray_trafo.range.weighting.const)
        self._fbp = None

    def __getstate__(self) -> dict:
        # ODL geometries hold local lambdas and cannot be pickled (ddp_spawn, multiprocessing): drop and rebuild them
        state = super().__getstate__().copy()
        state["ray_trafo"] = state["_fbp"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._build_odl()

    @property
    def angles(self) -> np.ndarray:
        """Projection angles in radians (cell midpoints), shape (num_views,)."""
        return np.asarray(self.ray_trafo.geometry.angles)

    @property
    def pixel_size(self) -> float:
        return 2.0 * self.extent / self.image_size

    def extra_repr(self) -> str:
        return (f"geometry={self.geometry_name}, num_views={self.num_views}, image_size={self.image_size}, "
                f"num_detectors={self.num_detectors}, impl={self.impl}")

    # --- numpy round trip ------------------------------------------------------------------------------------------

    def _map_images(self, t: Tensor, event_in: tuple[int, ...], event_out: tuple[int, ...], fn) -> Tensor:
        """Apply fn (numpy (h, w) float32 -> numpy array) to every image of t (..., *event_in)."""
        if not t.is_floating_point():
            raise TypeError(f"{type(self).__name__} needs a floating-point tensor, got {t.dtype}")
        batch = t.shape[: t.ndim - len(event_in)]
        arr = np.ascontiguousarray(t.detach().to(device="cpu", dtype=torch.float32).numpy()).reshape(-1, *event_in[1:])
        if not np.isfinite(arr).all():
            raise ValueError(f"{type(self).__name__} input contains NaN or Inf values")
        out = np.empty((arr.shape[0], *event_out[1:]), dtype=np.float32)
        for i in range(arr.shape[0]):
            out[i] = fn(arr[i])
        return torch.from_numpy(out).reshape(*batch, *event_out).to(device=t.device, dtype=t.dtype)

    def _forward(self, x: Tensor) -> Tensor:
        return self._map_images(x, self.in_shape, self.out_shape, lambda a: self.ray_trafo(a).asarray())

    def _adjoint(self, y: Tensor) -> Tensor:
        scale = np.float32(self.weight_ratio)
        back = self.ray_trafo.adjoint
        return self._map_images(y, self.out_shape, self.in_shape, lambda a: back(a).asarray() * scale)

    # --- approximate inverse ---------------------------------------------------------------------------------------

    @property
    def fbp_op(self):
        """ODL filtered back-projection operator (built on first use)."""
        if self._fbp is None:
            _, tomo = _import_tomo()
            self._fbp = tomo.fbp_op(self.ray_trafo, filter_type=self.fbp_filter,
                                    frequency_scaling=self.fbp_frequency_scaling)
        return self._fbp

    def _pinv(self, y: Tensor, num_iterations: int = 200, tol: float = 1e-10, method: str = "fbp") -> Tensor:
        """Approximate inverse: ODL FBP (``method="fbp"``, PaDIS's A^dagger, image units) of y (..., 1, V, D).

        ``method="cg"`` gives the base class's minimum-norm least-squares solution by CG on the normal equations
        (``num_iterations``/``tol`` apply to it only).
        """
        if method == "cg":
            return super()._pinv(y, num_iterations=num_iterations, tol=tol)
        if method != "fbp":
            raise ValueError(f"unknown pinv method {method!r}; valid: 'fbp', 'cg'")
        self.check_measurement(y)
        fbp = self.fbp_op
        with torch.no_grad():
            return self._map_images(y, self.out_shape, self.in_shape, lambda a: fbp(a).asarray())
