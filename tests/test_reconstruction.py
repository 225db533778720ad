"""ReconstructionTask: exact per-key randomness, resume after a kill, 1 vs 2 ranks, outputs and bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from conftest import REPO
from diffinv_pl.data.evaluation import EvaluationDataModule
from diffinv_pl.data.phantoms import CTPhantomDataset
from diffinv_pl.metrics.image import ImageMetrics
from diffinv_pl.operators import build_operator
from diffinv_pl.solvers import tv_least_squares
from diffinv_pl.tasks.reconstruction import ReconstructionTask


def _trainer(**kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, use_distributed_sampler=False, inference_mode=False,
                   enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    return L.Trainer(**{**options, **kwargs})


def _task(out: Path, **kwargs) -> ReconstructionTask:
    defaults = dict(
        solver=partial(tv_least_squares, lam=0.02, num_iterations=200),
        operator=build_operator("inpainting_random", image_size=32, channels=1, drop_range=(0.3, 0.7), input_range=(0.0, 1.0)),
        metrics=ImageMetrics(),
        output_dir=out,
        sigma_y=0.05,
        settings={"test": "inpainting"},
        solver_progress=False,
    )
    return ReconstructionTask(**{**defaults, **kwargs})


def _run(out: Path, batch_size: int, dataset=None, trainer: L.Trainer | None = None, **kwargs) -> dict:
    """trainer.test of a ReconstructionTask on an EvaluationDataModule; returns the task's aggregate summary."""
    task = _task(out, **kwargs)
    data = EvaluationDataModule(dataset if dataset is not None else CTPhantomDataset(5, seed=0, size=32), batch_size)
    (trainer or _trainer()).test(task, datamodule=data, verbose=False)
    return task.summary


def _recons(out: Path) -> dict[str, np.ndarray]:
    return {p.parent.name: np.load(p) for p in sorted((out / "samples").glob("*/recon.npy"))}


def test_results_do_not_depend_on_batch_size_and_outputs_are_complete(tmp_path):
    """Masks and measurement noise come from per-key generators: batch 1 and batch 3 give identical results."""
    a, b = tmp_path / "a", tmp_path / "b"
    summary_a = _run(a, batch_size=1)
    summary_b = _run(b, batch_size=3)
    ra, rb = _recons(a), _recons(b)
    assert list(ra) == [f"phantom_{i:05d}" for i in range(5)]
    for key in ra:
        assert np.array_equal(ra[key], rb[key])
    assert summary_a["psnr"] == pytest.approx(summary_b["psnr"], abs=1e-9)
    files = {p.name for p in (a / "samples" / "phantom_00000").iterdir()}
    assert {"recon.png", "target.png", "measurement.png", "recon.npy", "target.npy"} <= files
    rows = [json.loads(p.read_text()) for p in (a / "rows").glob("*.json")]
    # TV inpainting of 32 px phantoms (30-70 % missing): 14-16 dB measured; zero filling gives about 13 dB
    assert len(rows) == 5 and all(r["operator_adjoint_calls"] == 200 and r["psnr"] > 13.5 for r in rows)
    result = json.loads((a / "results.json").read_text())
    assert result["summary"]["metrics"]["lpips"] == "off" and "torch" in result["versions"]
    # the masks differ per sample (drawn from each key), so the measurements do too
    meas = [np.asarray(__import__("PIL.Image").Image.open(a / "samples" / k / "measurement.png")) for k in ra]
    assert not np.array_equal(meas[0], meas[1])


def test_rerun_skips_finished_samples_and_refuses_other_settings(tmp_path):
    out = tmp_path / "run"
    _run(out, batch_size=2)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "rows").glob("*.json")}
    data = EvaluationDataModule(CTPhantomDataset(5, seed=0, size=32), 2)
    assert data.rank_share(1, 2) == [1, 3]  # the exact rank share
    assert len(list((out / "rows").glob("*.json"))) == 5  # nothing left to solve
    summary = _run(out, batch_size=2)
    assert summary["num_samples"] == 5  # the aggregate covers the rows of the first run
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "rows").glob("*.json")}
    with pytest.raises(ValueError, match="different configuration"):
        _task(out, settings={"test": "other"})


def test_bad_inputs_fail_before_solving(tmp_path):
    with pytest.raises(ValueError, match="operator expects"):
        _run(tmp_path / "x", batch_size=1, dataset=CTPhantomDataset(2, seed=0, size=16))
    with pytest.raises(ValueError, match="inference_mode=False"):
        _run(tmp_path / "y", batch_size=1, trainer=_trainer(inference_mode=True))
    assert not (tmp_path / "x" / "rows").exists() and not (tmp_path / "y" / "rows").exists()
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):  # before any solving
        _task(tmp_path / "z", metrics=ImageMetrics(lpips="alex", weights_dir=tmp_path))


