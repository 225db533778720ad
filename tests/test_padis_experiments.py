"""The PaDIS evaluation experiments (conf/experiment/padis_*.yaml, methods.md §3.4-3.7, §0.5) hold PaDIS's settings:
operator, measurement noise, solver constants, data and prior; each `_whole` counterpart differs from its patch
experiment only in the prior; every experiment has its whole and tiny companions. (That the tiny variants run and the
paper-scale ones refuse without their checkpoint: tests/test_experiments.py.)"""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF, compose

# PaDIS's 256x256 grayscale [0, 1] images: every operator gets these
IMAGE = {"image_size": 256, "input_range": [0.0, 1.0]}
CT = {"impl": "auto", "fbp_filter": "Hann", **IMAGE}
# experiment -> (operator parameters, sigma_y)
PADIS = {
    "padis_ct_20views": ({"name": "ct_parallel", "geometry": "parallel", "num_views": 20,
                          "fbp_frequency_scaling": 0.9, **CT}, 0.0),
    "padis_ct_8views": ({"name": "ct_parallel", "geometry": "parallel", "num_views": 8,
                         "fbp_frequency_scaling": 0.9, **CT}, 0.0),
    "padis_ct_60views": ({"name": "ct_parallel", "geometry": "parallel", "num_views": 60,
                          "fbp_frequency_scaling": 0.9, **CT}, 0.0),
    "padis_ct_fan180": ({"name": "ct_fan", "geometry": "fan", "num_views": 180, "src_radius": 40.0,
                         "det_radius": 40.0, "fbp_frequency_scaling": 0.3, **CT}, 0.0),
    "padis_ct_limited120": ({"name": "ct_limited_angle", "geometry": "limited_angle", "num_views": 60,
                             "angle_range_deg": 120.0, "fbp_frequency_scaling": 0.9, **CT}, 0.0),
    "padis_deblur_gaussian": ({"name": "gaussian_blur", "kernel_size": 61, "std": 3.0, "boundary": "reflect",
                               "channels": 1, **IMAGE}, 0.01),
    "padis_deblur_uniform": ({"name": "uniform_blur", "kernel_size": 17, "boundary": "reflect", "channels": 1,
                              **IMAGE}, 0.01),
    "padis_sr": ({"name": "sr_bicubic", "factor": 2, "channels": 1, **IMAGE}, 0.01),
}
# conf/solver/padis_dps.yaml: the README's 20-view CT settings (methods.md §3.4)
SOLVER = {"_target_": "diffinv_pl.solvers.padis_dps", "_partial_": True, "num_levels": 100, "sigma_max": 10.0,
          "sigma_min": 0.003, "rho": 7.0, "inner_steps": 10, "zeta": 0.3, "langevin_scale": 0.5, "init": "pinv",
          "clamp": True}
PAPER = sorted([*PADIS, *(f"{n}_whole" for n in PADIS)])


def _compose(name: str, tmp_path):
    return compose("evaluate", [f"experiment={name}", f"paths.output_dir={tmp_path}/out",
                                f"paths.data_dir={tmp_path}/data"])


@pytest.mark.parametrize("name", PAPER)
def test_padis_experiments_hold_the_paper_settings(name, tmp_path):
    cfg = _compose(name, tmp_path)
    whole = name.endswith("_whole")
    op, sigma_y = PADIS[name.removesuffix("_whole")]
    operator = OmegaConf.to_container(cfg.operator, resolve=True)
    assert cfg.task_name == name and cfg.task._target_.endswith("ReconstructionTask")
    assert cfg.task.sigma_y == sigma_y and cfg.task.num_runs == 1
    # every key of the operator, so that nothing else (e.g. num_detectors, a kernel size) sneaks in
    assert operator == {"_target_": "diffinv_pl.operators.build_operator", **op}
    assert OmegaConf.to_container(cfg.solver, resolve=True) == SOLVER
    assert cfg.data._target_ == "diffinv_pl.data.images.ImageFolderDataset"
    assert cfg.data.root == f"{tmp_path}/data/ct_test" and cfg.data.mode == "L" and cfg.data.image_size == 256
    assert cfg.data.corrupt == "fail" and cfg.data.manifest is None
    if whole:  # the whole-image DDPM++ prior of `train.py experiment=edm_ct`
        assert cfg.prior._target_ == "diffinv_pl.priors.checkpoints.trained_prior"
        assert cfg.prior.path == f"{tmp_path}/data/weights/ct256_whole_prior.ckpt"
        assert cfg.prior.expected_channels == 1 and cfg.prior.data_range is None and cfg.prior.use_ema
    else:  # the converted official PaDIS network, its training range [0, 1]
        assert cfg.prior._target_ == "diffinv_pl.priors.edm_pickle.converted_padis_prior"
        assert cfg.prior.path == f"{tmp_path}/data/weights/padis_ct" and cfg.prior.data_range is None


