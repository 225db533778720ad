"""Every conf/experiment/* composes with the real configs and runs in a tiny CPU variant; the paper-scale image
experiments (DAPS, CoDPS, CoDPS+) hold the paper's numbers and refuse to run without their checkpoint; CLI behaviour."""

from __future__ import annotations

import math

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from conftest import CONF, REPO, compose
from diffinv_pl.errors import UserFileError, find_user_error

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))

TINY = {
    "GMMPosteriorBenchmark": [
        "task.dims=[8]", "task.dims_y=[1]", "task.num_problems=2", "task.num_samples=64", "task.num_directions=64",
        "sampling_grid.num_steps=5",
    ],
    "ReconstructionTask": [
        "data.num_images=2", "data.size=32", "operator.image_size=32", "+operator.num_detectors=48",
        "++solver.num_iterations=20", "++trainer.enable_progress_bar=false",
    ],
    "train": ["trainer.max_epochs=1", "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1"],
}
# experiments whose own sizes are already small but whose solver is long: fewer images and steps
TINY_BY_NAME = {
    "ct_demo": ["data.num_images=2", "solver.num_levels=5", "solver.inner_steps=2",
                "++trainer.enable_progress_bar=false"],
}
# tiny training runs of the latent stack: one epoch of 2 batches
_TWO_BATCHES = ["trainer.max_epochs=1", "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1",
                "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"]
TINY_BY_NAME.update({name: _TWO_BATCHES for name in ("autoencoder_tiny", "autoencoder_kl_tiny", "ldm_tiny",
                                                     "ldm_latents_tiny")})
# the latent solvers' tiny variants (5-15 s each as configured): 2 images and fewer steps here (ReSample: one
# latent-space and one pixel-space event)
_RESAMPLE_FEWER = ["data.num_images=2", "solver.num_steps=40", "solver.pixel_max_iters=30",
                   "solver.latent_max_iters=20", "++trainer.enable_progress_bar=false"]
_LATENT_DAPS_FEWER = ["data.num_images=2", "solver.num_levels=5", "solver.mcmc_steps=4",
                      "++trainer.enable_progress_bar=false"]
TINY_BY_NAME.update({p.stem: _RESAMPLE_FEWER for p in (CONF / "experiment").glob("resample_*_tiny.yaml")})
TINY_BY_NAME.update({p.stem: _LATENT_DAPS_FEWER for p in (CONF / "experiment").glob("latent_daps_*_tiny.yaml")})
# paper-scale training configs (GPU trainer) without a <name>_tiny file -> the tiny experiment that stands for them
PAPER_TRAINING = {"autoencoder_vq_f4": "autoencoder_tiny", "autoencoder_vq_f4_finetune": "autoencoder_tiny",
                  "ldm_ffhq": "ldm_tiny", "ldm_custom": "ldm_tiny"}


def _has_tiny_variant(name: str) -> bool:
    return (CONF / "experiment" / f"{name}_tiny.yaml").exists() or name in PAPER_TRAINING


def _tiny_overrides(name: str, kind: str) -> list[str]:
    """Overrides that make an experiment tiny: TINY_BY_NAME's; else none for an experiment that is a tiny variant
    itself or has one (the paper-scale one is checked without running); otherwise by task type."""
    if name in TINY_BY_NAME:
        return TINY_BY_NAME[name]
    if name.endswith("_tiny") or _has_tiny_variant(name):
        return []
    return TINY[kind]


def _compose_experiment(name: str, tmp_path: Path, extra: tuple[str, ...] = ()):
    """(entry point, config): experiments belong to whichever entry point they compose with; tiny by task type."""
    errors = []
    for entry in ("evaluate", "train"):
        try:
            base = compose(entry, [f"experiment={name}", f"paths.output_dir={tmp_path}"])
        except ConfigCompositionException as err:
            errors.append(f"{entry}: {err}")
            continue
        kind = base.task._target_.rsplit(".", 1)[-1] if entry == "evaluate" else "train"
        extra = (*extra, "task.sigmas_y=[0.1]") if name == "gmm_tmpd" else extra
        overrides = [f"experiment={name}", f"paths.output_dir={tmp_path}", *_tiny_overrides(name, kind), *extra]
        return entry, compose(entry, overrides)
    pytest.fail(f"experiment {name} composes with no entry point: {errors}")


