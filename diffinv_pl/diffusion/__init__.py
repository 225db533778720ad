"""Diffusion core: schedules and sampling grids, the D(x, sigma) interface and its preconditioning wrappers, steps."""

from diffinv_pl.diffusion.preconditioning import Denoiser, EDMPrecond, VEPrecond, VPEpsPrecond, score_from_denoiser
from diffinv_pl.diffusion.schedules import SamplingGrid, edm_grid, edm_sigmas, vp_grid
from diffinv_pl.diffusion.steps import ddim_step

__all__ = [
    "Denoiser",
    "EDMPrecond",
    "SamplingGrid",
    "VEPrecond",
    "VPEpsPrecond",
    "ddim_step",
    "edm_grid",
    "edm_sigmas",
    "score_from_denoiser",
    "vp_grid",
]