ARGS = ["experiment=ct_baselines", "data.num_images=6", "data.size=32", "operator.image_size=32",
        "+operator.num_detectors=48", "solver.num_iterations=400", "datamodule.batch_size=1", "hydra.run.dir={out}/hydra"]


def _cli(out: Path, *extra: str, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "evaluate.py"), f"paths.output_dir={out}", *[a.format(out=out) for a in ARGS], *extra]
    proc = subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
    return proc


def test_two_ranks_equal_one_rank_and_a_killed_run_resumes_exactly(tmp_path):
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    _cli(one)
    _cli(two, "trainer=ddp_sim")
    r1, r2 = _recons(one), _recons(two)
    assert list(r1) == list(r2) == [f"phantom_{i:05d}" for i in range(6)]  # every key exactly once
    assert all(np.array_equal(r1[k], r2[k]) for k in r1)
    s1 = json.loads((one / "results.json").read_text())["summary"]
    s2 = json.loads((two / "results.json").read_text())["summary"]
    assert s1["psnr"] == pytest.approx(s2["psnr"], abs=1e-9)

    proc = _cli(killed, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((killed / "rows").glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (killed / "rows").glob("*.json")}
    assert 2 <= len(finished) < 6, "the run must be killed part-way"
    assert not (killed / "results.json").exists()
    _cli(killed)
    assert all((killed / "rows" / name).stat().st_mtime_ns == stamp for name, stamp in finished.items())  # kept
    rk = _recons(killed)
    assert all(np.array_equal(r1[k], rk[k]) for k in r1)
    assert json.loads((killed / "results.json").read_text())["summary"]["psnr"] == pytest.approx(s1["psnr"], abs=1e-9)


def test_cli_logs_table_images_and_metrics_to_wandb_offline(tmp_path):
    out = tmp_path / "wb"
    _cli(out, "logger=wandb", "solver.num_iterations=20", "data.num_images=3")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(f.suffix == ".wandb" for f in runs[0].iterdir())
    media = runs[0] / "files" / "media"
    assert list((media / "table").glob("samples_*.table.json"))
    assert len(list((media / "images").rglob("*.png"))) >= 9  # 3 samples x (target, recon, measurement)
    assert json.loads((out / "results.json").read_text())["summary"]["num_samples"] == 3


def test_fid_covers_every_saved_reconstruction(tmp_path):
    """FID is computed at aggregation from the saved files (so resumed and multi-rank runs are covered)."""

    class MeanStd(torch.nn.Module):
        num_features = 2

        def forward(self, x):
            return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1).double()

    metrics = ImageMetrics(fid=True, fid_feature=MeanStd(), fid_feature_name="mean-std")
    summary = _run(tmp_path / "fid", batch_size=2, metrics=metrics)
    assert summary["fid"] > 0 and summary["num_samples"] == 5


def test_reconstruction_task_is_a_lightning_module_logging_through_any_logger(tmp_path):
    """trainer.test(ReconstructionTask(...), datamodule=...) from Python; the CSV logger gets per-batch and per-epoch
    PSNR/SSIM equal to the per-sample rows, and the aggregate over all rows."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    out = tmp_path / "csv"
    task = _task(out)
    assert isinstance(task, L.LightningModule)
    logger = CSVLogger(tmp_path / "logs", name="eval")
    results = _trainer(logger=logger).test(task, datamodule=EvaluationDataModule(CTPhantomDataset(3, seed=0, size=32), 1))
    rows = {json.loads(p.read_text())["key"]: json.loads(p.read_text()) for p in (out / "rows").glob("*.json")}
    logged = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    for name in ("psnr", "ssim"):
        steps = [float(r[f"{name}_step"]) for r in logged if r.get(f"{name}_step")]
        expected = [rows[f"phantom_{i:05d}"][name] for i in range(3)]  # batch size 1: one sample per step, in order
        assert steps == pytest.approx(expected, rel=1e-6)
        (epoch,) = [float(r[f"{name}_epoch"]) for r in logged if r.get(f"{name}_epoch")]
        assert epoch == pytest.approx(np.mean(expected), rel=1e-6)
        assert results[0][f"results/{name}"] == pytest.approx(np.mean(expected), rel=1e-6)