def _sampler_inits(cfg) -> dict[str, list[str]]:
    """Expected table label -> inits of a GMM benchmark config: the label, else the solver function's name."""
    from hydra.utils import get_object

    out = {}
    for key, spec in cfg.task.samplers.items():
        target = spec.solver._target_
        label = spec.get("name") or (get_object(target).__name__ if key == "solver" else key)
        out[label] = list(spec.inits)
    return out


def _tiny_kernel_wizard(tmp_path: Path, network) -> Path:
    """A random-weights KernelWizard file of the width ``network`` (the nonlinear-blur operator's weights)."""
    import torch

    from diffinv_pl.operators.nonlinear_blur import KernelWizard

    torch.manual_seed(0)
    path = tmp_path / "weights" / "GOPRO_wVAE_tiny.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(KernelWizard(**network).state_dict(), path)
    return path


def _needs_kernel_wizard(name: str) -> bool:
    return name.startswith(("daps_nonlinear_deblur", "dps_nonlinear_deblur"))


# the fix each prior loader's missing-file error names, by prior target
PRIOR_FIXES = {
    "diffinv_pl.priors.checkpoints.trained_prior": ("prior.path=", "train.py"),
    "diffinv_pl.priors.edm_pickle.converted_padis_prior": ("edm_pickle convert", "prior.path="),
    "diffinv_pl.priors.latent.ldm_official_prior": ("compvis convert", "weights/ldm_ffhq", "prior.path="),
    "diffinv_pl.priors.adm.adm_prior": ("ffhq_10m.pt", "DPS README", "prior.path=", "docs/checkpoints_adm.md"),
}


def _check_refuses_without_checkpoint(name: str, tmp_path: Path) -> None:
    """A paper-scale experiment, with an empty data dir, stops with one UserFileError naming its prior's path
    (cfg.prior.path, under paths.data_dir) and how to get that file, before anything is written to the output dir."""
    from diffinv_pl.cli import run_evaluation

    data_dir, out = tmp_path / "data", tmp_path / "out"
    data_dir.mkdir()
    extra = [f"paths.data_dir={data_dir}"]
    if _needs_kernel_wizard(name):  # the operator is built first: give it (small random) weights to get to the prior
        network = {"nf": 4, "front_blocks": 1, "back_blocks": 2, "kernel_dim": 32, "extractor_blocks": 1, "tail_nf": 8}
        path = _tiny_kernel_wizard(tmp_path, network)
        extra += [f"operator.weights_path={path}", "operator.network=" + str(network).replace("'", "").replace(" ", "")]
    cfg = compose("evaluate", [f"experiment={name}", f"paths.output_dir={out}", *extra])
    expected = str(cfg.prior.path)
    assert expected.startswith(str(data_dir)), f"{name}: prior.path {expected} is not under paths.data_dir"
    with pytest.raises(Exception) as info:
        run_evaluation(cfg)
    err = find_user_error(info.value)
    assert isinstance(err, UserFileError), f"expected a UserFileError, got {info.value!r}"
    assert expected in str(err) and all(fix in str(err) for fix in PRIOR_FIXES[cfg.prior._target_]), str(err)
    assert not out.exists() or not any(out.iterdir()), f"{name} wrote {sorted(out.iterdir())} before refusing"


def _needs_ct_demo_priors(name: str) -> bool:
    """The CT demo and the PaDIS experiments' tiny variants run with the CT demo's priors
    (conf/prior/ct_demo_{patch,whole}.yaml)."""
    return name == "ct_demo" or (name.startswith("padis_") and name.endswith("_tiny") and name != "padis_ct_tiny")


@pytest.fixture(scope="module")
def ct_demo_data_dir(tmp_path_factory) -> Path:
    """A paths.data_dir holding weights/ct_demo_{patch,whole}_prior.ckpt: the CT demo's two priors trained for 2
    batches (about 2 s on one core; what the demo writes there after its full training)."""
    import shutil

    from diffinv_pl.training import run_training

    root = tmp_path_factory.mktemp("ct_demo")
    (root / "data" / "weights").mkdir(parents=True)
    for kind in ("patch", "whole"):
        out = root / f"train_{kind}"
        run_training(compose("train", [
            f"experiment=ct_demo_{kind}_prior", f"paths.output_dir={out}", "trainer.max_epochs=1",
            "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=0", "++trainer.enable_progress_bar=false",
            "++trainer.enable_model_summary=false",
        ]))
        shutil.copy(out / "checkpoints" / "last.ckpt", root / "data" / "weights" / f"ct_demo_{kind}_prior.ckpt")
    return root / "data"