@pytest.mark.parametrize("name", sorted(PADIS))
def test_whole_counterpart_differs_only_in_the_prior(name, tmp_path):
    def rest(experiment):
        cfg = OmegaConf.to_container(_compose(experiment, tmp_path), resolve=True)
        assert cfg["task"].pop("prior") == cfg["prior"]  # the task's prior is the prior group's
        return {k: v for k, v in cfg.items() if k not in ("prior", "task_name")}, cfg["prior"]

    patch, patch_prior = rest(name)
    whole, whole_prior = rest(f"{name}_whole")
    assert patch == whole and patch_prior != whole_prior


def _evaluation_experiments() -> list[str]:
    """padis_* experiments of evaluate.py (padis_ct and padis_ct_tiny are train.py's)."""
    names = []
    for path in sorted((CONF / "experiment").glob("padis_*.yaml")):
        try:
            compose("evaluate", [f"experiment={path.stem}", "paths.output_dir=unused"])
        except ConfigCompositionException:
            continue
        names.append(path.stem)
    return names


def test_every_padis_experiment_has_its_whole_and_tiny_companions():
    names = set(_evaluation_experiments())
    base = {n for n in names if not n.endswith(("_whole", "_tiny"))}
    assert base == set(PADIS)
    assert names == {f"{n}{suffix}" for n in base for suffix in ("", "_whole", "_tiny", "_whole_tiny")}


@pytest.mark.parametrize("name", sorted(PADIS))
def test_tiny_variants_keep_the_operator_noise_and_solver_constants(name, tmp_path):
    """The tiny variants change only the scale (64 px phantoms, 128 detector bins, 10 x 2 solver steps) and the prior
    (the CT demo's)."""
    paper = _compose(name, tmp_path)
    for whole in (False, True):
        cfg = _compose(f"{name}{'_whole' if whole else ''}_tiny", tmp_path)
        assert cfg.task.sigma_y == paper.task.sigma_y
        assert cfg.data._target_ == "diffinv_pl.data.phantoms.CTPhantomDataset" and cfg.data.kind == "textured"
        assert cfg.data.size == 64 and cfg.data.num_images == 2 and "root" not in cfg.data
        tiny_op = {"image_size": 64, **({"num_detectors": 128} if name.startswith("padis_ct") else {})}
        assert OmegaConf.to_container(cfg.operator) == {**OmegaConf.to_container(paper.operator), **tiny_op}
        solver = {**OmegaConf.to_container(paper.solver), "num_levels": 10, "inner_steps": 2}
        assert OmegaConf.to_container(cfg.solver) == solver
        assert cfg.prior.path == f"{tmp_path}/data/weights/ct_demo_{'whole' if whole else 'patch'}_prior.ckpt"


def test_a_missing_test_image_folder_is_a_user_error_naming_it(tmp_path):
    from hydra.utils import instantiate

    from diffinv_pl.errors import UserFileError, find_user_error

    cfg = _compose("padis_ct_20views", tmp_path)
    with pytest.raises(Exception) as info:
        instantiate(cfg.data)
    err = find_user_error(info.value)
    assert isinstance(err, UserFileError) and f"{tmp_path}/data/ct_test" in str(err)
