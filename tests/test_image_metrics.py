"""Image metric protocol: PSNR/SSIM against scikit-image, LPIPS with the shipped heads and a random backbone, FID with a
small custom extractor against the closed-form Frechet distance, the offline weights manifest, switches and errors.

No test downloads anything: the real pretrained files are only used by the `slow` test, when they are present.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim
from torch import nn

from diffinv_pl.metrics import fid_stats, weights
from diffinv_pl.metrics.fid_stats import FIDStats, build_fid, compute_reference_stats, frechet_distance
from diffinv_pl.metrics.image import ImageMetrics, build_lpips, load_lpips_backbone
from diffinv_pl.metrics.weights import MANIFEST, WeightFile, WeightsHashError, resolve_weights


@pytest.fixture
def no_weights(tmp_path, monkeypatch) -> Path:
    """An environment where no weight file can be found: empty hub cache, no env var."""
    monkeypatch.delenv(weights.ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path


def _pair(shape, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g)
    y = (x + noise * torch.randn(*shape, generator=g)).clamp(0, 1)
    return y, x


# ---------------------------------------------------------------------------------------------------- PSNR / SSIM


@pytest.mark.parametrize("channels", [3, 1])
def test_psnr_ssim_match_skimage(channels):
    pred, target = _pair((3, channels, 32, 40))
    gauss = ImageMetrics(ssim_variant="gaussian").per_image(pred, target)
    skim = ImageMetrics(psnr=False, ssim_variant="skimage").per_image(pred, target)
    for i in range(pred.shape[0]):
        p, t = pred[i].double().numpy(), target[i].double().numpy()
        assert gauss["psnr"][i].item() == pytest.approx(sk_psnr(t, p, data_range=1), abs=1e-4)
        ref_gauss = sk_ssim(t, p, data_range=1, channel_axis=0, gaussian_weights=True, sigma=1.5,
                            use_sample_covariance=False)
        assert gauss["ssim"][i].item() == pytest.approx(ref_gauss, abs=1e-4)
        assert skim["ssim"][i].item() == pytest.approx(sk_ssim(t, p, data_range=1, channel_axis=0), abs=1e-4)
    assert "psnr" not in skim


def test_running_means_are_per_image_averages():
    m = ImageMetrics()
    batches = [_pair((2, 3, 16, 16), noise=s, seed=k) for k, s in enumerate((0.05, 0.2))]
    vals = [m.update(p, t) for p, t in batches]
    out = m.compute()
    psnr = torch.cat([v["psnr"] for v in vals])
    assert out["psnr"] == pytest.approx(psnr.mean().item(), abs=1e-4)
    # per-image mean, not the PSNR of the pooled MSE
    pooled = 10 * torch.log10(1 / torch.cat([((p - t) ** 2).flatten(1) for p, t in batches]).mean())
    assert abs(out["psnr"] - pooled.item()) > 0.1
    assert out["ssim"] == pytest.approx(torch.cat([v["ssim"] for v in vals]).mean().item(), abs=1e-6)
    assert out["num_images"] == 4
    m.reset()
    with pytest.raises(ValueError, match="update"):
        m.compute()


# ------------------------------------------------------------------------------------------------------------ LPIPS


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_random_backbone_zero_and_ranks_noise(net):
    torch.manual_seed(0)
    m = ImageMetrics(psnr=False, ssim=False, lpips=net, lpips_backbone_weights="random")
    assert "RANDOM" in m.protocol()["lpips"]
    target = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(m.per_image(target, target)["lpips"], torch.zeros(2), atol=1e-7)
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    scores = [m.per_image((target + s * noise).clamp(0, 1), target)["lpips"] for s in (0.03, 0.1, 0.3)]
    assert bool((scores[0] > 0).all())
    assert bool((scores[0] < scores[1]).all()) and bool((scores[1] < scores[2]).all())
    grey = target[:, :1]
    assert m.per_image(grey, grey)["lpips"].shape == (2,)


def test_lpips_heads_shipped_and_backbone_loaded_from_local_file(tmp_path):
    import lpips as lpips_pkg
    import torchvision

    heads = Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / "alex.pth"
    assert heads.is_file()
    model = build_lpips("alex", None)
    shipped = torch.load(heads, map_location="cpu", weights_only=True)
    assert torch.equal(model.state_dict()["lin0.model.1.weight"], shipped["lin0.model.1.weight"])

    # A torchvision-format checkpoint (random here) is mapped key by key onto the LPIPS trunk.
    tv_state = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path / "alexnet.pth"
    torch.save(tv_state, path)
    load_lpips_backbone(model, path)
    assert torch.equal(getattr(model.net.slice1, "0").weight, tv_state["features.0.weight"])
    assert torch.equal(getattr(model.net.slice5, "10").bias, tv_state["features.10.bias"])

    torch.save({"not": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a torchvision"):
        load_lpips_backbone(model, path)


# -------------------------------------------------------------------------------------------------------------- FID


class Affine(nn.Module):
    """Tiny feature extractor: flattened (B, 1, 2, 2) image -> 20 * (x - 0.5), 4-d."""

    num_features = 4

    def forward(self, x):
        return 20.0 * (x.flatten(1) - 0.5)


def _closed_form(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _gaussians(seed=0):
    """Two 4-d Gaussians (feature space), closed-form FID about 0.93."""
    rng = np.random.default_rng(seed)
    d = 4
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T / d + 0.5 * np.eye(d), b @ b.T / d + 0.5 * np.eye(d)
    return np.zeros(d), s1, rng.uniform(-0.5, 0.5, size=d), s2


def _images(mu, s, n, seed, exact_moments=False):
    """Images 0.5 + z / 20 whose Affine features z are n samples of N(mu, s); with exact_moments the samples are
    transformed so that their mean and (N-1)-normalised covariance are exactly mu and s."""
    z = np.random.default_rng(seed).multivariate_normal(mu, s, size=n)
    if exact_moments:
        c = z - z.mean(0)
        z = mu + c @ np.linalg.inv(np.linalg.cholesky(np.cov(c, rowvar=False))).T @ np.linalg.cholesky(s).T
    x = torch.from_numpy(0.5 + z / 20.0).float().reshape(n, 1, 2, 2)
    assert 0 < x.min() and x.max() < 1  # no clamping: the feature distribution is exactly Gaussian
    return x


def test_frechet_distance_closed_form():
    mu1, s1, mu2, s2 = _gaussians()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=1e-8, abs=1e-12)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="same d"):
        frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_fid_custom_extractor_matches_closed_form(tmp_path):
    mu1, s1, mu2, s2 = _gaussians()
    expected = _closed_form(mu1, s1, mu2, s2)
    n = 20000

    # samples whose empirical moments are exactly the Gaussians': the FID pipeline must reproduce the closed form
    m = ImageMetrics(psnr=False, ssim=False, fid=True, fid_feature=Affine())
    fake, real = _images(mu1, s1, n, 1, exact_moments=True), _images(mu2, s2, n, 2, exact_moments=True)
    for k in range(0, n, 5000):
        m.update_fid(fake[k : k + 5000], real[k : k + 5000])
    exact = m.compute()
    assert exact["fid_num_images"] == n and exact["psnr"] == "off"
    assert exact["fid"] == pytest.approx(expected, rel=1e-4)  # float32 images/features

    # plain samples: the estimate is within its sampling error (relative sd about 2% at n = 20000; 5 sd here)
    m.reset()
    fake, real = _images(mu1, s1, n, 3), _images(mu2, s2, n, 4)
    m.update_fid(fake, real)
    paired = m.compute()
    assert paired["fid"] == pytest.approx(expected, rel=0.1)

    # precomputed reference statistics (what the CLI writes) give the same FID
    ref = compute_reference_stats([real[:10000], real[10000:]], build_fid(Affine()))
    assert ref.num_samples == n and ref.feature == "Affine"
    path = ref.save(tmp_path / "ref.npz")
    m_ref = ImageMetrics(psnr=False, ssim=False, fid=True, fid_feature=Affine(), fid_reference=path)
    assert "reference stats" in m_ref.protocol()["fid"]
    m_ref.update_fid(fake)
    assert m_ref.compute()["fid"] == pytest.approx(paired["fid"], rel=1e-5)

    other = FIDStats(ref.mu, ref.sigma, ref.num_samples, feature="SomethingElse")
    with pytest.raises(ValueError, match="same extractor"):
        ImageMetrics(psnr=False, ssim=False, fid=True, fid_feature=Affine(), fid_reference=other)
    with pytest.raises(ValueError, match="needs the real images"):
        m.update_fid(fake[:4])


def test_fid_stats_folder_and_cli(tmp_path, no_weights, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "notes.txt").write_text("ignored")
    assert [p.name for p in fid_stats.list_images(folder)] == [f"{i:02d}.png" for i in range(6)]

    flat = nn.Flatten()
    stats = fid_stats.folder_stats(folder, feature=flat, batch_size=4)
    feats = torch.stack([fid_stats.load_image(p).flatten() for p in fid_stats.list_images(folder)]).double().numpy()
    assert stats.num_samples == 6 and stats.mu.shape == (192,)
    np.testing.assert_allclose(stats.mu, feats.mean(0), atol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), atol=1e-6)

    # the CLI uses the pinned Inception protocol: here it fails cleanly, naming what is missing
    rc = fid_stats.main(["--images", str(folder), "--out", str(tmp_path / "s.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and MANIFEST["inception_fid"].filename in err
    assert not (tmp_path / "s.npz").exists()
    with pytest.raises(FileNotFoundError, match="fid_stats"):
        FIDStats.load(tmp_path / "s.npz")


# ------------------------------------------------------------------------------------------------- weights manifest


def test_manifest_names_match_torchvision():
    import torchvision.models as tvm

    assert MANIFEST["alexnet"].filename == Path(tvm.AlexNet_Weights.IMAGENET1K_V1.url).name
    assert MANIFEST["vgg16"].filename == Path(tvm.VGG16_Weights.IMAGENET1K_V1.url).name
    for entry in MANIFEST.values():  # torch.hub convention: <name>-<sha256 prefix>.<ext>
        assert entry.filename.rsplit(".", 1)[0].endswith("-" + entry.sha256_prefix)
        assert Path(entry.url).name == entry.filename


def test_missing_weights_listed_with_the_three_locations(no_weights):
    cfg = no_weights / "cfg"
    with pytest.raises(FileNotFoundError) as info:
        resolve_weights(["psnr", "lpips_alex", "lpips_vgg", "fid"], weights_dir=cfg)
    msg = str(info.value)
    for entry in MANIFEST.values():
        assert entry.filename in msg
    assert str(cfg) in msg and "$DIFFINV_WEIGHTS_DIR" in msg
    assert str(no_weights / "torch_home" / "hub" / "checkpoints") in msg
    assert resolve_weights(["psnr", "ssim"]) == {}

    # detected when the metrics are built, i.e. before any solving
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        ImageMetrics(lpips="alex", weights_dir=cfg)
    with pytest.raises((FileNotFoundError, ModuleNotFoundError), match="weights-inception-2015-12-05-6726825d.pth"):
        ImageMetrics(fid=True, weights_dir=cfg)
    with pytest.raises(ValueError, match="unknown metric"):
        resolve_weights(["lpips_squeeze"])


def test_resolution_order_and_hash_check(tmp_path, no_weights, monkeypatch):
    blob = b"dummy weights"
    sha = hashlib.sha256(blob).hexdigest()
    manifest = {"dummy": WeightFile("dummy-x.pth", sha[:8], "file://nowhere", "test")}
    cfg, env, hub = tmp_path / "cfg", tmp_path / "env", weights.hub_checkpoints_dir()
    for d in (cfg, env, hub):
        d.mkdir(parents=True)

    (hub / "dummy-x.pth").write_bytes(blob)
    assert resolve_weights(["dummy"], manifest=manifest) == {"dummy": hub / "dummy-x.pth"}
    (env / "dummy-x.pth").write_bytes(blob)
    monkeypatch.setenv(weights.ENV_VAR, str(env))
    assert resolve_weights(["dummy"], manifest=manifest) == {"dummy": env / "dummy-x.pth"}
    (cfg / "dummy-x.pth").write_bytes(blob)
    assert resolve_weights(["dummy"], cfg, manifest=manifest) == {"dummy": cfg / "dummy-x.pth"}

    # full digest also accepted; wrong hash -> clear error; injectable verification
    weights.verify_file(cfg / "dummy-x.pth", sha)
    bad = {"dummy": WeightFile("dummy-x.pth", "0" * 8 if not sha.startswith("0" * 8) else "f" * 8, "u", "test")}
    with pytest.raises(WeightsHashError, match="expected one starting with"):
        resolve_weights(["dummy"], cfg, manifest=bad)
    assert resolve_weights(["dummy"], cfg, manifest=bad, verify=False)["dummy"] == cfg / "dummy-x.pth"
    seen = []
    resolve_weights(["dummy"], cfg, manifest=manifest, verify=lambda p, h: seen.append((p, h)))
    assert seen == [(cfg / "dummy-x.pth", sha[:8])]

    # the real manifest rejects an impostor file under the right name (before any model is built)
    (env / MANIFEST["alexnet"].filename).write_bytes(blob)
    with pytest.raises(WeightsHashError, match=MANIFEST["alexnet"].filename):
        ImageMetrics(lpips="alex")


# ------------------------------------------------------------------------------------------- switches and bad inputs


def test_metrics_switched_off_are_reported_off():
    m = ImageMetrics(psnr=True, ssim=False, lpips=None, fid=False)
    assert m.enabled() == {"psnr": True, "ssim": False, "lpips": False, "fid": False}
    assert m.protocol()["ssim"] == "off" and m.protocol()["lpips"] == "off" and m.protocol()["fid"] == "off"
    pred, target = _pair((2, 3, 8, 8))  # smaller than the SSIM window: fine with SSIM off
    assert set(m.per_image(pred, target)) == {"psnr"}
    m.update(pred, target)
    out = m.compute()
    assert out["ssim"] == "off" and out["lpips"] == "off" and out["fid"] == "off"
    assert isinstance(out["psnr"], float) and out["num_images"] == 2


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (torch.full((1, 3, 16, 16), 1.01), torch.rand(1, 3, 16, 16), r"outside \[0, 1\].*clamp"),
        (torch.full((1, 3, 16, 16), -0.5), torch.rand(1, 3, 16, 16), r"\(x \+ 1\) / 2"),
        (torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 12), "shapes differ"),
        (torch.rand(3, 16, 16), torch.rand(3, 16, 16), r"\(B, C, H, W\)"),
        (torch.randint(0, 255, (1, 3, 16, 16)), torch.rand(1, 3, 16, 16), "float"),
        (torch.full((1, 3, 16, 16), float("nan")), torch.rand(1, 3, 16, 16), "NaN"),
        (torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), "SSIM window"),
    ],
)
def test_bad_inputs_raise_clear_errors(pred, target, match):
    with pytest.raises(ValueError, match=match):
        ImageMetrics().per_image(pred, target)


def test_tolerance_and_options():
    m = ImageMetrics()
    pred = torch.full((1, 3, 16, 16), 1 + 5e-7)
    assert m.per_image(pred, torch.ones(1, 3, 16, 16))["ssim"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ssim_variant"):
        ImageMetrics(ssim_variant="piq")
    with pytest.raises(ValueError, match="lpips"):
        ImageMetrics(lpips="squeeze")
    with pytest.raises(ValueError, match="num_features"):
        ImageMetrics(fid=True, fid_feature=nn.Flatten())


# ------------------------------------------------------------------------------------------- real weights, if present


@pytest.mark.slow
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_real_weights_when_available(net):
    try:
        resolve_weights([f"lpips_{net}"])
    except (FileNotFoundError, WeightsHashError) as err:
        pytest.skip(f"pretrained backbone not available offline: {str(err).splitlines()[0]}")
    m = ImageMetrics(psnr=False, ssim=False, lpips=net)
    target = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    scores = [m.per_image((target + s * noise).clamp(0, 1), target)["lpips"] for s in (0.0, 0.05, 0.2)]
    assert torch.allclose(scores[0], torch.zeros(2), atol=1e-6)
    assert bool((scores[1] < scores[2]).all())
