"""The DPS paper-scale experiments (conf/experiment/dps_*.yaml) hold the numbers of the released DPS configs
(methods.md §2, §7), run on the public ffhq_10m.pt prior, refuse cleanly without it, and their tiny CPU variants are
the same solver and operator with an analytic prior."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF, compose
from test_experiments import _check_refuses_without_checkpoint

# methods.md §2 (the released configs/*_config.yaml): experiment -> (zeta, operator parameters, runs reported)
DPS_TASKS = {
    "dps_sr4": (0.3, {"name": "sr_bicubic", "factor": 4}, 1),
    "dps_gaussian_deblur": (0.3, {"name": "gaussian_blur", "kernel_size": 61, "std": 3.0}, 1),
    "dps_motion_deblur": (0.3, {"name": "motion_blur", "kernel_size": 61, "intensity": 0.5}, 1),
    "dps_nonlinear_deblur": (0.3, {"name": "nonlinear_blur", "kernel_seed": 0, "kernel_std": 1.2, "network": None}, 1),
    "dps_box_inpaint": (0.5, {"name": "inpainting_box", "box_size": 128, "margin": 16}, 1),
    "dps_random_inpaint": (0.5, {"name": "inpainting_random", "drop_range": [0.3, 0.7]}, 1),
    "dps_phase_retrieval": (1.0, {"name": "phase_retrieval", "oversample": 2.0, "input_range": [-1.0, 1.0]}, 4),
}
# what a tiny variant may change (besides task_name): the prior, the data set, the sizes and the number of steps
TINY_CHANGES = {"prior", "data", "sampling_grid.num_steps", "operator.image_size", "operator.kernel_size",
                "operator.std", "operator.box_size", "operator.margin", "operator.network", "task_name"}


def _flat(cfg, prefix: str = "") -> dict:
    """Dotted key -> value of a resolved-as-written config (interpolations kept as strings)."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in ("prior", "data", "operator.network"):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def test_every_dps_experiment_is_checked():
    names = {p.stem for p in (CONF / "experiment").glob("dps_*.yaml")}
    assert names == set(DPS_TASKS) | {f"{n}_tiny" for n in DPS_TASKS}


@pytest.mark.parametrize("name", sorted(DPS_TASKS))
def test_dps_experiments_hold_the_paper_numbers(name, tmp_path):
    cfg = compose("evaluate", [f"experiment={name}", f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path}"])
    zeta, op, runs = DPS_TASKS[name]
    solver = OmegaConf.to_container(cfg.solver, resolve=False)
    operator = OmegaConf.to_container(cfg.operator, resolve=True)
    # FFHQ-256 RGB on [-1, 1], sigma_y 0.05, best of `runs`
    assert cfg.task_name == name and cfg.task._target_.endswith("ReconstructionTask")
    assert cfg.task.sigma_y == 0.05 and cfg.task.num_runs == runs
    assert operator["image_size"] == 256 and operator["channels"] == 3
    assert {k: v for k, v in operator.items() if k in op} == op
    assert cfg.data._target_.endswith("ImageFolderDataset") and cfg.data.image_size == 256 and cfg.data.mode == "RGB"
    # the released sampler: 1000 DDPM ancestral steps on guided-diffusion's linear betas, grad of ||y - A(x0_hat)||
    assert solver == {"_target_": "diffinv_pl.solvers.dps", "_partial_": True, "grid": "${sampling_grid}",
                      "zeta": zeta, "norm": "l2", "eta": 1.0, "clip_denoised": [-1.0, 1.0]}
    grid = cfg.sampling_grid
    assert grid._target_.endswith("vp_grid") and grid.beta_schedule == "linear"
    assert grid.num_steps == 1000 and grid.num_train_steps == 1000
    # the public DPS checkpoint, at the discrete DDPM index the network was trained on
    assert cfg.prior._target_ == "diffinv_pl.priors.adm.adm_prior" and cfg.prior.config == "ffhq"
    assert cfg.prior.path == f"{tmp_path}/weights/ffhq_10m.pt" and cfg.prior.time_map == "ddpm"
    assert list(cfg.prior.data_range) == [-1.0, 1.0]


@pytest.mark.parametrize("name", sorted(DPS_TASKS))
def test_dps_tiny_variants_change_only_the_prior_data_and_sizes(name, tmp_path):
    paper, tiny = (OmegaConf.to_container(compose("evaluate", [f"experiment={n}", f"paths.output_dir={tmp_path}"]))
                   for n in (name, f"{name}_tiny"))
    paper, tiny = _flat(paper), _flat(tiny)
    changed = {k for k in paper.keys() | tiny.keys() if paper.get(k) != tiny.get(k)}
    assert changed <= TINY_CHANGES, sorted(changed - TINY_CHANGES)
    assert tiny["prior"]["_target_"].endswith("StationaryGaussianPrior") and tiny["sampling_grid.num_steps"] <= 50


@pytest.mark.parametrize("name", sorted(DPS_TASKS))
def test_dps_experiments_refuse_without_ffhq_10m(name, tmp_path):
    """One UserFileError naming <data_dir>/weights/ffhq_10m.pt, where to download it and prior.path=; nothing
    written to the output dir."""
    _check_refuses_without_checkpoint(name, tmp_path)


@pytest.mark.parametrize("name", ["dps_random_inpaint_tiny", "dps_gaussian_deblur_tiny"])
def test_dps_tiny_guidance_beats_the_unguided_sampler(name, tmp_path: Path):
    """Same seed, same prior: the configured zeta gains > 2 dB PSNR over zeta = 0 (measured: inpainting 12.1 vs
    8.7 dB, Gaussian deblurring 11.9 vs 8.7 dB)."""
    from diffinv_pl.cli import run_evaluation

    psnr = {}
    for zeta in ("configured", "0.0"):
        overrides = [f"experiment={name}", f"paths.output_dir={tmp_path / zeta}", "task.solver_progress=false",
                     "++trainer.enable_progress_bar=false"]
        if zeta != "configured":
            overrides.append(f"solver.zeta={zeta}")
        psnr[zeta] = run_evaluation(compose("evaluate", overrides))[0]["psnr"]
    assert psnr["configured"] > psnr["0.0"] + 2.0, psnr
