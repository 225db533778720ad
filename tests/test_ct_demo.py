"""The CT demo (experiments/ct_demo/run.py, the README's main job) end to end at a tiny scale: it trains the patch
prior, tunes TV on the tuning phantoms, evaluates FBP, TV and PaDIS-DPS on the held-out ones, writes its table, and a
second run reuses everything that is finished."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

DEMO = REPO / "experiments" / "ct_demo" / "run.py"
TINY = ["--train-minutes", "0.05", "--num-images", "2", "--tune-images", "1", "--tv-lambdas", "0.003", "0.03",
        "--tv-iterations", "20", "--padis", "solver.num_levels=3", "solver.inner_steps=1",
        "++trainer.enable_progress_bar=false", "task.solver_progress=false"]


def _demo(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(DEMO), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def _load_demo():
    spec = importlib.util.spec_from_file_location("ct_demo_run", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_ct_demo_runs_end_to_end_and_reuses_finished_steps(tmp_path):
    out, weights = tmp_path / "demo", tmp_path / "weights"
    first = _demo([*TINY, "--out", str(out), "--weights-dir", str(weights)])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert table in first.stdout
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert {"FBP", "PaDIS-DPS, patch prior", "patch"} <= set(rows) and any(r.startswith("TV (lambda") for r in rows)
    fbp = json.loads((out / "eval" / "fbp" / "results.json").read_text())["summary"]
    padis = json.loads((out / "eval" / "padis_dps_patch" / "results.json").read_text())["summary"]
    assert fbp["num_samples"] == padis["num_samples"] == 2 and 15.0 < fbp["psnr"] < 40.0
    assert padis["denoiser_calls"] == pytest.approx(3 * 1 / 2)  # 3 levels x 1 inner step, a batch of 2 images
    assert f"{fbp['psnr']:.2f}" in rows["FBP"] and f"{padis['psnr']:.2f}" in rows["PaDIS-DPS, patch prior"]
    recons = sorted((out / "eval" / "padis_dps_patch" / "samples").glob("*/recon.npy"))  # where the table points
    assert len(recons) == 2 and "eval/padis_dps_patch/samples" in rows["PaDIS-DPS, patch prior"]
    # TV's lambda is the one with the best tuning PSNR, and the tuning phantoms are not the test phantoms
    tuned = {lam: json.loads((out / "tune_tv" / f"lam_{lam}" / "results.json").read_text())["summary"]["psnr"]
             for lam in ("0.003", "0.03")}
    assert f"TV (lambda {max(tuned, key=tuned.get)})" in table
    assert len(list((out / "tune_tv" / "lam_0.003" / "rows").iterdir())) == 1
    assert len(list((out / "eval" / "fbp" / "rows").iterdir())) == 2
    tune_data = json.loads((out / "tune_tv" / "lam_0.003" / "config.json").read_text())["data"]
    test_data = json.loads((out / "eval" / "tv" / "config.json").read_text())["data"]
    assert (tune_data["seed"], test_data["seed"]) == (1, 0) and tune_data["kind"] == test_data["kind"] == "textured"
    assert (weights / "ct_demo_patch_prior.ckpt").read_bytes() == \
        (out / "patch_prior" / "checkpoints" / "last.ckpt").read_bytes()
    info = json.loads((out / "patch_prior" / "demo_training.json").read_text())
    assert info["steps"] > 0 and info["images"] == 8 * info["steps"] and info["peak_rss_mb"] > 100
    # a second run trains nothing and recomputes nothing: the finished results are reused, not overwritten
    checkpoint_time = (out / "patch_prior" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    second = _demo([*TINY, "--out", str(out), "--weights-dir", str(weights)])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing the finished patch prior" in second.stdout
    assert (out / "patch_prior" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == checkpoint_time
    assert json.loads((out / "eval" / "padis_dps_patch" / "results.json").read_text())["summary"]["psnr"] == \
        padis["psnr"]


def test_ct_demo_refuses_bad_arguments_and_an_unfinished_training_run(tmp_path, capsys):
    demo = _load_demo()
    assert demo._days_hours_minutes_seconds(5) == "00:00:05:00"
    assert demo._days_hours_minutes_seconds(0.05) == "00:00:00:03"
    assert demo._days_hours_minutes_seconds(90.5) == "00:01:30:30"
    with pytest.raises(SystemExit) as err:
        demo.main(["--tune-seed", "0", "--out", str(tmp_path / "a")])
    assert err.value.code == 2 and "test set" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--train-minutes", "0", "--out", str(tmp_path / "b")])
    unfinished = tmp_path / "c" / "patch_prior"
    unfinished.mkdir(parents=True)
    (unfinished / "something").write_text("x")
    assert demo.main(["--out", str(tmp_path / "c")]) == 2
    message = capsys.readouterr().err
    assert "unfinished training run" in message and "move that folder away" in message
    assert (unfinished / "something").read_text() == "x"


def test_a_trained_prior_is_installed_for_the_tiny_variants_but_never_over_a_file(tmp_path):
    demo = _load_demo()
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"new prior")
    target = tmp_path / "weights" / "ct_demo_patch_prior.ckpt"
    demo._install_prior(checkpoint, target)
    assert target.read_bytes() == b"new prior" and not list(target.parent.glob("*.partial"))
    checkpoint.write_bytes(b"newer prior")
    demo._install_prior(checkpoint, target)
    assert target.read_bytes() == b"new prior"
