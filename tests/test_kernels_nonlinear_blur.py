"""Blur-kernel generators (Gaussian vs scipy, uniform, random-trajectory motion) and the nonlinear-blur operator."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndimage
import torch

from diffinv_pl.operators.kernels import gaussian_kernel, motion_kernel, uniform_kernel
from diffinv_pl.operators.nonlinear_blur import (
    CheckpointMismatchError,
    KernelWizard,
    NonlinearBlur,
    kernel_code,
    load_kernel_wizard_checkpoint,
)

# ---------------------------------------------------------------------------------------------------------------------
# kernels


@pytest.mark.parametrize("size,std", [(61, 3.0), (9, 3.0), (5, 2.0), (7, 10.0), (61, 20.0), (4, 1.0), (1, 1.0)])
def test_gaussian_kernel_matches_scipy(size, std):
    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1.0
    ref = ndimage.gaussian_filter(delta, std)  # mode 'reflect', truncate 4
    ref = ref / ref.sum()
    k = gaussian_kernel(size, std)
    assert k.dtype == torch.float64 and k.shape == (size, size)
    assert np.abs(k.numpy() - ref).max() <= 1e-12
    assert abs(float(k.sum()) - 1.0) <= 1e-12
    if size % 2:
        assert torch.allclose(k, k.flip(0), atol=1e-15) and torch.allclose(k, k.T, atol=1e-15)


def test_gaussian_kernel_default_is_unnormalised_scipy():
    """For 61x61, std 3 the tails fit inside the grid: scipy's own result already sums to 1."""
    delta = np.zeros((61, 61))
    delta[30, 30] = 1.0
    assert np.abs(gaussian_kernel().numpy() - ndimage.gaussian_filter(delta, 3.0)).max() <= 1e-12


def test_uniform_kernel():
    k = uniform_kernel()
    assert k.shape == (17, 17) and k.dtype == torch.float64
    assert torch.all(k == 1.0 / 289) and abs(float(k.sum()) - 1) <= 1e-12


