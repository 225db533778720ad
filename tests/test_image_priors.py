"""StationaryGaussianPrior (exact FFT denoiser of a periodic stationary Gaussian image prior) and the offline
scikit-image sample dataset of the tiny image experiments."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose
from diffinv_pl.data.sample_images import SAMPLE_IMAGES, SampleImageDataset
from diffinv_pl.errors import UserError
from diffinv_pl.priors import StationaryGaussianPrior


def _dense_covariance(channels: int, size: int, std: float, alpha: float, f0: float, rho: float) -> torch.Tensor:
    """Sigma = std^2 C_rho (x) K assembled entry by entry from the model (no FFT): K[p, q] is the periodic
    autocovariance c(p - q) = (1/N) sum_f s(f) cos(2 pi f . (p - q)), s = S / mean S, S = (1 + |f|^2/f0^2)^-alpha."""
    f = torch.tensor([k / size if k < (size + 1) // 2 else k / size - 1 for k in range(size)], dtype=torch.float64)
    S = (1 + (f[:, None] ** 2 + f[None, :] ** 2) / f0**2) ** (-alpha)
    s = S / S.mean()
    pos = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).reshape(-1, 2)
    d = (pos[:, None, :] - pos[None, :, :]).to(torch.float64)  # (N, N, 2) pixel offsets
    phase = 2 * math.pi * (d[..., 0, None, None] * f[:, None] + d[..., 1, None, None] * f[None, :])
    K = (s * torch.cos(phase)).mean((-1, -2))
    C = (1 - rho) * torch.eye(channels, dtype=torch.float64) + rho
    return std**2 * torch.kron(C, K)


def test_fft_denoiser_equals_the_dense_gaussian_posterior_mean():
    kw = dict(std=0.7, alpha=1.5, f0=0.2, channel_correlation=0.6)
    prior = StationaryGaussianPrior(mean=[0.1, -0.2], channels=2, **kw)
    Sigma = _dense_covariance(2, 6, kw["std"], kw["alpha"], kw["f0"], kw["channel_correlation"])
    assert torch.allclose(torch.diagonal(Sigma), torch.full((72,), 0.49, dtype=torch.float64), atol=1e-12)
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.7, 5.0], dtype=torch.float64)
    D = prior.denoise(x, sigma)
    mu = torch.tensor([0.1, -0.2], dtype=torch.float64).repeat_interleave(36)
    eye = torch.eye(72, dtype=torch.float64)
    for b in range(3):
        expected = mu + Sigma @ torch.linalg.solve(Sigma + sigma[b] ** 2 * eye, x[b].reshape(-1) - mu)
        assert (D[b].reshape(-1) - expected).abs().max() < 1e-10
    # a scalar sigma acts on every sample; the prior's own dense covariance is this Sigma
    assert torch.allclose(prior.denoise(x, 0.7)[1], D[1], atol=1e-12)
    assert torch.allclose(prior.covariance(6, 6), Sigma, atol=1e-12)


def test_samples_have_the_stated_std_mean_and_channel_correlation():
    prior = StationaryGaussianPrior(mean=[0.3, -0.1, 0.0], std=0.5, alpha=2.0, f0=0.1, channel_correlation=0.8)
    x = prior.sample(2000, torch.Generator().manual_seed(1), image_size=8)
    assert x.shape == (2000, 3, 8, 8)
    # 2000 samples: standard errors ~0.01 for std and correlation (pixels of one image are correlated)
    assert abs(float(x.std(0).mean()) - 0.5) < 0.02
    assert torch.allclose(x.mean((0, 2, 3)), torch.tensor([0.3, -0.1, 0.0], dtype=torch.float64), atol=0.03)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        corr = torch.corrcoef(torch.stack([x[:, a].reshape(-1), x[:, b].reshape(-1)]))[0, 1]
        assert abs(float(corr) - 0.8) < 0.02
    # spatial smoothness: neighbours correlate as the autocovariance says (c(1, 0) / c(0, 0))
    lag1 = torch.corrcoef(torch.stack([x[:, 0, :, :-1].reshape(-1), x[:, 0, :, 1:].reshape(-1)]))[0, 1]
    K = _dense_covariance(1, 8, 1.0, 2.0, 0.1, 0.0)
    assert abs(float(lag1) - float(K[0, 1])) < 0.02


def test_prior_interface():
    prior = StationaryGaussianPrior(channels=3, image_size=4, data_range=(0.0, 1.0))
    assert prior.data_range == (0.0, 1.0) and prior.sigma_range == (0.0, math.inf)
    assert prior.state_shape((3, 4, 4)) == (3, 4, 4)
    x = torch.randn(2, 3, 4, 4)
    assert prior.encode(x) is x and prior.decode(x) is x
    assert prior.denoise(x, torch.tensor([0.1, 0.2]), generator=torch.Generator()).dtype == torch.float32
    z = prior.initial_state((2,), (3, 4, 4), 10.0, torch.Generator().manual_seed(0))
    assert z.shape == (2, 3, 4, 4) and 5 < float(z.std()) < 15
    # a huge sigma returns the mean, a tiny one the input
    assert torch.allclose(prior.denoise(x, 1e6), torch.zeros_like(x), atol=1e-6)
    assert torch.allclose(prior.denoise(x, 1e-6), x, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [
        ({"std": 0.0}, "prior.std > 0"),
        ({"std": -1.0}, "prior.std > 0"),
        ({"f0": 0.0}, "prior.f0 > 0"),
        ({"alpha": float("nan")}, "prior.alpha > 0"),
        ({"channel_correlation": -0.5}, "(-0.5, 1)"),
        ({"channel_correlation": 1.0}, "(-0.5, 1)"),
        ({"mean": [0.0, 1.0]}, "one per channel"),
        ({"data_range": (1.0, 0.0)}, "lo < hi"),
    ],
)
def test_bad_parameters_name_the_fix(kwargs, fix):
    with pytest.raises(UserError) as err:
        StationaryGaussianPrior(**kwargs)
    assert fix in str(err.value)


def test_wrong_image_shape_is_refused():
    prior = StationaryGaussianPrior(channels=3, image_size=8)
    for shape in ((1, 8, 8), (3, 4, 4), (3, 64)):
        with pytest.raises(UserError, match="set prior.channels / prior.image_size"):
            prior.check_data_shape(shape)
    with pytest.raises(UserError, match="prior.channels"):
        prior.denoise(torch.zeros(2, 1, 8, 8), 1.0)
    with pytest.raises(UserError, match="image_size="):
        StationaryGaussianPrior().sample(2)


def test_config_builds_the_prior_on_the_operator_range():
    from hydra.utils import instantiate

    cfg = compose("evaluate", ["task=reconstruction", "prior=stationary_gaussian", "operator=identity",
                               "paths.output_dir=/unused"])
    prior = instantiate(cfg.prior)
    op = instantiate(cfg.operator)
    assert isinstance(prior, StationaryGaussianPrior)
    assert prior.data_range == tuple(op.input_range) == (-1.0, 1.0) and prior.channels == 3


# ------------------------------------------------------------------------------------------- sample images
def test_sample_images_dataset():
    ds = SampleImageDataset(num_images=3, image_size=16)
    assert len(ds) == 3 and ds.keys == list(SAMPLE_IMAGES[:3])
    item = ds[1]
    assert item["key"] == "coffee" and item["path"] == "skimage.data.coffee"
    img = item["image"]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.std()) > 0.05
    assert torch.equal(ds[1]["image"], img)  # deterministic
    gray = SampleImageDataset(names=["rocket", "astronaut"], image_size=12, mode="L")
    assert gray.keys == ["rocket", "astronaut"] and gray[0]["image"].shape == (1, 12, 12)
    # keys do not depend on the selection: the same image in another subset is the same sample
    assert torch.equal(SampleImageDataset(names=["coffee"], image_size=16)[0]["image"], img)


def test_sample_images_refuse_bad_requests():
    with pytest.raises(UserError, match="only 7 sample image"):
        SampleImageDataset(num_images=8)
    with pytest.raises(UserError) as err:
        SampleImageDataset(names=["astronaut", "lena"])
    assert "lena" in str(err.value) and "chelsea" in str(err.value)
    with pytest.raises(UserError, match="data.mode"):
        SampleImageDataset(mode="RGBA")
    with pytest.raises(IndexError):
        SampleImageDataset(num_images=1)[1]


def test_sample_images_config_follows_the_operator_size():
    from hydra.utils import instantiate

    cfg = compose("evaluate", ["task=reconstruction", "data=sample_images", "operator=identity",
                               "operator.image_size=24", "paths.output_dir=/unused"])
    ds = instantiate(cfg.data)
    assert len(ds) == 2 and ds[0]["image"].shape == (3, 24, 24)
