"""Every conf/operator/* composes and instantiates the registered operator with the seeds' defaults."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from conftest import CONF, compose
from diffinv_pl.operators import OPERATORS

NAMES = sorted(p.stem for p in (CONF / "operator").glob("*.yaml"))


def test_every_registered_operator_has_a_config():
    assert set(NAMES) == set(OPERATORS)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "nonlinear_blur"])
def test_operator_config_instantiates(name, tmp_path):
    cfg = compose("evaluate", [f"operator={name}", f"paths.output_dir={tmp_path}"])
    op = instantiate(cfg.operator)
    assert op.in_shape[-2:] == (256, 256)
    assert op.input_range == ((0.0, 1.0) if name.startswith("ct_") or name == "uniform_blur" else (-1.0, 1.0))


def test_nonlinear_blur_config_names_the_missing_weights_file(tmp_path):
    cfg = compose("evaluate", ["operator=nonlinear_blur", f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path}"])
    with pytest.raises(Exception, match="GOPRO_wVAE.pth") as err:
        instantiate(cfg.operator)
    assert "operator.weights_path" in str(err.value)