def _moments(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of mass (row, col) and the eigenvalues (ascending) of the second-moment (covariance) matrix."""
    idx = torch.arange(k.shape[0], dtype=torch.float64)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")
    mr, mc = (k * rows).sum(), (k * cols).sum()
    dr, dc = rows - mr, cols - mc
    cov = torch.stack([torch.stack([(k * dr * dr).sum(), (k * dr * dc).sum()]),
                       torch.stack([(k * dr * dc).sum(), (k * dc * dc).sum()])])
    return torch.stack([mr, mc]), torch.linalg.eigvalsh(cov)


def test_motion_kernel_reproducible_and_seed_dependent():
    a = motion_kernel(61, 0.5, torch.Generator().manual_seed(3))
    b = motion_kernel(61, 0.5, torch.Generator().manual_seed(3))
    c = motion_kernel(61, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    gen = torch.Generator().manual_seed(3)
    first, second = motion_kernel(61, 0.5, gen), motion_kernel(61, 0.5, gen)
    assert torch.equal(first, a) and not torch.equal(first, second)


@pytest.mark.parametrize("intensity", [0.0, 0.5, 1.0])
def test_motion_kernel_properties(intensity):
    for seed in range(5):
        k = motion_kernel(61, intensity, torch.Generator().manual_seed(seed))
        assert k.shape == (61, 61) and k.dtype == torch.float64
        assert float(k.min()) >= 0 and abs(float(k.sum()) - 1) <= 1e-12
        com, _ = _moments(k)
        assert float((com - 30).abs().max()) <= 1.0
        assert int((k > 0).sum()) > 20  # a trajectory, not a dot


def test_motion_kernel_intensity_controls_straightness():
    """Minor-axis second moment (px^2): a straight line has ~ the bilinear-splat width only (measured max 0.18 over
    20 seeds at intensity 0), intensity 1 winds (measured median 17, min 4.9)."""
    minor = {a: [float(_moments(motion_kernel(61, a, torch.Generator().manual_seed(s)))[1][0]) for s in range(10)]
             for a in (0.0, 1.0)}
    assert max(minor[0.0]) < 0.3
    assert np.median(minor[1.0]) > 5.0 and min(minor[1.0]) > 1.0


def test_motion_kernel_rejects_bad_intensity():
    with pytest.raises(ValueError, match="intensity"):
        motion_kernel(61, 1.5, torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------------------------
# nonlinear blur

TINY = dict(nf=4, kernel_dim=8, extractor_down=2, extractor_blocks=1, adapter_down=1, front_blocks=1, back_blocks=1)


def _tiny_weights(tmp_path, wrap=None, prefix=""):
    torch.manual_seed(0)
    net = KernelWizard(**TINY)
    with torch.no_grad():  # make the code modulation matter (default init is small)
        for p in net.parameters():
            p.mul_(3.0)
    state = {prefix + k: v for k, v in net.state_dict().items()}
    path = tmp_path / "GOPRO_wVAE.pth"
    torch.save({wrap: state} if wrap else state, path)
    return path, net


def test_missing_weights_file_message(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        NonlinearBlur(weights_path=tmp_path / "nowhere" / "GOPRO_wVAE.pth")
    msg = str(err.value)
    assert "GOPRO_wVAE.pth" in msg and "cannot be downloaded" in msg and "operator.weights_path=" in msg


def test_default_kernel_code_is_numpy_seed0():
    code = kernel_code()
    expected = np.random.RandomState(0).randn(1, 512, 2, 2) * 1.2
    assert code.shape == (1, 512, 2, 2)
    assert np.allclose(code.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("wrap,prefix", [(None, ""), ("state_dict", "module."), ("params", "")])
def test_tiny_nonlinear_blur_loads_and_is_deterministic(tmp_path, wrap, prefix):
    path, net = _tiny_weights(tmp_path, wrap, prefix)
    op = NonlinearBlur(weights_path=path, image_size=16, network=TINY)
    assert op.in_shape == op.out_shape == (3, 16, 16) and op.input_range == (-1.0, 1.0)
    assert not hasattr(op, "adjoint")
    assert torch.equal(op.kernel_code, kernel_code(8, 2, 0, 1.2))
    for k, v in net.state_dict().items():
        assert torch.equal(op.net.state_dict()[k], v)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y1, y2 = op(x), op(x)
    assert y1.shape == x.shape and torch.equal(y1, y2)
    assert float(y1.min()) >= -1 and float(y1.max()) <= 1
    # leading batch dimensions pass through; samples are processed independently
    y3 = op(x[:, None])
    assert y3.shape == (2, 1, 3, 16, 16) and torch.allclose(y3[:, 0], y1, atol=1e-6)
    # the forward is F((x+1)/2, code) mapped back to [-1, 1] and clamped
    with torch.no_grad():
        ref = (2 * net.adapt_kernel((x + 1) / 2, op.kernel_code) - 1).clamp(-1, 1)
    assert torch.allclose(y1, ref, atol=1e-6)


def test_nonlinear_blur_output_depends_on_kernel_code(tmp_path):
    path, _ = _tiny_weights(tmp_path)
    op = NonlinearBlur(weights_path=path, image_size=16, network=TINY)
    other = NonlinearBlur(weights_path=path, image_size=16, network=TINY, kernel_seed=1)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    y = op(x)
    assert (y - other(x)).abs().max() > 1e-3
    op.set_kernel_code(torch.zeros(1, 8, 2, 2))
    assert (y - op(x)).abs().max() > 1e-3


def test_nonlinear_blur_gradient_flows(tmp_path):
    path, _ = _tiny_weights(tmp_path)
    op = NonlinearBlur(weights_path=path, image_size=16, network=TINY)
    x = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 0.2 - 0.1).requires_grad_(True)
    op(x).square().sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None for p in op.net.parameters())


def test_checkpoint_with_missing_key_raises_clear_error(tmp_path):
    net = KernelWizard(**TINY)
    state = net.state_dict()
    dropped = "adapter.tail.weight"
    del state[dropped]
    state["extra.layer"] = torch.zeros(1)
    path = tmp_path / "GOPRO_wVAE.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as err:
        NonlinearBlur(weights_path=path, image_size=16, network=TINY)
    msg = str(err.value)
    assert "missing keys" in msg and dropped in msg and "unexpected keys" in msg and "extra.layer" in msg
    # mismatched widths: shape mismatches are listed
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_kernel_wizard_checkpoint(KernelWizard(**{**TINY, "nf": 6}), KernelWizard(**TINY).state_dict())


def test_corrupt_checkpoint_raises(tmp_path):
    path = tmp_path / "GOPRO_wVAE.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not read the checkpoint"):
        NonlinearBlur(weights_path=path, image_size=16, network=TINY)


def test_kernel_wizard_encoder_code_shape():
    net = KernelWizard(**TINY)
    sharp, blurred = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    assert net.encode(sharp, blurred).shape == (2, 8, 2, 2)
    assert net(sharp, blurred).shape == (2, 3, 16, 16)
