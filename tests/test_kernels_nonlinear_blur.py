"""Blur-kernel generators (Gaussian vs scipy, uniform, random-trajectory motion) and the nonlinear-blur operator."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndimage
import torch
import torch.nn.functional as F

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
# nonlinear blur (bkse KernelWizard)

# The state dict of bkse's KernelWizard with the options of GOPRO_wVAE.pth (bkse options/generate_blur/default.yml:
# input_nc 3, nf 64, front_RBs 10, back_RBs 20, kernel_dim 512, use_vae, KernelExtractor n_blocks 4, norm none), as
# read from bkse's models/kernel_encoding/kernel_wizard.py, backbones/resnet.py, backbones/unet_parts.py (ConvTranspose2d
# variant) and arch_util.py (norm "none" -> no bias in the extractor and U-Net convs). Written out by hand, not generated
# from our module. Residual blocks ("x + conv2(relu(conv1(x)))") are listed by index range below.
GOLDEN_SINGLE = {
    "feature_extractor.0.weight": (64, 3, 3, 3),
    "feature_extractor.0.bias": (64,),
    "feature_extractor.2.weight": (64, 64, 3, 3),
    "feature_extractor.2.bias": (64,),
    "feature_extractor.4.weight": (64, 64, 3, 3),
    "feature_extractor.4.bias": (64,),
    "kernel_extractor.model.1.weight": (64, 128, 7, 7),
    "kernel_extractor.model.4.weight": (128, 64, 3, 3),
    "kernel_extractor.model.7.weight": (256, 128, 3, 3),
    "kernel_extractor.model.10.weight": (512, 256, 3, 3),
    "kernel_extractor.model.13.weight": (1024, 512, 3, 3),
    "kernel_extractor.model.16.weight": (1024, 1024, 3, 3),
    **{f"kernel_extractor.model.{i}.conv_block.{j}.weight": (1024, 1024, 3, 3) for i in range(19, 23) for j in (1, 5)},
    "adapter.model.down.0.weight": (64, 64, 4, 4),
    "adapter.model.up.1.weight": (128, 64, 4, 4),
    "adapter.model.up.1.bias": (64,),
    "adapter.model.submodule.down.1.weight": (128, 64, 4, 4),
    "adapter.model.submodule.up.1.weight": (256, 64, 4, 4),
    "adapter.model.submodule.submodule.down.1.weight": (256, 128, 4, 4),
    "adapter.model.submodule.submodule.up.1.weight": (512, 128, 4, 4),
    "adapter.model.submodule.submodule.submodule.down.1.weight": (512, 256, 4, 4),
    "adapter.model.submodule.submodule.submodule.up.1.weight": (1024, 256, 4, 4),
    "adapter.model.submodule.submodule.submodule.submodule.down.1.weight": (512, 512, 4, 4),
    "adapter.model.submodule.submodule.submodule.submodule.up.1.weight": (1024, 512, 4, 4),
    "recon_trunk.20.weight": (256, 64, 3, 3),
    "recon_trunk.20.bias": (256,),
    "recon_trunk.23.weight": (256, 64, 3, 3),
    "recon_trunk.23.bias": (256,),
    "recon_trunk.26.weight": (64, 64, 3, 3),
    "recon_trunk.26.bias": (64,),
    "recon_trunk.28.weight": (3, 64, 3, 3),
    "recon_trunk.28.bias": (3,),
}
GOLDEN_RES_BLOCKS = {"feature_extractor": range(6, 16), "recon_trunk": range(0, 20)}  # 64 channels each
GOLDEN_NUM_TENSORS = 159  # 46 feature_extractor + 14 kernel_extractor + 11 adapter + 88 recon_trunk
GOLDEN_NUM_PARAMS = 115_265_475


def _golden() -> dict[str, tuple[int, ...]]:
    out = dict(GOLDEN_SINGLE)
    for prefix, indices in GOLDEN_RES_BLOCKS.items():
        for i in indices:
            for conv in ("conv1", "conv2"):
                out[f"{prefix}.{i}.{conv}.weight"] = (64, 64, 3, 3)
                out[f"{prefix}.{i}.{conv}.bias"] = (64,)
    return out


def test_default_kernel_wizard_matches_the_official_state_dict_layout():
    golden = _golden()
    assert len(golden) == GOLDEN_NUM_TENSORS
    assert sum(int(np.prod(s)) for s in golden.values()) == GOLDEN_NUM_PARAMS
    with torch.device("meta"):
        net = KernelWizard()
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert sorted(set(golden) - set(ours)) == [] and sorted(set(ours) - set(golden)) == []
    assert {k: s for k, s in ours.items() if golden[k] != s} == {}
    assert {k.split(".")[0] for k in ours} == {"feature_extractor", "kernel_extractor", "adapter", "recon_trunk"}
    assert net.code_channels == 512
    # the network strictly accepts a state dict with exactly these names and shapes
    net.load_state_dict({k: torch.zeros(s, device="meta") for k, s in golden.items()}, strict=True, assign=True)


BKSE_DEFAULT_YML = {  # bkse options/generate_blur/default.yml, section KernelWizard
    "pretrained": "experiments/pretrained/GOPRO_wVAE.pth", "input_nc": 3, "nf": 64, "front_RBs": 10, "back_RBs": 20,
    "N_frames": 1, "kernel_dim": 512, "use_vae": True,
    "KernelExtractor": {"norm": "none", "use_sharp": True, "n_blocks": 4, "padding_type": "reflect",
                        "use_dropout": False},
    "Adapter": {"norm": "none", "use_dropout": False},
}


def test_kernel_wizard_from_bkse_options():
    with torch.device("meta"):
        a, b = KernelWizard.from_bkse_options(BKSE_DEFAULT_YML), KernelWizard()
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    bad = {**BKSE_DEFAULT_YML, "KernelExtractor": {**BKSE_DEFAULT_YML["KernelExtractor"], "norm": "batch"}}
    with pytest.raises(ValueError, match="KernelExtractor.norm"):
        KernelWizard.from_bkse_options(bad)


# tiny widths for fast tests (the defaults are the official ones); the kernel code then has 8 * nf = 32 channels
TINY = dict(nf=4, front_blocks=1, back_blocks=2, kernel_dim=32, extractor_blocks=1, tail_nf=8)
SIZE = 256  # the DPS image size: a 2x2 kernel code, as the official 1x512x2x2


def _tiny_weights(tmp_path, wrap=None, prefix=""):
    torch.manual_seed(0)
    net = KernelWizard(**TINY)
    with torch.no_grad():  # make the code matter more than under the default (small) initialisation
        for p in net.parameters():
            p.mul_(1.5)
    state = {prefix + k: v for k, v in net.state_dict().items()}
    path = tmp_path / "GOPRO_wVAE.pth"
    torch.save({wrap: state} if wrap else state, path)
    return path, net


def _x(seed, batch=2):
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_missing_weights_file_message(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        NonlinearBlur(weights_path=tmp_path / "nowhere" / "GOPRO_wVAE.pth")
    msg = str(err.value)
    assert "GOPRO_wVAE.pth" in msg and "cannot be downloaded" in msg and "operator.weights_path=" in msg
    assert "blur-kernel-space-exploring" in msg


def test_default_kernel_code_is_numpy_seed0():
    code = kernel_code()
    np.random.seed(0)  # DAPS' spelling of the same draw
    expected = np.random.randn(1, 512, 2, 2) * 1.2
    assert code.shape == (1, 512, 2, 2) and code.dtype == torch.float32
    assert np.allclose(code.numpy(), expected, atol=1e-6)
    assert np.allclose(code.numpy(), np.random.RandomState(0).randn(1, 512, 2, 2) * 1.2, atol=1e-6)


def _reference_adapt_kernel(sd, x, code, front, back):
    """adaptKernel written with functional ops straight from the bkse key names (an independent wiring check).

    bkse's inner U-Net levels apply LeakyReLU(0.2) *in place* to their input, so the skip concatenation sees the
    activated input."""
    def conv(t, name, stride=1):
        return F.conv2d(t, sd[name + ".weight"], sd.get(name + ".bias"), stride=stride, padding=1)

    def res(t, name):
        return t + conv(F.relu(conv(t, name + ".conv1")), name + ".conv2")

    def lrelu(t):
        return F.leaky_relu(t, 0.1)

    h = lrelu(conv(x, "feature_extractor.0"))
    h = lrelu(conv(h, "feature_extractor.2", 2))
    h = lrelu(conv(h, "feature_extractor.4", 2))
    for i in range(front):
        h = res(h, f"feature_extractor.{6 + i}")

    def level(t, name, depth):  # depth 0: outermost, 4: innermost
        up_w = sd[name + ".up.1.weight"]
        if depth == 0:
            d = F.conv2d(t, sd[name + ".down.0.weight"], stride=2, padding=1)
            u = level(d, name + ".submodule", 1)
            return torch.tanh(F.conv_transpose2d(F.relu(u), up_w, sd[name + ".up.1.bias"], stride=2, padding=1))
        a = F.leaky_relu(t, 0.2)
        d = F.conv2d(a, sd[name + ".down.1.weight"], stride=2, padding=1)
        inner = torch.cat([d, code], 1) if depth == 4 else level(d, name + ".submodule", depth + 1)
        return torch.cat([F.conv_transpose2d(F.relu(inner), up_w, stride=2, padding=1), a], 1)

    h = level(h, "adapter.model", 0)
    for i in range(back):
        h = res(h, f"recon_trunk.{i}")
    h = lrelu(F.pixel_shuffle(conv(h, f"recon_trunk.{back}"), 2))
    h = lrelu(F.pixel_shuffle(conv(h, f"recon_trunk.{back + 3}"), 2))
    h = lrelu(conv(h, f"recon_trunk.{back + 6}"))
    return x + conv(h, f"recon_trunk.{back + 8}")


def test_adapt_kernel_matches_functional_reference(tmp_path):
    _, net = _tiny_weights(tmp_path)
    x = (_x(5) + 1) / 2
    code = torch.randn(2, 32, 2, 2, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = net.adapt_kernel(x, code)
        ref = _reference_adapt_kernel(net.state_dict(), x, code, TINY["front_blocks"], TINY["back_blocks"])
    assert ours.shape == x.shape
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(net.adaptKernel(x, code), ours)  # bkse's spelling, as called by DPS / DAPS


@pytest.mark.parametrize("wrap,prefix", [(None, ""), ("state_dict", "module."), ("params", "")])
def test_tiny_nonlinear_blur_loads_and_is_deterministic(tmp_path, wrap, prefix):
    path, net = _tiny_weights(tmp_path, wrap, prefix)
    op = NonlinearBlur(weights_path=path, image_size=SIZE, network=TINY)
    assert op.in_shape == op.out_shape == (3, SIZE, SIZE) and op.input_range == (-1.0, 1.0)
    assert not hasattr(op, "adjoint")
    assert torch.equal(op.kernel_code, kernel_code(32, 2, 0, 1.2))
    loaded = op.net.state_dict()
    assert set(loaded) == set(net.state_dict())
    for k, v in net.state_dict().items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == torch.float32 and not loaded[k].is_meta
    x = _x(1)
    y1, y2 = op(x), op(x)
    assert y1.shape == x.shape and torch.equal(y1, y2)
    assert float(y1.min()) >= -1 and float(y1.max()) <= 1
    # leading batch dimensions pass through; samples are processed independently
    y3 = op(x[:, None])
    assert y3.shape == (2, 1, 3, SIZE, SIZE) and torch.allclose(y3[:, 0], y1, atol=1e-6)
    assert torch.allclose(op(x[1:]), y1[1:], atol=1e-5)
    # the forward is G((x+1)/2, code) mapped back to [-1, 1] and clamped
    with torch.no_grad():
        raw = 2 * net.adapt_kernel((x + 1) / 2, op.kernel_code) - 1
    assert torch.allclose(y1, raw.clamp(-1, 1), atol=1e-5)
    assert float(raw.abs().max()) > 1  # the clamp is exercised


def test_nonlinear_blur_output_depends_on_kernel_code(tmp_path):
    path, _ = _tiny_weights(tmp_path)
    op = NonlinearBlur(weights_path=path, image_size=SIZE, network=TINY)
    other = NonlinearBlur(weights_path=path, image_size=SIZE, network=TINY, kernel_seed=1)
    x = _x(2, batch=1)
    y = op(x)
    assert (y - other(x)).abs().max() > 1e-3
    op.set_kernel_code(torch.zeros(1, 32, 2, 2))
    assert (y - op(x)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="kernel code must be"):
        op.set_kernel_code(torch.zeros(1, 32, 4, 4))


def test_nonlinear_blur_gradient_flows(tmp_path):
    path, _ = _tiny_weights(tmp_path)
    op = NonlinearBlur(weights_path=path, image_size=SIZE, network=TINY)
    x = (_x(3, batch=1) * 0.1).requires_grad_(True)
    op(x).square().sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in op.net.parameters())


def test_checkpoint_with_missing_key_raises_clear_error(tmp_path):
    state = KernelWizard(**TINY).state_dict()
    dropped = "adapter.model.up.1.bias"
    del state[dropped]
    state["extra.layer"] = torch.zeros(1)
    path = tmp_path / "GOPRO_wVAE.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as err:
        NonlinearBlur(weights_path=path, image_size=SIZE, network=TINY)
    msg = str(err.value)
    assert "missing keys" in msg and dropped in msg and "unexpected keys" in msg and "extra.layer" in msg
    # mismatched widths: shape mismatches are listed by key
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches .*feature_extractor\.0\.weight"):
        load_kernel_wizard_checkpoint(KernelWizard(**{**TINY, "nf": 8}), KernelWizard(**TINY).state_dict())
    # a checkpoint of another architecture (e.g. the old layout) is rejected by the default network, on meta
    with torch.device("meta"):
        full = KernelWizard()
    with pytest.raises(CheckpointMismatchError, match="missing keys 15[0-9]"):
        load_kernel_wizard_checkpoint(full, {"head.weight": torch.zeros(1)})


def test_rename_map_applies_to_key_prefixes(tmp_path):
    path, net = _tiny_weights(tmp_path, prefix="")
    state = {("blur_model." + k): v for k, v in torch.load(path, weights_only=True).items()}
    target = KernelWizard(**TINY)
    load_kernel_wizard_checkpoint(target, state, rename={"blur_model.": ""})
    assert all(torch.equal(target.state_dict()[k], v) for k, v in net.state_dict().items())


def test_corrupt_checkpoint_and_bad_sizes_raise(tmp_path):
    path = tmp_path / "GOPRO_wVAE.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not read the checkpoint"):
        NonlinearBlur(weights_path=path, image_size=SIZE, network=TINY)
    with pytest.raises(ValueError, match="multiple of 128"):
        NonlinearBlur(weights_path=path, image_size=200, network=TINY)
    net = KernelWizard(**TINY)
    with pytest.raises(ValueError, match="multiples of 128"):
        net.adapt_kernel(torch.rand(1, 3, 192, 192), torch.zeros(1, 32, 2, 2))
    with pytest.raises(ValueError, match="innermost"):
        net.adapt_kernel(torch.rand(1, 3, 256, 256), torch.zeros(1, 32, 1, 1))


def test_kernel_wizard_encoder_code_shape():
    net = KernelWizard(**TINY)
    sharp, blurred = torch.rand(2, 3, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE)
    mean, logvar = net(sharp, blurred)
    assert mean.shape == logvar.shape == (2, 32, 2, 2)
    assert torch.equal(net.encode(sharp, blurred), mean)
    assert net.adapt_kernel(sharp, net.encode(sharp, blurred)).shape == (2, 3, SIZE, SIZE)
