"""Data: generated problem sets (Gaussian-mixture inverse problems); image and CT data come with later issues."""

from diffinv_pl.data.gmm_problems import GMMProblemSet, grid_means, grid_prior, make_gmm_problems

__all__ = ["GMMProblemSet", "grid_means", "grid_prior", "make_gmm_problems"]