def _needs_latent_tiny_prior(name: str) -> bool:
    """The tiny latent experiments (training on the tiny autoencoder or its latents, solving with the tiny latent
    prior) run with latent_tiny_data_dir as paths.data_dir."""
    return name in ("ldm_tiny", "ldm_latents_tiny") or (
        name.startswith(("resample_", "latent_daps_")) and name.endswith("_tiny"))


def _write_images(folder: Path, count: int, size: int, mode: str) -> Path:
    """``count`` random ``size``^2 PNG images (``mode`` L or RGB) in ``folder``."""
    import torch
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for i in range(count):
        Image.fromarray((torch.rand(shape, generator=g) * 255).to(torch.uint8).numpy(), mode=mode).save(
            folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def latent_tiny_data_dir(tmp_path_factory) -> Path:
    """A paths.data_dir holding weights/autoencoder_tiny and weights/ldm_tiny (each trained for 2 batches with
    run_training, as the tiny latent experiments' comments tell the user to train them) and latents/ldm_tiny (8 random
    32^2 grayscale images encoded by that autoencoder, data_prep/encode_latents.py); a few seconds on one core."""
    from data_prep.encode_latents import encode_folder
    from diffinv_pl.training import run_training

    root = tmp_path_factory.mktemp("latent_tiny")
    data = root / "data"
    for name in ("autoencoder_tiny", "ldm_tiny"):
        run_training(compose("train", [f"experiment={name}", f"paths.output_dir={data / 'weights' / name}",
                                       f"paths.data_dir={data}", *_TWO_BATCHES]))
    encode_folder(data / "weights" / "autoencoder_tiny" / "checkpoints" / "last.ckpt",
                  _write_images(root / "images", 8, 32, "L"), data / "latents" / "ldm_tiny", mode="L")
    return data


def _paper_training_overrides(name: str, tmp_path: Path, request) -> tuple[str, ...]:
    """What a paper-scale training config needs to build its model and data module here: an image folder, and the
    pretrained autoencoder (fine-tuning: a VQ-f4 RGB diffusers folder of the paper architecture, random weights)."""
    extra = [f"data.train.root={_write_images(tmp_path / 'images', 2, 32, 'RGB')}"]
    if name == "autoencoder_vq_f4_finetune":
        from hydra.utils import instantiate

        base = compose("train", ["experiment=autoencoder_vq_f4", f"paths.output_dir={tmp_path / 'base'}"])
        folder = tmp_path / "vq_f4_rgb"
        instantiate(base.model).autoencoder.model.save_pretrained(str(folder))
        extra.append(f"model.init_from={folder}")
    if name in ("ldm_ffhq", "ldm_custom"):
        ae = request.getfixturevalue("latent_tiny_data_dir") / "weights" / "autoencoder_tiny" / "checkpoints"
        extra.append(f"model.autoencoder={ae / 'last.ckpt'}")
    return tuple(extra)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_in_a_tiny_cpu_variant(name, tmp_path, request):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_"), f"{name}.yaml must start with '# @package _global_'"
    extra: tuple[str, ...] = ()
    if name.endswith("_tiny") and _needs_kernel_wizard(name):
        network = compose("evaluate", [f"experiment={name}", f"paths.output_dir={tmp_path}"]).operator.network
        extra = (f"operator.weights_path={_tiny_kernel_wizard(tmp_path, dict(network))}",)
    if _needs_ct_demo_priors(name):
        extra = (f"paths.data_dir={request.getfixturevalue('ct_demo_data_dir')}",)
    if _needs_latent_tiny_prior(name):
        extra = (f"paths.data_dir={request.getfixturevalue('latent_tiny_data_dir')}",)
    if name in PAPER_TRAINING:
        assert PAPER_TRAINING[name] in EXPERIMENTS
        extra = _paper_training_overrides(name, tmp_path, request)
    entry, cfg = _compose_experiment(name, tmp_path / "out", extra)
    if entry == "evaluate" and _has_tiny_variant(name):
        # paper-scale image experiment: its tiny CPU variant <name>_tiny runs as its own case; this one must refuse
        # cleanly without its checkpoint (its paper numbers: test_paper_image_experiments_hold_the_paper_numbers,
        # tests/test_padis_experiments.py)
        _check_refuses_without_checkpoint(name, tmp_path)
    elif entry == "evaluate":
        from diffinv_pl.cli import run_evaluation

        table = run_evaluation(cfg)
        if "sw1" in table[0]:
            # one row per configured (sampler, init), labelled by the solver that ran, every number finite
            runs = {(row["sampler"], row["init"]) for row in table}
            assert runs == {(label, init) for label, inits in _sampler_inits(cfg).items() for init in inits}
            assert all(math.isfinite(row[k]) for row in table for k in ("sw1", "floor_sw1", "mode_tv"))
            assert (tmp_path / "out" / "table.md").exists() and (tmp_path / "out" / "per_problem.csv").exists()
        else:
            assert table[0]["num_samples"] == 2 and math.isfinite(table[0]["psnr"]) and table[0]["psnr"] > 0
            assert (tmp_path / "out" / "results.md").exists()
            if cfg.solver._target_ == "diffinv_pl.solvers.padis_dps":
                # num_levels x inner_steps denoiser calls per batch, the batch's calls divided among its samples
                batches = math.ceil(cfg.data.num_images / cfg.datamodule.batch_size)
                calls = cfg.solver.num_levels * cfg.solver.inner_steps * batches / cfg.data.num_images
                assert table[0]["denoiser_calls"] == calls and calls > 0
    elif _has_tiny_variant(name):
        # paper-scale training config (GPU trainer): its tiny CPU variant <name>_tiny runs as its own case; here the
        # paper-scale model and data module are built and checked without training
        from hydra.utils import instantiate

        from diffinv_pl.latent_pipeline import stage_configs

        assert cfg.trainer.accelerator == "gpu"
        # two-stage configs (ldm_custom): the autoencoder stage's model, then the latent model on the tiny autoencoder
        models = [stage_configs(cfg)[0].model, cfg.model] if "stages" in cfg else [cfg.model]
        for model_cfg in models:
            model = instantiate(model_cfg)
            assert sum(p.numel() for p in model.parameters()) > 10_000_000
        assert instantiate(cfg.data).batch_size == cfg.data.batch_size
    else:
        from diffinv_pl.training import run_training

        metrics = run_training(cfg)
        assert metrics and all(math.isfinite(float(v)) for v in metrics.values()), metrics


# ------------------------------------------------------------------------------ paper numbers of the image experiments
# methods.md §5.3: DAPS-1K pixel sampler edm_daps, and the Langevin (L, lr, lr_min_ratio) of each DAPS task.
DAPS_SAMPLER = {"num_levels": 200, "sigma_max": 100.0, "sigma_min": 0.1, "ode_steps": 5, "sigma_ode_min": 0.01,
                "tau": 0.01, "mcmc": "langevin", "annealing": "main", "likelihood": "main", "rho": 7.0}
DAPS_LANGEVIN = {"phase_retrieval": (100, 5e-5, 0.01), "down_sampling": (100, 1e-4, 0.01),
                 "inpainting": (100, 5e-5, 0.01), "inpainting_rand": (100, 1e-4, 0.01),
                 "gaussian_blur": (100, 1e-4, 0.01), "motion_blur": (100, 5e-5, 0.01),
                 "nonlinear_blur": (200, 1e-5, 0.01), "hdr": (100, 2e-5, 0.01)}
# methods.md §5.4: experiment -> (DAPS task, operator parameters)
DAPS_TASKS = {
    "daps_phase_retrieval": ("phase_retrieval",
                             {"name": "phase_retrieval", "oversample": 2.0, "input_range": [0.0, 1.0]}),
    "daps_sr4": ("down_sampling", {"name": "sr_bicubic", "factor": 4}),
    "daps_box_inpaint": ("inpainting", {"name": "inpainting_box", "box_size": 128, "margin": 32}),
    "daps_random_inpaint": ("inpainting_rand", {"name": "inpainting_random", "drop_range": [0.7, 0.71]}),
    "daps_gaussian_deblur": ("gaussian_blur", {"name": "gaussian_blur", "kernel_size": 61, "std": 3.0}),
    "daps_motion_deblur": ("motion_blur", {"name": "motion_blur", "kernel_size": 61, "intensity": 0.5}),
    "daps_nonlinear_deblur": ("nonlinear_blur", {"name": "nonlinear_blur", "kernel_seed": 0, "kernel_std": 1.2,
                                                 "network": None}),
    "daps_hdr": ("hdr", {"name": "hdr", "scale": 2.0}),
}
# methods.md §6.3 FFHQ rows: (scale, t_div, div_ratio, inv_var); §6.4 operators (circular blurs, SR = blur + stride)
CODPS_FFHQ = {
    "codps_gaussian_deblur": (0.01, 200, 10.0, 0.1), "codps_motion_deblur": (0.01, 200, 10.0, 0.1),
    "codps_sr4": (0.01, 100, 10.0, 0.1), "codps_random_inpaint": (0.4, 80, 1000.0, 500.0),
    "codps_plus_gaussian_deblur": (0.05, 15, 10.0, 1.0), "codps_plus_motion_deblur": (0.05, 15, 20.0, 1.0),
    "codps_plus_sr4": (0.05, 15, 5.0, 2.0), "codps_plus_random_inpaint": (0.4, 10, 100.0, 0.0),
}
CODPS_OPERATORS = {
    "gaussian_deblur": {"name": "gaussian_blur_circular", "kernel_size": 61, "std": 3.0, "boundary": "circular"},
    "motion_deblur": {"name": "motion_blur", "kernel_size": 61, "intensity": 0.5, "boundary": "circular"},
    "sr4": {"name": "sr_blur_stride", "factor": 4, "kernel_size": 9, "std": 3.0},
    "random_inpaint": {"name": "inpainting_random", "drop_range": [0.7, 0.8]},
}
PAPER_IMAGE_EXPERIMENTS = sorted([*DAPS_TASKS, *CODPS_FFHQ])


def test_every_image_experiment_has_its_paper_numbers_checked():
    image = {n for n in EXPERIMENTS if n.startswith(("daps_", "codps_")) and not n.endswith("_tiny")}
    assert image == set(PAPER_IMAGE_EXPERIMENTS)
    assert all(_has_tiny_variant(n) for n in PAPER_IMAGE_EXPERIMENTS)


@pytest.mark.parametrize("name", PAPER_IMAGE_EXPERIMENTS)
def test_paper_image_experiments_hold_the_paper_numbers(name, tmp_path):
    from omegaconf import OmegaConf

    cfg = compose("evaluate", [f"experiment={name}", f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path}"])
    solver = OmegaConf.to_container(cfg.solver, resolve=False)
    operator = OmegaConf.to_container(cfg.operator, resolve=True)
    # FFHQ-256 RGB on [-1, 1] (phase retrieval: DAPS's [0, 1]), sigma_y 0.05, the public ffhq_10m.pt the papers use:
    # DAPS calls it with the continuous VP time of its wrapper, CoDPS (DPS code) with the discrete DDPM index
    assert cfg.task._target_.endswith("ReconstructionTask") and cfg.task.sigma_y == 0.05 and cfg.task_name == name
    assert operator["image_size"] == 256 and operator["channels"] == 3
    assert cfg.data._target_.endswith("ImageFolderDataset") and cfg.data.image_size == 256 and cfg.data.mode == "RGB"
    assert cfg.prior._target_ == "diffinv_pl.priors.adm.adm_prior" and cfg.prior.config == "ffhq"
    assert cfg.prior.path == f"{tmp_path}/weights/ffhq_10m.pt"
    assert cfg.prior.time_map == ("vp" if name.startswith("daps_") else "ddpm")
    if name in DAPS_TASKS:
        task, op = DAPS_TASKS[name]
        assert solver["_target_"] == "diffinv_pl.solvers.daps"
        assert {k: v for k, v in operator.items() if k in op} == op
        L, lr, ratio = DAPS_LANGEVIN[task]
        if name == "daps_phase_retrieval":
            # the state is the [0, 1] image u = (x + 1) / 2: every sigma halved, the step size divided by 4 (the
            # config's comment derives it), 4 runs
            expected = {**DAPS_SAMPLER, "sigma_max": 50.0, "sigma_min": 0.05, "sigma_ode_min": 0.005, "task": None,
                        "mcmc_steps": L, "lr": lr / 4, "lr_min_ratio": ratio}
            assert cfg.task.num_runs == 4 and list(cfg.prior.data_range) == [0.0, 1.0]
        else:
            from diffinv_pl.solvers.daps import PIXEL_LANGEVIN

            expected = {**DAPS_SAMPLER, "task": task}
            assert PIXEL_LANGEVIN[task] == (L, lr, ratio)
            assert cfg.task.num_runs == 1 and list(cfg.prior.data_range) == [-1.0, 1.0]
    else:
        plus = name.startswith("codps_plus_")
        task = name.removeprefix("codps_plus_" if plus else "codps_")
        scale, t_div, div_ratio, inv_var = CODPS_FFHQ[name]
        assert solver["_target_"] == ("diffinv_pl.solvers.codps_plus" if plus else "diffinv_pl.solvers.codps")
        expected = {"scale": scale, "t_div": t_div, "div_ratio": div_ratio, "inv_var": inv_var, "eta": 1.0,
                    "schedule": "constant", "clip_denoised": [-1.0, 1.0], "gram_solver": "exact"}
        op = CODPS_OPERATORS[task]
        assert {k: v for k, v in operator.items() if k in op} == op
        assert cfg.sampling_grid._target_.endswith("vp_grid") and cfg.sampling_grid.beta_schedule == "linear"
        assert cfg.sampling_grid.num_train_steps == 1000
        assert str(cfg.sampling_grid.num_steps) == ("ddim100" if plus else "1000")
        assert list(cfg.prior.data_range) == [-1.0, 1.0]
    assert {k: solver[k] for k in expected} == expected


def test_unknown_experiment_and_solver_names_list_the_valid_ones(tmp_path):
    with pytest.raises(MissingConfigException) as err:
        compose("evaluate", ["experiment=nope", f"paths.output_dir={tmp_path}"])
    assert "gmm_dps" in str(err.value)
    with pytest.raises(MissingConfigException) as err:
        compose("evaluate", ["solver=nope", f"paths.output_dir={tmp_path}"])
    assert "dps" in str(err.value) and "oracle" in str(err.value)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_prints_the_resolved_config(tmp_path):
    out = _run([str(REPO / "evaluate.py"), "--cfg", "job", "experiment=gmm_dps"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "zeta: 0.1" in out.stdout and "dims:\n  - 8" in out.stdout


def test_cli_runs_one_cell_and_logs_to_wandb_offline(tmp_path):
    out = _run(
        [str(REPO / "evaluate.py"), "experiment=gmm_dps", "logger=wandb", f"paths.output_dir={tmp_path}", *TINY["GMMPosteriorBenchmark"]],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| 8 | 1 | drawn | dps | gaussian |" in out.stdout
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run directory was created"
    assert any(f.suffix == ".wandb" for f in runs[0].iterdir())


def test_cli_bad_value_fails_with_a_clear_message(tmp_path):
    out = _run([str(REPO / "evaluate.py"), "experiment=gmm_dps", "task.dims=[7]", f"paths.output_dir={tmp_path}"], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("error:") and "dx must be even" in line]


def test_a_whole_image_checkpoint_for_a_patch_prior_config_is_one_clear_error(ct_demo_data_dir, tmp_path):
    """prior=ct_demo_patch expects the patch convention (64 px, pad 16): the demo's whole-image checkpoint is refused
    with a UserError naming both fixes, before anything is written."""
    from diffinv_pl.cli import run_evaluation

    whole = ct_demo_data_dir / "weights" / "ct_demo_whole_prior.ckpt"
    cfg = compose("evaluate", ["experiment=ct_demo", f"paths.output_dir={tmp_path / 'out'}", f"prior.path={whole}",
                               *TINY_BY_NAME["ct_demo"]])
    with pytest.raises(Exception) as info:
        run_evaluation(cfg)
    err = find_user_error(info.value)
    assert err is not None and "whole-image model" in str(err) and str(whole) in str(err)
    assert "expected_convention" in str(err) and "pad_width" in str(err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
