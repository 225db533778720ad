"""Data: GMM problem sets and samples, image folders, indexed webdataset shards, CT phantoms, rank splits."""

from diffinv_pl.data.gmm_problems import GMMProblemSet, grid_means, grid_prior, make_gmm_problems

__all__ = ["GMMProblemSet", "grid_means", "grid_prior", "make_gmm_problems"]
