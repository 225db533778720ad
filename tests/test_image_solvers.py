"""Acceptance: through evaluate.py's path (the composed config run by ``diffinv_pl.cli.run_evaluation``), DAPS, CoDPS
and CoDPS+ with the tiny analytic image prior (conf/prior/stationary_gaussian.yaml) beat the pseudo-inverse baseline
on random inpainting: the same 4 sample photographs (32x32 RGB), the same per-sample masks (70 % of the pixels
dropped) and the same measurement noise (sigma_y 0.05 on [-1, 1]), on CPU in a few seconds.

The pseudo-inverse keeps the observed pixels and leaves the dropped ones at 0 (mid-grey); the diffusion solvers fill
them in from the stationary Gaussian prior (smooth, correlated channels)."""

from __future__ import annotations

import pytest

from conftest import compose

# the shared problem: every run gets exactly these overrides
PROBLEM = ["operator.drop_range=[0.7,0.7]", "operator.image_size=32", "data.num_images=4", "task.sigma_y=0.05",
           "seed=0", "++trainer.enable_progress_bar=false", "task.solver_progress=false"]
# experiment -> mean PSNR (dB) over the 4 images measured on CPU: the tiny variants as configured (DAPS K 10, S 2,
# L 10; CoDPS 50 DDPM steps; CoDPS+ 20 DDIM steps; the FFHQ inpainting hyperparameters otherwise)
SOLVERS = {
    "daps_random_inpaint_tiny": 16.28,
    "codps_random_inpaint_tiny": 18.09,
    "codps_plus_random_inpaint_tiny": 18.45,
}
PINV_PSNR = 13.54
TOLERANCE = 0.5  # dB: float32 summation order across machines
MARGIN = 2.0  # dB that every diffusion solver must gain over the pseudo-inverse


def _run(overrides: list[str], out) -> tuple[float, object]:
    from diffinv_pl.cli import run_evaluation

    cfg = compose("evaluate", [*overrides, f"paths.output_dir={out}", *PROBLEM])
    table = run_evaluation(cfg)
    assert table[0]["num_samples"] == 4 and (out / "results.md").exists()
    return float(table[0]["psnr"]), cfg


@pytest.fixture(scope="module")
def pinv(tmp_path_factory):
    base = ["task=reconstruction", "solver=pinv", "operator=inpainting_random", "data=sample_images"]
    return _run(base, tmp_path_factory.mktemp("pinv"))


@pytest.mark.parametrize("experiment", list(SOLVERS))
def test_diffusion_solvers_beat_the_pseudo_inverse_on_random_inpainting(experiment, pinv, tmp_path):
    pinv_psnr, pinv_cfg = pinv
    psnr, cfg = _run([f"experiment={experiment}"], tmp_path)
    print(f"{experiment}: PSNR {psnr:.2f} dB, pinv {pinv_psnr:.2f} dB")
    # the same problem: operator (mask distribution), images, noise level and seed
    assert cfg.operator == pinv_cfg.operator and cfg.data == pinv_cfg.data
    assert cfg.task.sigma_y == pinv_cfg.task.sigma_y and cfg.seed == pinv_cfg.seed
    assert cfg.prior._target_.endswith("StationaryGaussianPrior")
    assert pinv_psnr == pytest.approx(PINV_PSNR, abs=TOLERANCE)
    assert psnr == pytest.approx(SOLVERS[experiment], abs=TOLERANCE)
    assert psnr > pinv_psnr + MARGIN


@pytest.mark.parametrize(
    "experiment, overrides, match",
    [
        ("codps_sr4_tiny", ["operator=hdr", "operator.image_size=32"], "nonlinear"),
        ("codps_plus_sr4_tiny", ["operator=gaussian_blur", "operator.image_size=32", "operator.kernel_size=9"],
         "reflect-padded"),
        ("codps_sr4_tiny", ["operator=uniform_blur", "operator.image_size=32", "operator.kernel_size=9"], "Gram|reflect"),
        ("codps_sr4_tiny", ["solver.scale=-1"], "scale >= 0"),
        ("daps_sr4_tiny", ["solver.tau=0"], "tau must be > 0"),
        ("daps_sr4_tiny", ["solver.tau=-0.01"], "tau must be > 0"),
        ("daps_sr4_tiny", ["solver.sigma_min=200"], "sigma_min < sigma_max"),
        ("daps_sr4_tiny", ["solver.sigma_min=100"], "sigma_min < sigma_max"),
        ("daps_hdr_tiny", ["solver.lr_relative=true"], "lr_relative needs a linear operator"),
    ],
)
def test_bad_solver_input_is_refused_before_anything_is_written(experiment, overrides, match, tmp_path):
    """Through evaluate's path: the solver's own hyperparameter check runs in the task's set-up, so the error comes
    before any data is read or file written (not at the first batch)."""
    import re

    from diffinv_pl.cli import run_evaluation
    from diffinv_pl.errors import find_user_error

    out = tmp_path / "out"
    cfg = compose("evaluate", [f"experiment={experiment}", f"paths.output_dir={out}", *overrides])
    with pytest.raises(Exception) as err:  # Hydra wraps errors raised while instantiating the task
        run_evaluation(cfg)
    user = find_user_error(err.value)
    assert user is not None and re.search(match, str(user)), err.value
    assert not out.exists() or not any(out.iterdir())
