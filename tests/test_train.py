"""Training: EDM loss and preconditioning, the GMM sample datamodule, run_training from the real Hydra config, the CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, compose
from hydra.utils import instantiate
from torch import Tensor, nn

from diffinv_pl.data.gmm_samples import GMMSampleDataModule
from diffinv_pl.priors.mlp import MLPDenoiserNet
from diffinv_pl.diffusion.losses import EDMObjective, denoising_loss
from diffinv_pl.tasks.diffusion_training import DiffusionTask
from diffinv_pl.training import run_training

QUIET = ["+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]


class ZeroNet(nn.Module):
    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        return torch.zeros_like(x)


def _train_cfg(tmp_path: Path, max_epochs: int, *extra: str):
    return compose("train", ["experiment=gmm_denoiser", f"trainer.max_epochs={max_epochs}", f"paths.output_dir={tmp_path}", *QUIET, *extra])


def _validate(model: L.LightningModule, data: L.LightningDataModule) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return {k: float(v) for k, v in trainer.validate(model, datamodule=data, verbose=False)[0].items()}


def test_edm_loss_of_zero_network_matches_hand_computation():
    # sigma = 1, sigma_data = 0.5: c_skip = 0.25 / 1.25 = 0.2, lambda = 1.25 / 0.25 = 5.
    # x0 = (1, -1), n = (1, 1): D = 0.2 (x0 + n) = (0.4, 0); ||D - x0||^2 / d = (0.36 + 1) / 2 = 0.68; loss = 3.4.
    objective = EDMObjective(sigma_data=0.5)
    denoiser = objective.precondition(ZeroNet())
    x0 = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss = denoising_loss(denoiser, objective, x0, torch.tensor([1.0], dtype=torch.float64), torch.ones_like(x0)).mean()
    assert loss.item() == pytest.approx(3.4, rel=1e-12)
    # batch mean of per-sample terms; second sample sigma = 2: c_skip = 0.25 / 4.25, lambda = 4.25 / 1 = 4.25.
    x0b = torch.tensor([[1.0, -1.0], [2.0, 0.0]], dtype=torch.float64)
    c = 0.25 / 4.25
    second = 4.25 * ((c * 2 - 2) ** 2 + 0.0) / 2  # noise 0 for the second sample
    noise = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    loss_b = denoising_loss(denoiser, objective, x0b, torch.tensor([1.0, 2.0], dtype=torch.float64), noise).mean()
    assert loss_b.item() == pytest.approx((3.4 + second) / 2, rel=1e-12)


def test_untrained_mlp_is_c_skip_and_sigma_is_lognormal():
    net = MLPDenoiserNet(dim=4, hidden_dim=16, num_blocks=2)
    task = DiffusionTask(net, objective_params={"sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2}, model_range=None)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(task.denoiser(x, 2.0), x * (0.25 / 4.25), rtol=1e-6, atol=0)  # zero-initialised output layer: D = c_skip x
    log_sigma = task.objective.sample_sigma(20000, torch.Generator().manual_seed(0)).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=4 * 1.2 / math.sqrt(20000))
    assert log_sigma.std().item() == pytest.approx(1.2, rel=0.03)
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(3, 5), torch.zeros(3))


def test_run_training_lowers_error_to_exact_denoiser(tmp_path):
    cfg = _train_cfg(tmp_path, 10)
    L.seed_everything(cfg.seed)  # the same initial weights run_training will draw
    data, untrained = instantiate(cfg.data), instantiate(cfg.model)
    before = _validate(untrained, data)

    metrics = run_training(cfg)

    # Measured (1 CPU thread): val/mse_vs_exact 0.240 -> 0.019, val/loss 1.75 -> 0.65 (exact denoiser: 0.41).
    assert metrics["val/mse_vs_exact"] < before["val/mse_vs_exact"] / 5
    assert metrics["val/loss"] < 0.6 * before["val/loss"]
    assert math.isfinite(metrics["train/loss"])
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    restored = DiffusionTask.load_from_checkpoint(last)  # the network config is stored in the checkpoint
    assert restored.hparams.lr == cfg.model.lr
    assert _validate(restored, data)["val/mse_vs_exact"] == pytest.approx(metrics["val/mse_vs_exact"], rel=1e-5)


@pytest.mark.slow
def test_full_gmm_denoiser_experiment_approaches_exact_denoiser(tmp_path):
    # Measured (100 epochs, ~20 s on 1 CPU thread): val/mse_vs_exact 0.0016, val/loss 0.438 (exact denoiser: 0.411).
    metrics = run_training(compose("train", ["experiment=gmm_denoiser", f"paths.output_dir={tmp_path}", *QUIET]))
    assert metrics["val/mse_vs_exact"] < 0.005
    assert metrics["val/loss"] < 0.46


@pytest.mark.parametrize("overrides", [[], ["data=gmm_samples"], ["model=edm_mlp"]])
def test_run_training_without_data_or_model_names_experiment(tmp_path, overrides):
    cfg = compose("train", [f"paths.output_dir={tmp_path}", *overrides])
    with pytest.raises(ValueError, match=r"experiment=<name>"):
        run_training(cfg)


def test_gmm_sample_datamodule_is_deterministic_and_matches_its_prior():
    def train_samples(seed: int) -> tuple[GMMSampleDataModule, Tensor]:
        dm = GMMSampleDataModule(dim=8, num_train=8192, num_val=64, batch_size=64, scale=1 / 16, seed=seed)
        dm.setup("fit")
        return dm, dm.train_set.tensors[0]

    dm, x = train_samples(0)
    _, x_again = train_samples(0)
    _, x_other = train_samples(1)
    assert x.dtype == torch.float32 and x.shape == (8192, 8)
    assert torch.equal(x, x_again) and not torch.equal(x, x_other)
    assert not torch.equal(dm.val_set.tensors[0], x[:64])

    prior = dm.prior
    mean = (prior.weights[0] @ prior.means[0]).float()
    var = ((prior.weights[0] @ prior.means[0] ** 2) - mean.double() ** 2 + 1 / 256).float()  # mixture variance per coordinate
    assert prior.means.abs().max().item() == pytest.approx(1.0)
    assert torch.all((x.mean(0) - mean).abs() < 4 * (var / x.shape[0]).sqrt())
    assert torch.allclose(x.var(0), var, rtol=0.1)

    batch = next(iter(dm.train_dataloader()))[0]
    assert batch.shape == (64, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_train": 32, "batch_size": 64}, "num_train >= batch_size"),
        ({"dim": 7}, "even dimension"),
        ({"scale": 0.0}, "scale"),
        ({"protocol": "nope"}, "unknown GMM protocol"),
    ],
)
def test_gmm_sample_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GMMSampleDataModule(**kwargs)


def test_train_cli_one_epoch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "train.py",
        "experiment=gmm_denoiser",
        "trainer.max_epochs=1",
        f"paths.output_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        *QUIET,
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_training_into_a_directory_with_checkpoints_is_refused_unless_resuming(tmp_path):
    run_training(_train_cfg(tmp_path, 1))
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds checkpoints.*resume it with ckpt_path=.*last.ckpt"):
        run_training(_train_cfg(tmp_path, 1))
    assert last.read_bytes() == before  # nothing touched
    metrics = run_training(_train_cfg(tmp_path, 2, f"ckpt_path={last}"))  # resuming the run is allowed
    assert math.isfinite(metrics["train/loss"])
    run_training(_train_cfg(tmp_path, 1, "overwrite=true"))  # explicit replacement is allowed


# ----------------------------------------------------------------------------------------------------------------------
# user errors before training, and last.ckpt (issue 10, items 3 and 5)

CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def test_last_checkpoint_holds_the_final_step_with_checkpoint_every_n_steps(tmp_path):
    # 1280 / 256 = 5 steps per epoch, a checkpoint every 3 steps: last.ckpt held step 3 before (steps 4-5 were lost)
    small = ["data.num_train=1280", "++trainer.limit_val_batches=1", "checkpoint_every_n_steps=3"]
    run_training(_train_cfg(tmp_path, 1, *small))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5
    run_training(_train_cfg(tmp_path, 2, *small, f"ckpt_path={last}"))  # and it resumes to the end of epoch 2
    assert torch.load(last, weights_only=True)["global_step"] == 10


def test_gpu_trainer_without_a_gpu_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from diffinv_pl.errors import UserError
    from diffinv_pl.utils.devices import check_trainer_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for trainer in ("gpu", "ddp"):
        with pytest.raises(UserError, match=r"asks for a GPU \(trainer.accelerator=gpu\).*trainer=cpu.*trainer=ddp_sim"):
            run_training(_train_cfg(tmp_path / trainer, 1, f"trainer={trainer}"))
        assert not (tmp_path / trainer).exists()
    for trainer in ("cpu", "ddp_sim"):
        check_trainer_devices(_train_cfg(tmp_path, 1, f"trainer={trainer}").trainer)
    for bad in ({"accelerator": "cuda"}, {"devices": [0, 1]}, {"accelerator": "cpu", "strategy": "deepspeed"}):
        with pytest.raises(UserError, match="trainer=cpu"):
            check_trainer_devices(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_trainer_devices(_train_cfg(tmp_path, 1, "trainer=ddp").trainer)


def test_bad_ckpt_path_is_refused_before_training(tmp_path):
    from diffinv_pl.errors import UserError, UserFileError

    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    cases = [
        (tmp_path / "missing.ckpt", UserFileError, r"missing.ckpt does not exist"),
        (tmp_path, UserFileError, r"is a directory"),
        (notes, UserError, r"notes.txt is not a PyTorch checkpoint"),
        (foreign, UserError, r"foreign.ckpt is not a training checkpoint of diffinv_pl"),
    ]
    for path, kind, match in cases:
        with pytest.raises(kind, match=match + r".*ckpt_path=<run>/checkpoints/last.ckpt"):
            run_training(_train_cfg(tmp_path / "run", 1, f"ckpt_path={path}"))
    assert not (tmp_path / "run").exists()


def test_unwritable_output_directory_is_refused_before_training(tmp_path):
    from diffinv_pl.errors import UserError

    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match=r"cannot write to the output directory .*afile/run.*paths.output_dir"):
        run_training(_train_cfg(tmp_path / "afile" / "run", 1))
    if os.geteuid() != 0:  # root writes into a read-only directory anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            with pytest.raises(UserError, match=r"cannot write to the output directory .*locked.*Permission denied"):
                run_training(_train_cfg(locked, 1))
        finally:
            locked.chmod(0o700)
    # the older refusals are user errors too (and keep their FileExistsError / ValueError types)
    (tmp_path / "done" / "checkpoints").mkdir(parents=True)
    (tmp_path / "done" / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(UserError, match="already holds checkpoints"):
        run_training(_train_cfg(tmp_path / "done", 1))
    with pytest.raises(UserError, match="experiment=<name>"):
        run_training(compose("train", [f"paths.output_dir={tmp_path}"]))


def test_train_cli_reports_user_errors_in_one_line_without_training(tmp_path):
    # Before: a 15-20 frame traceback each, and for the unwritable output directory a whole epoch of training first.
    (tmp_path / "afile").write_text("")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    cases = {
        "gpu": (["experiment=gmm_denoiser", "trainer=gpu"], ["trainer=cpu", "trainer=ddp_sim"]),
        "ckpt": (
            ["experiment=gmm_denoiser", f"ckpt_path={tmp_path / 'notes.txt'}"], ["notes.txt", "checkpoints/last.ckpt"]
        ),
        "readonly": (
            ["experiment=gmm_denoiser", f"paths.output_dir={tmp_path / 'afile' / 'run'}"], ["afile/run", "paths.output_dir"]
        ),
        "channels": (
            ["experiment=padis_ct_tiny", "model.net.image_channels=3", "data.train.num_images=16", "data.val.num_images=8"],
            ["1 channel(s) but the model expects 3", "model.net.image_channels=1"],
        ),
        "val_size": (
            ["experiment=padis_ct_tiny", "data.train.size=64", "data.train.num_images=16", "data.val.num_images=8"],
            ["have shape (1, 32, 32) but training images", "(1, 64, 64)", "data.val.size="],
        ),
    }
    procs = {}
    for name, (overrides, _) in cases.items():  # concurrently: each run is mostly start-up
        run = [f"paths.output_dir={tmp_path / name}", *overrides, f"hydra.run.dir={tmp_path / 'hydra' / name}", *QUIET]
        procs[name] = subprocess.Popen(
            [sys.executable, "train.py", *run], cwd=REPO, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    for name, (_, needles) in cases.items():
        out, err = procs[name].communicate(timeout=120)
        assert procs[name].returncode == 2, (name, err[-3000:])
        assert "Traceback" not in err and "Traceback" not in out, (name, err[-3000:])
        (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
        assert all(needle in line for needle in needles), (name, line)
        assert not (tmp_path / name / "checkpoints").exists() and not list(tmp_path.rglob("*.ckpt")), name
