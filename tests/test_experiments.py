"""Every conf/experiment/* composes with the real configs and runs in a tiny CPU variant; CLI behaviour."""

from __future__ import annotations

import math

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from conftest import CONF, REPO, compose

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


def _compose_experiment(name: str, tmp_path: Path):
    """(entry point, config): experiments belong to whichever entry point they compose with; tiny by task type."""
    errors = []
    for entry in ("evaluate", "train"):
        try:
            base = compose(entry, [f"experiment={name}", f"paths.output_dir={tmp_path}"])
        except ConfigCompositionException as err:
            errors.append(f"{entry}: {err}")
            continue
        kind = base.task._target_.rsplit(".", 1)[-1] if entry == "evaluate" else "train"
        extra = ["task.sigmas_y=[0.1]"] if name == "gmm_tmpd" else []
        return entry, compose(entry, [f"experiment={name}", f"paths.output_dir={tmp_path}", *TINY[kind], *extra])
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


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_in_a_tiny_cpu_variant(name, tmp_path):
    entry, cfg = _compose_experiment(name, tmp_path)
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_"), f"{name}.yaml must start with '# @package _global_'"
    if entry == "evaluate":
        from diffinv_pl.cli import run_evaluation

        table = run_evaluation(cfg)
        if "sw1" in table[0]:
            # one row per configured (sampler, init), labelled by the solver that ran, every number finite
            runs = {(row["sampler"], row["init"]) for row in table}
            assert runs == {(label, init) for label, inits in _sampler_inits(cfg).items() for init in inits}
            assert all(math.isfinite(row[k]) for row in table for k in ("sw1", "floor_sw1", "mode_tv"))
            assert (tmp_path / "table.md").exists() and (tmp_path / "per_problem.csv").exists()
        else:
            assert table[0]["num_samples"] == 2 and table[0]["psnr"] > 0
            assert (tmp_path / "results.md").exists()
    elif (CONF / "experiment" / f"{name}_tiny.yaml").exists():
        # paper-scale training config (GPU trainer): its tiny CPU variant <name>_tiny runs as its own case; here the
        # paper-scale model and data module are built and checked without training
        from hydra.utils import instantiate

        model = instantiate(cfg.model)
        assert cfg.trainer.accelerator == "gpu"
        assert sum(p.numel() for p in model.parameters()) > 10_000_000
        assert instantiate(cfg.data).batch_size == cfg.data.batch_size
    else:
        from diffinv_pl.training import run_training

        metrics = run_training(cfg)
        assert metrics and all(math.isfinite(float(v)) for v in metrics.values()), metrics


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
