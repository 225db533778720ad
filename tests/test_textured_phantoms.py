"""The ``textured`` CT phantom family: determinism, air outside one filled body, band-limited texture (not piecewise
constant), resolution independence, the dataset / config / CLI wiring, and refusal of bad parameters."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose, user_error
from hydra.utils import instantiate
from scipy import ndimage

from diffinv_pl.data.phantoms import CTPhantomDataset, phantom_generator, phantom_key, random_ellipses_phantom
from diffinv_pl.data.textured_phantoms import TexturedParams, band_limited_field, textured_phantom
from diffinv_pl.errors import UserError
from diffinv_pl.utils.seeding import key_generator


def _body(image: torch.Tensor) -> np.ndarray:
    return image[0].numpy() > 0


def _flat_fraction(image: torch.Tensor) -> float:
    """Fraction of 2x2 pixel blocks inside the body whose row and column differences are both exactly 0."""
    x, body = image[0].numpy(), _body(image)
    flat = (np.diff(x, axis=0)[:, :-1] == 0) & (np.diff(x, axis=1)[:-1, :] == 0)
    inside = body[:-1, :-1] & body[1:, :-1] & body[:-1, 1:]
    return float(flat[inside].mean())


def test_deterministic_per_seed_and_index():
    a = textured_phantom(7, seed=3, size=64)
    assert a.shape == (1, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, textured_phantom(7, seed=3, size=64))  # bitwise
    others = [textured_phantom(index, seed, 64) for index, seed in [(8, 3), (7, 4), (6, 3)]]  # another index or seed
    assert all(float((a - b).abs().mean()) > 0.02 for b in others)
    # another family on the same (seed, index): its own stream, not the ellipse phantom
    assert not np.array_equal(_body(a), _body(random_ellipses_phantom(7, seed=3, size=64)))


@pytest.mark.parametrize("index", range(4))
def test_range_and_air_outside_one_filled_body(index):
    image = textured_phantom(index, seed=0, size=64)
    assert float(image.min()) == 0.0 and float(image.max()) <= 1.0
    body = _body(image)
    labels, count = ndimage.label(body)
    assert count == 1  # one body, air (exactly 0) everywhere else
    assert (ndimage.binary_fill_holes(body) == body).all()  # no air inside: lungs stay above 0
    assert 0.3 < body.mean() < 0.5  # the torso covers 34-40 % of the square (measured on seed 0)
    grid = torch.linspace(-1 + 1 / 64, 1 - 1 / 64, 64)
    radius = torch.sqrt(grid[:, None] ** 2 + grid[None, :] ** 2).numpy()
    assert radius[body].max() < 0.9  # inside the disc every CT geometry sees
    inside = ndimage.binary_erosion(body)  # away from the soft outline, which falls to 0 over a pixel
    assert image[0].numpy()[inside].min() > 0.02


def test_not_piecewise_constant_unlike_the_ellipses():
    textured = [_flat_fraction(textured_phantom(i, 0, 64)) for i in range(4)]
    ellipses = [_flat_fraction(random_ellipses_phantom(i, 0, 64)) for i in range(4)]
    assert max(textured) < 0.01  # no flat 2x2 block inside the body (measured: 0)
    assert min(ellipses) > 0.7  # the ellipse phantoms are flat almost everywhere (measured: 0.81-0.87)


@pytest.mark.parametrize(("size", "band"), [(64, (6.0, 20.0)), (128, (3.0, 9.0))])
def test_random_field_is_band_limited_with_unit_variance(size, band):
    for s in range(2):
        field = band_limited_field(key_generator(s, "field"), band, size).numpy()
        assert abs(field.mean()) < 0.05 and 0.8 < field.var() < 1.2  # measured 0.90-1.06
        window = np.hanning(size)
        power = np.abs(np.fft.fft2(field * window[:, None] * window[None, :])) ** 2
        k = np.fft.fftfreq(size) * size  # FFT bin = cycles per image side = cycles per field of view
        radial = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
        in_band = (radial >= band[0] - 1.5) & (radial <= band[1] + 1.5)  # the Hann window spreads a line by 1 bin
        assert power[in_band].sum() / power.sum() > 0.999  # measured >= 0.9997
        below = radial < band[0] - 1.5
        assert power[below].sum() / power.sum() < 1e-3


def test_texture_is_the_amplitude_times_the_band_limited_field_in_soft_tissue():
    # only the texture's size changes with texture_amplitude: image(a) - image(0) = a * G * T, G = 1 in soft tissue
    seed, index, size, a = 5, 2, 64, 0.05
    flat = textured_phantom(index, seed, size, TexturedParams(texture_amplitude=0.0))
    tex = textured_phantom(index, seed, size, TexturedParams(texture_amplitude=a))
    field = band_limited_field(key_generator(seed, f"ct-textured/{index}/texture"), (6.0, 20.0), size)
    diff = (tex - flat)[0].double()
    body = torch.from_numpy(_body(flat))
    assert torch.equal(body, torch.from_numpy(_body(tex)))  # the texture never moves the outline
    gain = (diff / (a * field))[body & (field.abs() > 0.3)]
    assert abs(float(gain.median()) - 1.0) < 1e-3  # most of the body is soft tissue with gain exactly 1
    assert float(gain.min()) > -1e-3 and float(gain.max()) < 1.5 + 1e-3  # gains lie in [0, 1.5] (marrow 1.5)
    assert 0.03 < float(diff[body].std()) < 0.06  # the texture's size is about a = 0.05


def test_same_torso_at_every_size():
    for index in range(2):
        small = textured_phantom(index, 1, 64)
        large = textured_phantom(index, 1, 256)
        assert small.shape == (1, 64, 64) and large.shape == (1, 256, 256)
        pooled = F.avg_pool2d(large, 4)  # area means of 4x4 blocks vs point samples at the 64 px centres
        body = torch.from_numpy(_body(small))
        assert float((pooled - small)[0].abs()[body].mean()) < 0.025  # measured 0.014-0.017
        assert float((pooled - small).abs().mean()) < 0.01


def test_parameters_change_what_they_name():
    with_lungs = [textured_phantom(i, 0, 64) for i in range(4)]
    without = [textured_phantom(i, 0, 64, TexturedParams(lungs=False)) for i in range(4)]

    def dark(image: torch.Tensor) -> float:  # fraction of the body below 0.15 (lung), away from the soft outline
        body = ndimage.binary_erosion(_body(image), iterations=2)
        return float((image[0].numpy()[body] < 0.15).mean())

    assert np.mean([dark(x) for x in with_lungs]) > 0.05 and max(dark(x) for x in without) < 0.01
    organs = textured_phantom(0, 0, 64, TexturedParams(num_structures=8))
    assert not torch.equal(organs, with_lungs[0]) and np.array_equal(_body(organs), _body(with_lungs[0]))


def test_dataset_kind_keys_and_options():
    ds = CTPhantomDataset(3, seed=2, size=32, kind="textured", texture_amplitude=0.05, num_structures=2)
    assert ds.keys == ["textured_00000", "textured_00001", "textured_00002"] and len(ds) == 3
    item = ds[1]
    params = TexturedParams(texture_amplitude=0.05, num_structures=2)
    assert item["key"] == "textured_00001" and torch.equal(item["image"], textured_phantom(1, 2, 32, params))
    ellipses = CTPhantomDataset(3, seed=2, size=32)
    assert not set(ds.keys) & set(ellipses.keys)  # the families' keys never collide
    assert torch.equal(ellipses[1]["image"], random_ellipses_phantom(1, 2, 32))
    assert phantom_key(4) == "phantom_00004" and phantom_key(4, "textured") == "textured_00004"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"texture_amplitude": -0.01}, r"texture_amplitude must be a number in \[0, 0.2\]"),
        ({"texture_amplitude": 0.5}, r"texture_amplitude must be a number in \[0, 0.2\]"),
        ({"texture_amplitude": "big"}, r"texture_amplitude must be a number"),
        ({"texture_band": [20, 6]}, r"texture_band needs 0 < low < high"),
        ({"texture_band": [0, 6]}, r"texture_band needs 0 < low < high"),
        ({"texture_band": [6]}, r"texture_band must be two numbers"),
        ({"texture_band": "wide"}, r"texture_band must be two numbers"),
        ({"num_structures": 9}, r"num_structures must be an integer in \[0, 8\]"),
        ({"num_structures": 2.5}, r"num_structures must be an integer"),
        ({"lungs": "yes"}, r"lungs must be true or false"),
        ({"texture_amp": 0.1}, r"unknown textured-phantom option\(s\) \['texture_amp'\]; the options are"),
    ],
)
def test_bad_parameters_raise_one_user_error(options, match):
    with pytest.raises(UserError, match=match):
        CTPhantomDataset(2, size=32, kind="textured", **options)


def test_bad_requests_raise_one_user_error():
    with pytest.raises(UserError, match=r"unknown phantom kind 'cubes'; choose one of \['ellipses', 'textured'\]"):
        CTPhantomDataset(2, kind="cubes")
    with pytest.raises(UserError, match=r"the ellipse phantoms take no options, got \['lungs'\]"):
        phantom_generator("ellipses", lungs=True)
    with pytest.raises(UserError, match=r"phantom index must be an integer >= 0, got -1"):
        textured_phantom(-1, 0, 32)
    with pytest.raises(UserError, match=r"phantom size must be an integer >= 2 pixels, got 1"):
        textured_phantom(0, 0, 1)
    with pytest.raises(UserError, match=r"num_images must be an integer >= 1, got 0"):
        CTPhantomDataset(0, kind="textured")


def test_evaluation_config_is_held_out_from_training(tmp_path):
    cfg = compose("evaluate", ["data=ct_textured_phantoms", f"paths.output_dir={tmp_path}", "data.num_images=2",
                               "data.size=32"])
    ds = instantiate(cfg.data)
    assert ds.kind == "textured" and ds.keys == ["textured_00000", "textured_00001"]
    assert torch.equal(ds[1]["image"], textured_phantom(1, cfg.seed, 32))  # the config's options are the defaults
    train_cfg = compose("train", ["data=train_ct_textured_phantoms", f"paths.output_dir={tmp_path}",
                                  "data.train.num_images=4", "data.train.size=32", "data.val.num_images=2",
                                  "data.batch_size=2", "data.num_workers=0", "data.train.texture_amplitude=0.05"])
    dm = instantiate(train_cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 32) and all(k.startswith("textured_") for k in batch["key"])
    assert len({cfg.seed, dm.train.seed, dm.val.seed}) == 3  # evaluation, training and validation sets differ
    params = TexturedParams(texture_amplitude=0.05)  # the validation set follows the training set's options
    assert torch.equal(dm.val[0]["image"], textured_phantom(0, dm.val.seed, 32, params))


def test_make_ct_phantoms_kind_textured(tmp_path, capsys, repo_root):
    spec = importlib.util.spec_from_file_location("make_ct_phantoms", repo_root / "data_prep" / "make_ct_phantoms.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--output-root", str(tmp_path), "--num-images", "2", "--size", "32", "--seed", "4", "--format", "npy"]
    assert cli.main([*argv, "--kind", "textured"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["textured_00000.npy", "textured_00001.npy"]
    assert np.array_equal(np.load(tmp_path / "textured_00001.npy"), textured_phantom(1, 4, 32).numpy())
    assert "wrote 2 textured phantoms" in capsys.readouterr().out
    err = user_error(cli.main, [*argv, "--kind", "textured"], capsys)  # existing files are not overwritten
    assert "--overwrite" in err
