"""The paper-scale latent experiments (ReSample, LatentDAPS on the official LDM FFHQ) hold the paper's numbers
(methods.md §4.4 ReSample operators and sampler, §5.3 latent_edm_daps and the `ldm` HMC column, §5.4 DAPS operators,
§0.5 the released pixel-DDPM time map), each has a tiny CPU variant, and each refuses cleanly without the converted
LDM folder. The tiny variants run in tests/test_experiments.py::test_every_experiment_runs_in_a_tiny_cpu_variant."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF, compose
from test_experiments import PRIOR_FIXES, _check_refuses_without_checkpoint

# methods.md §4.4: ReSample operators (sigma_y 0.01); box inpainting: DPS's mask generator (128 box, margin 16)
RESAMPLE_OPERATORS = {
    "resample_sr": {"name": "sr_bicubic", "factor": 4},
    "resample_gaussian_deblur": {"name": "gaussian_blur", "kernel_size": 61, "std": 3.0},
    "resample_motion_deblur": {"name": "motion_blur", "kernel_size": 61, "intensity": 0.5},
    "resample_random_inpaint": {"name": "inpainting_random", "drop_range": [0.7, 0.71]},
    "resample_box_inpaint": {"name": "inpainting_box", "box_size": 128, "margin": 16},
}
# methods.md §0.5 / §4.7: the released ReSample sampler
RESAMPLE_SOLVER = {
    "_target_": "diffinv_pl.solvers.resample", "num_steps": 500, "num_train_steps": 1000,
    "beta_schedule": "sqrt_linear", "tweedie": "original", "guidance_scale_rule": "alphabar", "guidance_scale": 0.5,
    "dc_period": 10, "dc_splits": 3, "lookahead_steps": 5, "lookahead_network_time": "released", "gamma": 40.0,
    "pixel_lr": 1e-2, "pixel_max_iters": 2000, "latent_lr": 5e-3, "latent_max_iters": 500, "tolerance": 1e-3,
    "divergence_window": 200, "weight_decay": 0.01, "final_latent_optimization": True,
}
# methods.md §5.3: sampler latent_edm_daps (+ HMC, tau 0.01, gradient clip 1.0 of §5.2/§5.8)
LATENT_DAPS_SAMPLER = {
    "_target_": "diffinv_pl.solvers.daps", "num_levels": 50, "sigma_max": 10.0, "sigma_min": 0.1, "ode_steps": 2,
    "sigma_ode_min": 0.001, "rho": 7.0, "annealing": "main", "likelihood": "main", "x0_hat": "ode", "mcmc": "hmc",
    "tau": 0.01, "grad_clip": 1.0, "task": None, "lr_relative": False, "tau_relative": False,
}
# methods.md §5.3 `ldm` column: DAPS task -> (L, lr, lr_min_ratio, momentum)
LDM_HMC = {
    "phase_retrieval": (65, 2.1e-5, 0.12, 0.41), "down_sampling": (24, 1.35e-4, 0.023, 0.86),
    "inpainting": (15, 9.02e-6, 0.13, 0.74), "inpainting_rand": (38, 8.40e-6, 0.013, 0.92),
    "gaussian_blur": (35, 2.70e-6, 0.95, 0.95), "motion_blur": (49, 2.4e-5, 0.041, 0.45),
}
# methods.md §5.4: experiment -> (DAPS task, operator parameters)
LATENT_DAPS_TASKS = {
    "latent_daps_sr": ("down_sampling", {"name": "sr_bicubic", "factor": 4}),
    "latent_daps_gaussian_deblur": ("gaussian_blur", {"name": "gaussian_blur", "kernel_size": 61, "std": 3.0}),
    "latent_daps_motion_deblur": ("motion_blur", {"name": "motion_blur", "kernel_size": 61, "intensity": 0.5}),
    "latent_daps_random_inpaint": ("inpainting_rand", {"name": "inpainting_random", "drop_range": [0.7, 0.71]}),
    "latent_daps_box_inpaint": ("inpainting", {"name": "inpainting_box", "box_size": 128, "margin": 32}),
    "latent_daps_phase_retrieval": ("phase_retrieval",
                                    {"name": "phase_retrieval", "oversample": 2.0, "input_range": [0.0, 1.0]}),
}
PAPER_LATENT_EXPERIMENTS = sorted([*RESAMPLE_OPERATORS, *LATENT_DAPS_TASKS])


def test_every_latent_experiment_has_its_paper_numbers_checked_and_a_tiny_variant():
    names = {p.stem for p in (CONF / "experiment").glob("*.yaml")}
    paper = {n for n in names if n.startswith(("resample_", "latent_daps_")) and not n.endswith("_tiny")}
    assert paper == set(PAPER_LATENT_EXPERIMENTS)
    assert all(f"{n}_tiny" in names for n in paper)
    assert {n for n in names if n.startswith(("resample_", "latent_daps_")) and n.endswith("_tiny")} == {
        f"{n}_tiny" for n in paper}


@pytest.mark.parametrize("name", PAPER_LATENT_EXPERIMENTS)
def test_paper_latent_experiments_hold_the_paper_numbers(name, tmp_path):
    cfg = compose("evaluate", [f"experiment={name}", f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path}"])
    solver = OmegaConf.to_container(cfg.solver, resolve=False)
    operator = OmegaConf.to_container(cfg.operator, resolve=True)
    # FFHQ-256 RGB, the converted official LDM FFHQ
    assert cfg.task._target_.endswith("ReconstructionTask") and cfg.task_name == name
    assert operator["image_size"] == 256 and operator["channels"] == 3
    assert cfg.data._target_.endswith("ImageFolderDataset") and cfg.data.image_size == 256 and cfg.data.mode == "RGB"
    assert cfg.prior._target_ == "diffinv_pl.priors.latent.ldm_official_prior"
    assert cfg.prior.path == f"{tmp_path}/weights/ldm_ffhq" and cfg.prior.image_channels is None
    if name in RESAMPLE_OPERATORS:
        op, expected = RESAMPLE_OPERATORS[name], RESAMPLE_SOLVER
        assert cfg.task.sigma_y == 0.01 and cfg.task.num_runs == 1
        assert cfg.prior.time_map == "ldm" and list(cfg.prior.data_range) == [-1.0, 1.0]
    else:
        task, op = LATENT_DAPS_TASKS[name]
        L, lr, ratio, momentum = LDM_HMC[task]
        expected = {**LATENT_DAPS_SAMPLER, "mcmc_steps": L, "lr": lr, "lr_min_ratio": ratio, "momentum": momentum}
        assert cfg.task.sigma_y == 0.05 and cfg.prior.time_map == "pixel_vp"  # released time map (methods.md §0.5)
        if name == "latent_daps_phase_retrieval":
            # the operator measures |F pad(u)| of the [0, 1] image u = (x + 1) / 2: the solver's range is [0, 1],
            # the latent state and hence every sigma and step size are the released ones; best of 4 runs
            assert cfg.task.num_runs == 4 and list(cfg.prior.data_range) == [0.0, 1.0]
        else:
            assert cfg.task.num_runs == 1 and list(cfg.prior.data_range) == [-1.0, 1.0]
    assert {k: v for k, v in operator.items() if k in op} == op
    assert {k: solver[k] for k in expected} == expected


@pytest.mark.parametrize("name", PAPER_LATENT_EXPERIMENTS)
def test_tiny_latent_variants_keep_the_paper_solver_and_shrink_the_problem(name, tmp_path):
    """A tiny variant differs from its paper-scale config in the problem size, the prior and the step counts (and the
    LatentDAPS step size, see the configs' headers) only."""
    paper = compose("evaluate", [f"experiment={name}", f"paths.output_dir={tmp_path}"])
    tiny = compose("evaluate", [f"experiment={name}_tiny", f"paths.output_dir={tmp_path}"])
    assert tiny.prior._target_ == "diffinv_pl.priors.latent.latent_prior" and tiny.prior.expected_channels == 1
    assert tiny.operator.image_size == 32 and tiny.operator.channels == 1 and tiny.data.size == 32
    assert list(tiny.operator.input_range) == [0.0, 1.0] and tiny.task.sigma_y == paper.task.sigma_y
    if name.startswith("resample_"):
        assert tiny.solver.num_steps <= 100 and tiny.solver.gamma == paper.solver.gamma
    else:
        assert tiny.solver.num_levels == 10 and tiny.solver.mcmc_steps <= 10 and tiny.prior.time_map == "pixel_vp"
        assert (tiny.solver.lr_min_ratio, tiny.solver.momentum, tiny.solver.grad_clip, tiny.solver.mcmc) == (
            paper.solver.lr_min_ratio, paper.solver.momentum, paper.solver.grad_clip, paper.solver.mcmc)


@pytest.mark.parametrize("name", PAPER_LATENT_EXPERIMENTS)
def test_paper_latent_experiments_refuse_without_the_converted_ldm(name, tmp_path: Path):
    """Without ${paths.data_dir}/weights/ldm_ffhq: one UserFileError naming that folder and the compvis convert
    command, before anything is written (tests/test_experiments.py::_check_refuses_without_checkpoint)."""
    assert PRIOR_FIXES["diffinv_pl.priors.latent.ldm_official_prior"][0] == "compvis convert"
    _check_refuses_without_checkpoint(name, tmp_path)
