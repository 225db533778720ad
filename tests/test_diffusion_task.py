"""DiffusionTask: objectives, the U-Net backbone, patch assembly, PaDIS patch training (loss, denoising, checkpoint
convention), exact resume, EMA, non-finite gradients, bf16, sample grids, 2-process DDP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image

from diffinv_pl.data.phantoms import CTPhantomDataset, random_ellipses_phantom
from diffinv_pl.data.shards import write_shards
from diffinv_pl.data.training import ImageTrainingDataModule, ShardTrainingDataModule
from diffinv_pl.diffusion.losses import EDMObjective, VEObjective, VPObjective, build_objective, denoising_loss
from diffinv_pl.diffusion.schedules import vp_continuous_sigma
from diffinv_pl.errors import UserError
from diffinv_pl.priors.checkpoints import CHECKPOINT_FORMAT, PriorCheckpointDescription, load_diffusion_prior
from diffinv_pl.priors.network import NetworkPrior, RangeAdaptedPrior
from diffinv_pl.priors.patch_denoiser import PatchAssembledPrior
from diffinv_pl.priors.patches import PatchTraining, PositionalConvention, canvas_positional_channels
from diffinv_pl.priors.unet import UNetDenoiserNet
from diffinv_pl.tasks.diffusion_training import DiffusionTask, ema_beta
from diffinv_pl.training import run_training

QUIET = ["+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
TINY_NET = {
    "_target_": "diffinv_pl.priors.unet.UNetDenoiserNet",
    "image_channels": 1,
    "block_out_channels": [16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
TINY_PATCH = {"image_size": 16, "pad_width": 4, "patch_sizes": [4, 8], "real_p": 0.5, "multipliers": {4: 2, 8: 1}}


def _tiny_task(patch: bool = True, dropout: float = 0.0, **kwargs) -> DiffusionTask:
    net = {**TINY_NET, "cond_channels": 2 if patch else 0, "dropout": dropout}
    defaults = dict(image_channels=1, data_range=(0.0, 1.0), lr=2e-3, ema_halflife_images=64, ema_rampup_ratio=None)
    return DiffusionTask(net, patch=TINY_PATCH if patch else None, **{**defaults, **kwargs})


def _phantom_data(num: int = 16, size: int = 16, batch_size: int = 4) -> ImageTrainingDataModule:
    return ImageTrainingDataModule(
        train=CTPhantomDataset(num, seed=11, size=size), val=CTPhantomDataset(4, seed=12, size=size), batch_size=batch_size
    )


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    base = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return L.Trainer(**{**base, **kwargs})


# ----------------------------------------------------------------------------------------------------------------------
# objectives and backbone


def test_objective_sigma_distributions_and_weights():
    gen = torch.Generator().manual_seed(0)
    ve = VEObjective(sigma_min=0.02, sigma_max=100.0)
    s = ve.sample_sigma(20000, gen)
    assert s.min() >= 0.02 and s.max() <= 100.0
    assert s.log().mean().item() == pytest.approx(0.5 * (math.log(0.02) + math.log(100.0)), abs=0.06)
    torch.testing.assert_close(ve.weight(torch.tensor([2.0])), torch.tensor([0.25]))
    vp = VPObjective()
    s = vp.sample_sigma(20000, gen)
    assert s.min() >= vp_continuous_sigma(torch.tensor(1e-5)).item() * 0.999 and s.max() <= vp_continuous_sigma(torch.tensor(1.0)).item()
    edm = EDMObjective()
    torch.testing.assert_close(edm.weight(torch.tensor([1.0])), torch.tensor([5.0]))  # (1 + 0.25) / 0.25
    with pytest.raises(ValueError, match="unknown diffusion objective 'foo'; valid: edm, vp, ve"):
        build_objective("foo")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['sigma_max'\]"):
        build_objective("edm", sigma_max=3.0)


@pytest.mark.parametrize("name", ["edm", "vp", "ve"])
def test_every_objective_gives_zero_loss_for_the_exact_point_mass_denoiser(name):
    # data = a point mass at c: the exact denoiser is D = c at every sigma. A raw network that inverts each wrapper's
    # documented (c_in, c_noise, c_skip, c_out) gives exactly that D, so the loss is 0 only if the wrapper, its noise
    # conditioning and the loss agree; a wrapper with another convention leaves a positive loss.
    objective = build_objective(name)
    c = torch.full((3, 1, 4, 4), 0.3, dtype=torch.float64)

    class ExactRawNet(torch.nn.Module):
        def forward(self, x_in, c_noise):
            if name == "edm":  # c_noise = ln(s)/4, c_in = 1/sqrt(s^2 + sd^2), D = c_skip x + c_out F
                s, sd = (4 * c_noise).exp().reshape(-1, 1, 1, 1), objective.sigma_data
                x = x_in * (s**2 + sd**2).sqrt()
                return (c - sd**2 / (s**2 + sd**2) * x) / (s * sd / (s**2 + sd**2).sqrt())
            if name == "ve":  # c_noise = ln(s/2), c_in = 1, D = x + s F
                s = 2 * c_noise.exp().reshape(-1, 1, 1, 1)
                return (c - x_in) / s
            # vp: c_noise = (M-1) t(s), c_in = 1/sqrt(1 + s^2), D = x - s eps
            s = vp_continuous_sigma(c_noise / (objective.num_train_steps - 1)).reshape(-1, 1, 1, 1)
            x = x_in * (1 + s**2).sqrt()
            return (x - c) / s

    sigma = objective.sample_sigma(3, torch.Generator().manual_seed(1))
    noise = torch.randn(c.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss = denoising_loss(objective.precondition(ExactRawNet()), objective, c, sigma, noise)
    assert loss.shape == (3,) and float(loss.max()) < 1e-18
    class ZeroRawNet(torch.nn.Module):
        def forward(self, x_in, c_noise):
            return torch.zeros_like(x_in)

    other = denoising_loss(objective.precondition(ZeroRawNet()), objective, c, sigma, noise)
    assert bool((other > 1e-6).all())  # another network is not exact


def test_unet_backbone_shapes_and_errors():
    net = UNetDenoiserNet(image_channels=1, cond_channels=2, block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8)
    x, pos = torch.randn(2, 1, 8, 8), torch.zeros(2, 2, 8, 8)
    assert net(x, torch.zeros(2), pos=pos).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="needs 2 conditioning"):
        net(x, torch.zeros(2))
    with pytest.raises(ValueError, match=r"expected \(B, 1, H, W\).*image_channels"):
        net(torch.randn(2, 3, 8, 8), torch.zeros(2), pos=pos)
    with pytest.raises(ValueError, match="multiple of 2"):
        net(torch.randn(2, 1, 7, 7), torch.zeros(2), pos=torch.zeros(2, 2, 7, 7))
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        UNetDenoiserNet(block_out_channels=(12,), norm_num_groups=8)


def test_task_refuses_network_that_does_not_match_patch_mode():
    with pytest.raises(ValueError, match="patch training needs cond_channels=2"):
        DiffusionTask({**TINY_NET, "cond_channels": 0}, image_channels=1, patch=TINY_PATCH)
    with pytest.raises(ValueError, match="image_channels=3 but the network denoises 1"):
        DiffusionTask({**TINY_NET, "cond_channels": 0}, image_channels=3)


# ----------------------------------------------------------------------------------------------------------------------
# patch assembly and patch cutting


@pytest.mark.parametrize(("n", "m", "p"), [(16, 4, 8), (16, 3, 5), (16, 0, 8), (256, 24, 56)])
def test_assembled_denoiser_is_exact_for_pointwise_and_positional_patch_denoisers(n, m, p):
    convention = PositionalConvention(n, m)
    calls = []

    def pointwise(x, sigma, pos):
        calls.append(x.shape[0])
        return 2 * x - sigma.reshape(-1, 1, 1, 1)

    x = torch.rand(2, 1, n, n, dtype=torch.float64)
    d = PatchAssembledPrior(pointwise, convention, p, canvas_state=False)
    torch.testing.assert_close(d.denoise(x, 0.3, generator=torch.Generator().manual_seed(0)), 2 * x - 0.3, rtol=0, atol=1e-12)
    per_side = math.ceil((n + m) / p)
    assert calls == [2 * per_side**2]
    # the canvas state (default): the same on the centre, the pad value outside it, whatever the border held
    d = PatchAssembledPrior(pointwise, convention, p, pad_value=-1.0)
    canvas = d.encode(x)
    canvas = canvas + torch.rand(canvas.shape, dtype=torch.float64)  # noise over the border too
    out = d.denoise(canvas, 0.3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(d.decode(out), 2 * d.decode(canvas) - 0.3, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, d.encode(d.decode(out)), rtol=0, atol=0)
    if (n, m, p) == (256, 24, 56):
        assert per_side**2 == 25  # PaDIS's 5 x 5 grid

    # a patch "denoiser" returning its x / y positional channel must give the canvas coordinates at the image, for
    # every shift: the coordinates are cut from the right place and the patches written back to the right place
    coords = canvas_positional_channels(convention, dtype=torch.float64)[:, m : m + n, m : m + n]
    for channel in (0, 1):
        d = PatchAssembledPrior(lambda z, s, pos, c=channel: pos[:, c : c + 1], convention, p, canvas_state=False)
        for shift in {(0, 0), (max(m - 1, 0), 0), (0, max(m - 1, 0)), (m // 2, max(m - 1, 0))}:
            torch.testing.assert_close(d(x, 1.0, shift=shift)[0, 0], coords[channel], rtol=0, atol=1e-12)


def test_assembled_denoiser_errors():
    d = PatchAssembledPrior(lambda z, s, pos: z, PositionalConvention(16, 4), 8, canvas_state=False)
    with pytest.raises(ValueError, match="image_size"):
        d(torch.zeros(1, 1, 12, 12), 1.0)
    with pytest.raises(ValueError, match=r"shift \(4, 0\) must lie in \[0, 3\]"):
        d(torch.zeros(1, 1, 16, 16), 1.0, shift=(4, 0))
    canvas = PatchAssembledPrior(lambda z, s, pos: z, PositionalConvention(16, 4), 8)
    with pytest.raises(ValueError, match=r"padded-canvas states \(\.\.\., C, 24, 24\)"):
        canvas(torch.zeros(1, 1, 16, 16), 1.0)
    with pytest.raises(ValueError, match="pad_value must be finite"):
        PatchAssembledPrior(lambda z, s, pos: z, PositionalConvention(16, 4), 8, pad_value=float("nan"))


def test_patch_training_cut_positions_match_canvas_coordinates():
    pt = PatchTraining.build(**TINY_PATCH)
    images = torch.rand(3, 1, 16, 16)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    canvas = canvas_positional_channels(pt.convention)
    gen = torch.Generator().manual_seed(3)
    seen = set()
    for _ in range(20):
        patches, pos, size = pt.cut(images, gen)
        seen.add(size)
        m = pt.multipliers[size]
        assert patches.shape == (3 * m, 1, size, size) and pos.shape == (3 * m, 2, size, size)
        for k in range(3 * m):
            # locate the patch by its coordinates, then check both the pixels and the coordinates there
            top = int(round((pos[k, 1, 0, 0].item() / 2 + 0.5) * (pt.convention.padded_size - 1)))
            left = int(round((pos[k, 0, 0, 0].item() / 2 + 0.5) * (pt.convention.padded_size - 1)))
            torch.testing.assert_close(pos[k], canvas[:, top : top + size, left : left + size])
            torch.testing.assert_close(patches[k], padded[k // m, :, top : top + size, left : left + size])
    assert seen == {4, 8}
    with pytest.raises(ValueError, match="multipliers need an int >= 1 for every patch size"):
        PatchTraining.build(**{**TINY_PATCH, "multipliers": {4: 2}})
    with pytest.raises(ValueError, match="larger than the padded canvas"):
        PatchTraining.build(**{**TINY_PATCH, "patch_sizes": [8, 32], "multipliers": None})


# ----------------------------------------------------------------------------------------------------------------------
# training


def _validate(model, data) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return {k: float(v) for k, v in trainer.validate(model, datamodule=data, verbose=False)[0].items()}


@pytest.fixture(scope="module")
def trained_padis(tmp_path_factory):
    """The tiny padis_ct experiment trained for 6 epochs: (output dir, metrics before, metrics after)."""
    from hydra.utils import instantiate

    out = tmp_path_factory.mktemp("padis")
    cfg = compose("train", ["experiment=padis_ct_tiny", "trainer.max_epochs=6", f"paths.output_dir={out}", *QUIET])
    L.seed_everything(cfg.seed)
    before = _validate(instantiate(cfg.model), instantiate(cfg.data))
    return out, before, run_training(cfg)


def test_tiny_padis_ct_lowers_loss_and_denoises_held_out_phantoms(trained_padis, tmp_path):
    out, before, metrics = trained_padis
    # Measured (1 thread, 6 epochs, ~15 s; PaDIS defaults: air pad, canvas state, loss summed over patch pixels,
    # counted images x 1.3): val/loss 388 -> 181, val/psnr_gain_sigma0.2 -1.5 -> +2.2 dB (per-pixel mean loss and
    # loader counting instead: 1.52 -> 0.75, +1.8 dB).
    assert metrics["val/loss"] < 0.85 * before["val/loss"]
    assert metrics["val/psnr_gain_sigma0.2"] > 1.5

    ckpt = out / "checkpoints" / "last.ckpt"
    prior = load_diffusion_prior(ckpt, expected_channels=1)
    assert prior.convention == PositionalConvention(32, 8) and prior.max_patch_size == 16
    held_out = torch.stack([random_ellipses_phantom(i, 424242, 32) for i in range(8)])  # a seed never trained on
    x0 = 2 * held_out - 1  # model range [-1, 1]
    whole = prior.whole_image()  # the state is the canvas padded with air (-1), noised over its border too
    state = whole.encode(x0)
    noisy_state = state + 0.2 * torch.randn(state.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        denoised = whole.decode(whole.denoise(noisy_state, 0.2, generator=torch.Generator().manual_seed(0)))
    noisy = whole.decode(noisy_state)

    def psnr(x):  # on [0, 1], i.e. data range 2 in model units
        return (10 * torch.log10(4 / (x.clamp(-1, 1) - x0).square().flatten(1).mean(1))).mean().item()

    assert psnr(denoised) > psnr(noisy) + 1.5

    with pytest.raises(UserError, match=r"pad_width: 8 != 24.*expected_convention"):
        load_diffusion_prior(ckpt, expected_convention=PositionalConvention(32, 24))
    with pytest.raises(UserError, match="denoises 1 channel.*but 3 are expected"):
        load_diffusion_prior(ckpt, expected_channels=3)
    # resuming with another positional convention is refused before any training step
    bad = compose("train", ["experiment=padis_ct_tiny", "model.patch.pad_width=4", f"paths.output_dir={tmp_path}",
                            f"ckpt_path={ckpt}", *QUIET])
    with pytest.raises(ValueError, match="pad_width: 4 != 8"):
        run_training(bad)


def test_trained_patch_prior_drives_dps_from_the_evaluate_config(trained_padis, tmp_path):
    from diffinv_pl.cli import run_evaluation

    out, _, _ = trained_padis
    common = ["experiment=ct_baselines", "data.num_images=2", "data.size=32", "operator.image_size=32",
              "+operator.num_detectors=48", "task.solver_progress=false"]
    dps_cfg = compose("evaluate", [*common, "solver=dps", "solver.zeta=0.3", "sampling_grid=edm",
                                   "sampling_grid.num_steps=10", "sampling_grid.sigma_max=20", "prior=trained",
                                   f"prior.path={out / 'checkpoints' / 'last.ckpt'}", f"paths.output_dir={tmp_path / 'dps'}"])
    (row,) = run_evaluation(dps_cfg)
    rows = [json.loads(p.read_text()) for p in sorted((tmp_path / "dps" / "rows").glob("*.json"))]
    assert len(rows) == 2 and 8 < row["psnr"] < 40
    # one batch of 2 images, 10 DPS steps: 10 calls of the assembled denoiser, shared by the 2 samples
    assert [r["denoiser_calls"] for r in rows] == [5, 5]
    wrong = compose("evaluate", [*common, "solver=dps", "prior=trained", "prior.data_range=[-1,1]",
                                 f"prior.path={out / 'checkpoints' / 'last.ckpt'}", f"paths.output_dir={tmp_path / 'w'}"])
    with pytest.raises(InstantiationException, match=r"prior works on images in \(-1.0, 1.0\) but the operator expects \(0.0, 1.0\)"):
        run_evaluation(wrong)


def test_range_adapted_denoiser_is_exact_for_a_gaussian_prior():
    # x0 ~ N(mu, tau^2) in model units [-1, 1]; in data units [0, 1] (k = 2) it is N((mu + 1) / 2, (tau / 2)^2), and
    # the exact denoisers in both units must correspond through the adapter (sigma scales by k)
    mu, tau = 0.2, 0.3

    class ModelGaussian(torch.nn.Module):
        def forward(self, x, sigma):
            s = sigma.reshape(-1, 1, 1, 1)
            return mu + tau**2 / (tau**2 + s**2) * (x - mu)

    adapted = RangeAdaptedPrior(NetworkPrior(ModelGaussian(), (-1.0, 1.0)), (0.0, 1.0))
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.2, 1.0], dtype=torch.float64)
    mu_d, tau_d = (mu + 1) / 2, tau / 2
    exact = mu_d + tau_d**2 / (tau_d**2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - mu_d)
    torch.testing.assert_close(adapted.denoise(x, sigma), exact, rtol=0, atol=1e-12)


class _RecordLosses(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize(("where", "kind"), [("epoch_end", "phantoms"), ("mid_epoch", "phantoms"), ("mid_epoch", "shards"),
                                            ("last_batch", "phantoms"), ("last_batch", "shards")])
def test_resume_from_mid_run_checkpoint_repeats_uninterrupted_losses(where, kind, tmp_path):
    # 4 steps of batch 4 per epoch (16 phantoms, or a shard stream of 4 batches per epoch). Checkpoint after epoch 2
    # (step 8), in the middle of epoch 2 (step 6), or by step count at the last batch of epoch 1 (step 4).
    if kind == "shards":
        write_shards(CTPhantomDataset(16, seed=11, size=16), tmp_path / "shards", samples_per_shard=5)

    def data():
        if kind == "phantoms":
            return _phantom_data()
        return ShardTrainingDataModule(tmp_path / "shards", batch_size=4, batches_per_epoch=4, shuffle_buffer=6)

    def fit(max_epochs, root, ckpt_path=None, every_n_train_steps=None):
        L.seed_everything(0)
        task = _tiny_task(patch=True, dropout=0.1)  # dropout: its masks must also repeat after a resume
        record = _RecordLosses()
        if every_n_train_steps:
            ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_train_steps=every_n_train_steps)
        else:
            ckpt = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=-1, every_n_epochs=1)
        trainer = _trainer(root, max_epochs=max_epochs, callbacks=[record, ckpt])
        trainer.fit(task, datamodule=data(), ckpt_path=ckpt_path)
        return record.losses, task

    full, task_full = fit(4, tmp_path / "full")
    if where == "epoch_end":
        first, _ = fit(2, tmp_path / "part")
        resume_from = tmp_path / "part" / "last.ckpt"
    elif where == "mid_epoch":
        first, _ = fit(2, tmp_path / "part", every_n_train_steps=6)
        first = first[:6]  # the run went on to step 8; the checkpoint holds step 6
        resume_from = tmp_path / "part" / "epoch=1-step=6.ckpt"
    else:
        first, _ = fit(2, tmp_path / "part", every_n_train_steps=4)
        first = first[:4]  # the checkpoint holds step 4, saved at the last batch of epoch 0
        resume_from = tmp_path / "part" / "epoch=0-step=4.ckpt"
    rest, task_resumed = fit(4, tmp_path / "part2", ckpt_path=resume_from)
    assert len(full) == 16 and len(first) + len(rest) == 16
    torch.testing.assert_close(torch.tensor(first + rest), torch.tensor(full), rtol=0, atol=1e-6)
    for a, b in zip(task_full.state_dict().values(), task_resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_ema_schedule_and_nonfinite_gradients():
    # EDM: half-life 500k images, batch 512 -> beta = 0.5 ** (512 / 500000); ramp-up 0.05 caps the half-life early
    assert ema_beta(512, 10**9, 500_000, 0.05) == pytest.approx(0.5 ** (512 / 500_000))
    assert ema_beta(512, 10_000, 500_000, 0.05) == pytest.approx(0.5 ** (512 / 500))
    task = _tiny_task(patch=False)
    p = next(task.denoiser.parameters())
    p.grad = torch.full_like(p, float("nan"))
    p.grad.view(-1)[0] = 1.5
    task.on_before_optimizer_step(None)
    assert p.grad.view(-1)[0] == 1.5 and torch.count_nonzero(p.grad) == 1


def test_padis_loss_reduction_pad_value_and_nonfinite_gradients():
    """loss_reduction=padis_sum is the per-pixel mean times d = C P^2 (sum over pixels / number of patches); the
    training pad is the model-unit image of the data-unit zero; +-Inf gradients become +-1e5 with the PaDIS value."""
    mean_task, sum_task = _tiny_task(), _tiny_task(loss_reduction="padis_sum")
    sum_task.denoiser.load_state_dict(mean_task.denoiser.state_dict())
    x0 = torch.rand(3, 1, 16, 16) * 2 - 1

    def terms(task):
        return task._loss_terms(task.denoiser, x0, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6))

    (per_mean, sigma_a, size), (per_sum, sigma_b, size_b) = terms(mean_task), terms(sum_task)
    assert size == size_b and torch.equal(sigma_a, sigma_b) and per_mean.shape == (3 * TINY_PATCH["multipliers"][size],)
    torch.testing.assert_close(per_sum, per_mean * size * size, rtol=1e-6, atol=0)
    assert mean_task.patch.pad_value == -1.0  # [0, 1] data in [-1, 1]: air is -1, not mid-grey 0
    assert _tiny_task(data_range=None, model_range=None).patch.pad_value == 0.0
    task = _tiny_task(patch=False, nonfinite_grad_value=1e5)
    p = next(task.denoiser.parameters())
    p.grad = torch.zeros_like(p)
    p.grad.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.5])
    task.on_before_optimizer_step(None)
    assert p.grad.view(-1)[:4].tolist() == [0.0, 1e5, -1e5, 1.5]


def test_padis_image_counting_and_lr_rampup(tmp_path):
    """count_images=padis: a step of B loader images counts B x batch_mul_avg (TINY_PATCH: {4: 0.5, 8: 0.5}, m 2/1:
    0.5 x 2 + 0.5 x 1 = 1.5); lr_rampup_images ramps lr * min(1, counted images before the step / ramp-up), 0 first."""
    task = _tiny_task(count_images="padis", lr_rampup_images=100)
    assert task.patch.counted_images_factor == 1.5 and task.counted_images(4) == 6.0
    lrs = []

    class Lr(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0, enable_checkpointing=False, callbacks=[Lr()])
    trainer.fit(task, datamodule=_phantom_data())
    expected = torch.tensor([0.0, 2e-3 * 6 / 100, 2e-3 * 12 / 100])  # lr * counted images before the step / 100
    torch.testing.assert_close(torch.tensor(lrs), expected, rtol=1e-6, atol=0)
    for kwargs, message in [
        ({"loss_reduction": "sum"}, "model.loss_reduction='sum' is unknown: use one of mean, padis_sum"),
        ({"count_images": "patches"}, "model.count_images='patches' is unknown"),
        ({"lr_rampup_images": 100, "warmup_steps": 5}, "use one of the two warm-ups"),
        ({"nonfinite_grad_value": -1.0}, "nonfinite_grad_value must be finite and >= 0"),
    ]:
        with pytest.raises(UserError, match=message):
            _tiny_task(**kwargs)
    with pytest.raises(UserError, match="count_images=padis .* needs model.patch"):
        _tiny_task(patch=False, count_images="padis")
    with pytest.raises(UserError, match="model.patch.pad_value is not a setting"):
        DiffusionTask({**TINY_NET, "cond_channels": 2}, image_channels=1, patch={**TINY_PATCH, "pad_value": 0.0})


def test_ema_follows_the_weights_with_the_configured_half_life(tmp_path):
    task = _tiny_task(patch=False, ema_halflife_images=4, ema_rampup_ratio=None)  # batch 4: beta = 0.5 per step
    before = [p.detach().clone() for p in task.denoiser.parameters()]
    first_step: list[list[torch.Tensor]] = []

    class RecordFirstStep(Callback):  # the EMA update runs inside the optimizer step, before this hook
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 1:
                first_step.append([p.detach().clone() for p in module.denoiser.parameters()])
                for e, w in zip(module.ema.module.parameters(), first_step[0]):
                    assert torch.equal(e, w)  # the first update copies the step-1 weights (w1)

    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=False, limit_val_batches=0, callbacks=[RecordFirstStep()])
    trainer.fit(task, datamodule=_phantom_data())
    (w1,) = first_step
    w2 = list(task.denoiser.parameters())
    ema = list(task.ema.module.parameters())
    assert int(task.ema.n_averaged) == 2
    # the second update is ema = w1 + (1 - beta) (w2 - w1) with beta = ema_beta(4, 4, 4, None) = 0.5: the midpoint,
    # hence never the initial weights and strictly between w1 and w2 wherever they differ
    beta = ema_beta(4, 4, 4, None)
    assert beta == 0.5
    moved = 0
    for b, a1, a2, e in zip(before, w1, w2, ema):
        torch.testing.assert_close(e, a1 + (a2 - a1) * (1 - beta), rtol=0, atol=1e-7)
        differ = a1 != a2
        lo, hi = torch.minimum(a1, a2), torch.maximum(a1, a2)
        assert bool(((e > lo) & (e < hi))[differ].all())
        moved += int(differ.sum())
    assert moved > 0 and any(not torch.equal(e, b) for b, e in zip(before, ema))


def test_bf16_mixed_precision_and_sample_grid(tmp_path):
    task = _tiny_task(patch=True, sample_every_n_epochs=1, num_sample_images=4, sample_steps=3)
    trainer = _trainer(tmp_path, max_epochs=1, precision="bf16-mixed", limit_train_batches=2, limit_val_batches=1)
    trainer.fit(task, datamodule=_phantom_data())
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    grid = tmp_path / "samples" / "epoch_0000.png"
    with Image.open(grid) as im:
        assert im.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2 x 2 grid of 16 px images, padding 2


def test_channel_mismatch_between_data_and_model_is_refused(tmp_path):
    task = DiffusionTask({**TINY_NET, "image_channels": 3}, image_channels=3, data_range=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"the data has 1 channel\(s\) but the model expects 3"):
        _trainer(tmp_path, max_steps=1).fit(task, datamodule=_phantom_data())


@pytest.mark.parametrize("kind", ["phantoms", "shards"])
def test_two_process_ddp_training_completes_with_equal_batches(kind, tmp_path):
    class CountBatches(Callback):
        def __init__(self):
            self.count = 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            assert batch["image"].shape == (4, 1, 16, 16)
            self.count += 1

        def on_train_end(self, trainer, module):
            (tmp_path / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.count))

    if kind == "phantoms":
        data = _phantom_data(num=18, batch_size=4)  # 9 per rank: 2 full batches of 4 per epoch
        expected = 4
    else:
        # 3 shards of unequal size (8, 8, 2 phantoms); a fixed epoch of 3 batches per rank whatever the shard sizes
        write_shards(CTPhantomDataset(18, seed=11, size=16), tmp_path / "shards", samples_per_shard=8)
        data = ShardTrainingDataModule(tmp_path / "shards", batch_size=4, batches_per_epoch=3, shuffle_buffer=8)
        expected = 6
    trainer = _trainer(tmp_path, max_epochs=2, strategy="ddp_fork", devices=2, callbacks=[CountBatches()])
    trainer.fit(_tiny_task(patch=True, sample_every_n_epochs=1, num_sample_images=2, sample_steps=2), datamodule=data)
    counts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert counts == [expected, expected]
    if kind == "phantoms":  # grids come at the end of validation epochs (the shard module has no validation set)
        assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["epoch_0000.png", "epoch_0001.png"]
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_sample_grid_is_logged_to_an_offline_wandb_run(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), project="diffinv-test", offline=True)
    task = _tiny_task(patch=False, sample_every_n_epochs=1, num_sample_images=4, sample_steps=2)
    trainer = _trainer(tmp_path, max_epochs=1, logger=logger, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(task, datamodule=_phantom_data())
    logger.experiment.finish()
    media = list(tmp_path.glob("wandb/offline-run-*/files/media/images/samples_*.png"))
    assert len(media) == 1
    (record,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")  # protobuf records: metric names are plain bytes
    data = record.read_bytes()
    assert b"train/loss" in data and b"train/loss_sigma_" in data and b"val/psnr_gain_sigma0.2" in data


def test_patch_diffusion_variant_uses_the_whole_canvas_as_largest_patch(tmp_path):
    patch = {"image_size": 16, "pad_width": 0, "patch_sizes": "patch_diffusion", "real_p": 0.5}
    task = DiffusionTask({**TINY_NET, "cond_channels": 2}, image_channels=1, data_range=(0.0, 1.0), patch=patch)
    assert task.patch.probabilities == {4: 0.2, 8: 0.3, 16: 0.5}
    assert task.patch.multipliers == {4: 1, 8: 1, 16: 1}  # relative to the canvas: every size <= 16 has m = 64
    big = PatchTraining.build(image_size=256, pad_width=0, patch_sizes="patch_diffusion")
    assert big.multipliers == {64: 8, 128: 2, 256: 1}  # Patch-Diffusion at 256: 16/2, 4/2, 2/2
    seen = set()

    class Sizes(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.add(int(trainer.callback_metrics["train/patch_size"]))

    _trainer(tmp_path, max_steps=8, limit_val_batches=1, callbacks=[Sizes()]).fit(task, datamodule=_phantom_data())
    assert 16 in seen and len(seen) >= 2
    whole = task.whole_image_prior()
    assert whole.patch_size == 16 and whole.patches_per_side == 1  # the assembled denoiser is one full-canvas patch
    x = torch.rand(2, 1, 16, 16)
    pos = canvas_positional_channels(task.convention).expand(2, -1, -1, -1)
    torch.testing.assert_close(whole.denoise(x, 0.5, generator=torch.Generator().manual_seed(0)), task.ema_denoiser(x, 0.5, pos=pos))


def test_prior_loader_refuses_missing_foreign_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_diffusion_prior(tmp_path / "nope.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable diffinv_pl checkpoint"):
        load_diffusion_prior(tmp_path / "garbage.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="is not a diffinv_pl diffusion-prior checkpoint"):
        load_diffusion_prior(tmp_path / "foreign.ckpt")


# ----------------------------------------------------------------------------------------------------------------------
# checkpoint description


def _pad_width_keys(value) -> int:
    if isinstance(value, dict):
        return sum((k == "pad_width") + _pad_width_keys(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_pad_width_keys(v) for v in value)
    return 0


@pytest.mark.parametrize("objective", ["edm", "vp", "ve"])
def test_checkpoint_description_round_trips_and_refuses_unknown_missing_and_old_fields(objective, tmp_path):
    task = _tiny_task(patch=True, objective=objective, inference_patch_size=4)
    desc = task.checkpoint_description()
    assert desc.format == CHECKPOINT_FORMAT and desc.ema and desc.net["_target_"] == TINY_NET["_target_"]
    assert desc.positional_convention == PositionalConvention(16, 4) and desc.inference_patch_size == 4
    assert desc.objective_params == build_objective(objective).__dict__  # every parameter, defaults included
    expected_sigma = {
        "edm": (0.002, 80.0),
        "vp": tuple(vp_continuous_sigma(torch.tensor([1e-3, 1.0], dtype=torch.float64)).tolist()),
        "ve": (0.02, 100.0),
    }[objective]
    assert desc.sigma_range == pytest.approx(expected_sigma)
    d = desc.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain containers only
    assert _pad_width_keys(d) == 1  # the pad width is stored once, in the positional convention
    torch.save({"diffinv_pl": d}, tmp_path / "d.pt")
    assert PriorCheckpointDescription.from_dict(torch.load(tmp_path / "d.pt", weights_only=True)["diffinv_pl"]) == desc
    assert PriorCheckpointDescription.from_dict(d) == desc
    with pytest.raises(ValueError, match=r"unknown prior checkpoint description field\(s\) \['extra', 'pad_width'\]"):
        PriorCheckpointDescription.from_dict({**d, "extra": 1, "pad_width": 4})
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['ema', 'sigma_range'\]"):
        PriorCheckpointDescription.from_dict({k: v for k, v in d.items() if k not in ("ema", "sigma_range")})
    with pytest.raises(ValueError, match=r"'diffinv_pl.diffusion_prior/1' is not .*retrain the prior.*re-export it"):
        PriorCheckpointDescription.from_dict({**d, "format": "diffinv_pl.diffusion_prior/1"})
    whole = _tiny_task(patch=False, objective=objective, ema_halflife_images=None).checkpoint_description()
    assert whole.positional_convention is None and whole.inference_patch_size is None and not whole.ema
    assert PriorCheckpointDescription.from_dict(whole.to_dict()) == whole
    # format 2 (before the air pad and the canvas state): whole-image descriptions read unchanged, patch ones refused
    assert PriorCheckpointDescription.from_dict({**whole.to_dict(), "format": "diffinv_pl.diffusion_prior/2"}) == whole
    with pytest.raises(ValueError, match=r"patch prior has checkpoint format .*/2.*mid-grey.*retrain"):
        PriorCheckpointDescription.from_dict({**d, "format": "diffinv_pl.diffusion_prior/2"})


@pytest.mark.parametrize(("patch", "ema"), [(True, True), (False, False)])
def test_saved_checkpoint_description_is_what_the_task_built(patch, ema, tmp_path):
    task = _tiny_task(patch=patch, ema_halflife_images=64 if ema else None)
    trainer = _trainer(tmp_path, max_steps=1, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(task, datamodule=_phantom_data())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    built = task.checkpoint_description()
    prior = load_diffusion_prior(path, use_ema=ema)
    assert prior.description == built
    assert prior.convention == built.positional_convention and prior.max_patch_size == built.inference_patch_size
    assert prior.sigma_range == built.sigma_range == (0.002, 80.0)
    assert (prior.data_range, prior.model_range, prior.image_channels) == ((0.0, 1.0), (-1.0, 1.0), 1)
    for a, b in zip(prior.denoiser.state_dict().values(), task.ema_denoiser.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if not ema:
        with pytest.raises(ValueError, match="has no EMA weights: load it with use_ema=False"):
            load_diffusion_prior(path)
        return

    # a format-1 checkpoint (the hand-written block of earlier versions) is refused, saying what to do
    ckpt = torch.load(path, weights_only=True)
    ckpt["diffinv_pl"] = {
        "format": "diffinv_pl.diffusion_prior/1", "positional_convention": built.positional_convention.to_dict(),
        "image_channels": 1, "data_range": (0.0, 1.0), "model_range": (-1.0, 1.0), "objective": "edm",
    }
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match=r"format 'diffinv_pl.diffusion_prior/1' is not .*/3.*retrain the prior"):
        load_diffusion_prior(tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="retrain the prior"):  # resuming it too
        _tiny_task(patch=patch).on_load_checkpoint(ckpt)
    # the re-export the message describes gives a loadable checkpoint with the same description
    old = torch.load(tmp_path / "old.ckpt", weights_only=True)
    rebuilt = DiffusionTask(**old["hyper_parameters"])
    rebuilt.load_state_dict(old["state_dict"])
    old["diffinv_pl"] = rebuilt.checkpoint_description().to_dict()
    torch.save(old, tmp_path / "reexported.ckpt")
    assert load_diffusion_prior(tmp_path / "reexported.ckpt").description == built
    # unknown fields in a stored description are named
    ckpt["diffinv_pl"] = {**built.to_dict(), "halflife": 3}
    torch.save(ckpt, tmp_path / "unknown.ckpt")
    with pytest.raises(ValueError, match=r"unknown prior checkpoint description field\(s\) \['halflife'\]"):
        load_diffusion_prior(tmp_path / "unknown.ckpt")


# ----------------------------------------------------------------------------------------------------------------------
# user errors and epoch values after a resume (issue 10, items 3 and 5)


class _RecordEpochMetrics(L.pytorch.loggers.Logger):
    """Logger keeping the epoch-level train/loss_sigma_* values per epoch."""

    def __init__(self):
        super().__init__()
        self.epochs: dict[int, dict[str, float]] = {}

    @property
    def name(self):
        return "record"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        bands = {k: float(v) for k, v in metrics.items() if k.startswith("train/loss_sigma_")}
        if bands:
            self.epochs.setdefault(int(metrics["epoch"]), {}).update(bands)


def test_epoch_band_losses_after_a_resume_cover_the_whole_epoch_or_are_labelled_partial(tmp_path):
    # 2 epochs of 4 steps, a checkpoint every 2 steps. Resumed from step 6 (mid-epoch 2), the run's epoch-2
    # train/loss_sigma_<band> equal the uninterrupted run's (before: the mean of the 2 post-resume batches only); from
    # a checkpoint without the stored sums the resumed epoch's values are logged as train/loss_sigma_<band>_partial.
    def fit(root, ckpt_path=None):
        L.seed_everything(0)
        task = _tiny_task(patch=True, sigma_bands=(0.5,))
        record = _RecordEpochMetrics()
        ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_train_steps=2)
        trainer = _trainer(root, max_epochs=2, callbacks=[ckpt], logger=record, log_every_n_steps=1)
        trainer.fit(task, datamodule=_phantom_data(), ckpt_path=ckpt_path)
        return record.epochs

    full = fit(tmp_path / "full")
    assert sorted(full) == [0, 1] and sorted(full[1]) == ["train/loss_sigma_ge0.5", "train/loss_sigma_lt0.5"]
    resumed = fit(tmp_path / "resumed", tmp_path / "full" / "epoch=1-step=6.ckpt")
    assert sorted(resumed) == [1] and resumed[1].keys() == full[1].keys()
    for name, value in full[1].items():
        assert resumed[1][name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    old = tmp_path / "old.ckpt"  # e.g. a checkpoint written before the sums were stored
    checkpoint = torch.load(tmp_path / "full" / "epoch=1-step=6.ckpt", weights_only=True)
    del checkpoint["diffinv_pl_epoch_bands"]
    torch.save(checkpoint, old)
    partial = fit(tmp_path / "from_old", old)
    assert partial[1] and all(name.endswith("_partial") for name in partial[1]), partial


def test_channel_mismatch_is_a_user_error_naming_both_counts_and_the_override(tmp_path):
    from diffinv_pl.errors import UserError

    task = DiffusionTask({**TINY_NET, "image_channels": 3}, image_channels=3, data_range=(0.0, 1.0))
    with pytest.raises(UserError, match=r"1 channel\(s\) but the model expects 3.*model.net.image_channels=1"):
        _trainer(tmp_path, max_steps=1).fit(task, datamodule=_phantom_data())
    with pytest.raises(UserError, match=r"model.image_channels=3 but the network denoises 1.*model.net.image_channels"):
        DiffusionTask(TINY_NET, image_channels=3)
    data = ImageTrainingDataModule(
        train=CTPhantomDataset(8, seed=11, size=16), val=None, batch_size=4, expected_channels=3
    )
    with pytest.raises(UserError, match=r"data has 1 channel\(s\) but the model expects 3.*model.net.image_channels=1"):
        data.setup("fit")
