"""diffinv_pl: train diffusion priors and evaluate diffusion inverse-problem solvers with PyTorch Lightning.

Dependency direction: ``diffusion`` -> ``priors`` -> ``operators`` -> ``solvers`` -> ``tasks``,
with ``data`` and ``metrics`` beside.
"""

__version__ = "0.1.0"
