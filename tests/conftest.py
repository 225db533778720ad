"""Shared fixtures: offline environment, repository paths, Hydra composition of the real configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diffinv_pl.priors.base import Prior

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def compose(config_name: str, overrides: list[str]):
    """Compose a real config from conf/ (``paths.output_dir`` must be overridden: no Hydra run dir here)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def user_error(main, argv, capsys) -> str:
    """Run an entry point ``main(argv)`` that must refuse: exit status 2 (``report_user_errors``), exactly one
    ``error:`` line and no traceback on stderr; returns stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err
    return err


class CountingPrior(Prior):
    """Delegates to a prior and counts ``denoise`` calls; ``poison`` makes every denoised value NaN."""

    def __init__(self, prior: Prior, poison: bool = False) -> None:
        self.prior, self.calls, self.poison = prior, 0, poison

    def denoise(self, x, sigma, *, generator=None, network_sigma=None):
        self.calls += 1
        extra = {} if network_sigma is None else {"network_sigma": network_sigma}
        out = self.prior.denoise(x, sigma, generator=generator, **extra)
        return out * float("nan") if self.poison else out

    def check_data_shape(self, data_shape):
        self.prior.check_data_shape(data_shape)
