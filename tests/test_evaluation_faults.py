"""Evaluation under faults and bad input (issue 10): ranks without work, set-up checks before any write, one-line
errors at the entry point, per-sample locks for concurrent runs, and SIGKILL fault injection on 2 ranks."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from conftest import REPO, compose

from diffinv_pl.cli import run_evaluation
from diffinv_pl.data.evaluation import EvaluationDataModule
from diffinv_pl.data.phantoms import CTPhantomDataset
from diffinv_pl.errors import UserError
from diffinv_pl.metrics.image import ImageMetrics
from diffinv_pl.operators import build_operator
from diffinv_pl.solvers import tv_least_squares
from diffinv_pl.tasks.reconstruction import ReconstructionTask

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
BASE = ["experiment=ct_baselines", "data.size=32", "operator.image_size=32", "++trainer.enable_progress_bar=false",
        "task.solver_progress=false"]
CT = [*BASE, "+operator.num_detectors=48"]


def _cfg(out: Path, *extra: str):
    tv = [] if "solver=dps" in extra else ["solver.num_iterations=30"]
    ct = [] if any(e.startswith("operator=") for e in extra) else ["+operator.num_detectors=48"]
    return compose("evaluate", [*BASE, *ct, "data.num_images=2", *tv, f"paths.output_dir={out}", *extra])


def _task(out: Path) -> ReconstructionTask:
    return ReconstructionTask(
        solver=partial(tv_least_squares, lam=0.02, num_iterations=30),
        operator=build_operator("inpainting_random", image_size=32, channels=1, input_range=(0.0, 1.0)),
        metrics=ImageMetrics(), output_dir=out, settings={"test": "faults"}, solver_progress=False,
    )


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(**{"accelerator": "cpu", "devices": 1, "logger": False, "use_distributed_sampler": False,
                        "inference_mode": False, "enable_progress_bar": False, "enable_checkpointing": False,
                        "enable_model_summary": False, **kwargs})


def test_more_ranks_than_samples_every_rank_finishes(tmp_path):
    """3 ranks, 2 samples: the rank without work runs one placeholder step and joins the collectives."""
    out = tmp_path / "three"
    (row,) = run_evaluation(_cfg(out, "trainer=ddp_sim", "trainer.devices=3", "datamodule.batch_size=1"))
    assert row["num_samples"] == 2 and sorted(p.stem for p in (out / "rows").glob("*.json")) == ["phantom_00000", "phantom_00001"]


@pytest.mark.parametrize("override, message", [
    ("+solver.zetaa=1", "no hyperparameter\\(s\\) zetaa"),
    ("task.sigma_y=nan", "finite task.sigma_y"),
    ("solver=dps", "needs a prior"),
    ("operator=phase_retrieval", "needs a linear operator"),
    ("+operator.num_detector=48", "no parameter\\(s\\) num_detector"),
])
def test_setup_errors_come_before_any_write_and_never_block_the_corrected_run(tmp_path, override, message):
    out = tmp_path / "run"
    extra = [override] + (["operator.image_size=32", "operator.channels=1"] if "phase" in override else [])
    with pytest.raises(Exception) as info:
        run_evaluation(_cfg(out, *extra))
    assert isinstance(info.value, UserError) or isinstance(info.value.__cause__, UserError), info.value
    assert info.match(message)
    assert not out.exists() or not any(out.rglob("*.json")), "nothing may be written before the checks pass"
    (row,) = run_evaluation(_cfg(out))  # the corrected run into the same directory
    assert row["num_samples"] == 2


def test_gpu_trainer_without_a_gpu_is_refused_naming_the_cpu_trainers(tmp_path):
    with pytest.raises(UserError, match="trainer=cpu"):
        run_evaluation(_cfg(tmp_path / "gpu", "trainer=gpu"))
    assert not (tmp_path / "gpu").exists()


def test_unwritable_output_directory_is_refused_before_solving(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(Exception, match="cannot write to the output directory"):
        run_evaluation(_cfg(blocker / "run"))


def test_entry_point_prints_one_line_naming_the_fix(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *CT, "+solver.zetaa=1", f"paths.output_dir={out}",
                           f"hydra.run.dir={out}/hydra"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "zetaa" in errors[0] and "valid:" in errors[0]
    assert "Traceback" not in proc.stderr
    debug = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *CT, "+solver.zetaa=1", f"paths.output_dir={out}",
                            f"hydra.run.dir={out}/hydra"], cwd=tmp_path, env={**ENV, "HYDRA_FULL_ERROR": "1"},
                           capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_sample_locked_by_another_process_is_skipped_and_the_last_run_aggregates(tmp_path):
    out = tmp_path / "shared"
    data = EvaluationDataModule(CTPhantomDataset(3, seed=0, size=32), batch_size=1)
    lock_path = out / "locks" / "phantom_00001.lock"
    lock_path.parent.mkdir(parents=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "another process" is computing phantom_00001
    try:
        task = _task(out)
        _trainer().test(task, datamodule=data, verbose=False)
        assert sorted(p.stem for p in (out / "rows").glob("*.json")) == ["phantom_00000", "phantom_00002"]
        assert not (out / "results.json").exists() and task.summary == {}
    finally:
        os.close(fd)
    task = _task(out)
    _trainer().test(task, datamodule=data, verbose=False)  # the lock is free: the sample is computed, results written
    assert task.summary["num_samples"] == 3 and (out / "results.json").exists()


def _recons(out: Path) -> dict[str, np.ndarray]:
    return {p.parent.name: np.load(p) for p in sorted((out / "samples").glob("*/recon.npy"))}


def _cli(out: Path) -> subprocess.Popen:
    args = [*CT, "data.num_images=7", "solver.num_iterations=200", "datamodule.batch_size=1", "trainer=ddp_sim",
            f"paths.output_dir={out}", f"hydra.run.dir={out}/hydra"]
    return subprocess.Popen([sys.executable, str(REPO / "evaluate.py"), *args], cwd=out.parent, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_two_ranks_killed_three_times_and_resumed_equal_an_uninterrupted_run(tmp_path):
    """SIGKILL of the whole process group (both ranks) at three random points; each rerun resumes. The last kill
    leaves fewer samples than ranks. The final results are bitwise equal to an uninterrupted run."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    proc = _cli(reference)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-3000:]
    rng = random.Random(0)
    points = sorted(rng.sample(range(1, 6), 2)) + [6]  # rows finished when killed; 6 of 7 leaves 1 sample for 2 ranks
    for point in points:
        proc = _cli(killed)
        deadline = time.time() + 300
        while time.time() < deadline and len(list((killed / "rows").glob("*.json"))) < point and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (killed / "results.json").exists()
    proc = _cli(killed)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()[-3000:]
    ref, res = _recons(reference), _recons(killed)
    assert list(ref) == list(res) and len(ref) == 7
    assert all(np.array_equal(ref[k], res[k]) for k in ref)
    rows = lambda d: {p.stem: {k: v for k, v in json.loads(p.read_text()).items() if "time" not in k}  # noqa: E731
                      for p in (d / "rows").glob("*.json")}
    assert rows(reference) == rows(killed)
    summary = lambda d: json.loads((d / "results.json").read_text())["summary"]  # noqa: E731
    assert summary(reference)["psnr"] == summary(killed)["psnr"]
