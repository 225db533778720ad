#!/usr/bin/env bash
# Latent super-resolution demo on CPU: train the tiny VQ autoencoder and the tiny latent diffusion model on generated
# 32^2 textured CT phantoms, then super-resolve (x4, 8^2 -> 32^2, sigma_y 0.01) held-out phantoms with ReSample, latent
# DPS and bicubic up-sampling, and print the table (experiments/latent/README.md). About 10 minutes on 2 CPU cores.
#   bash experiments/latent/sr_demo.sh [OUT_DIR]      (default experiments/latent/runs/sr_demo; nothing is overwritten)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-experiments/latent/runs/sr_demo}
PY=${PYTHON:-.venv/bin/python}
TRAIN_IMAGES=${TRAIN_IMAGES:-512}
NUM_IMAGES=${NUM_IMAGES:-8}
DATA="$OUT/data"
if [ ! -f "$DATA/weights/autoencoder_tiny/checkpoints/last.ckpt" ]; then
  $PY train.py experiment=autoencoder_tiny paths.data_dir="$DATA" paths.output_dir="$DATA/weights/autoencoder_tiny" \
    data.train.num_images="$TRAIN_IMAGES" trainer.max_epochs=15 ++trainer.enable_progress_bar=false
fi
if [ ! -f "$DATA/weights/ldm_tiny/checkpoints/last.ckpt" ]; then
  $PY train.py experiment=ldm_tiny paths.data_dir="$DATA" paths.output_dir="$DATA/weights/ldm_tiny" \
    data.train.num_images="$TRAIN_IMAGES" trainer.max_epochs=30 ++trainer.enable_progress_bar=false
fi
common=(experiment=resample_sr_tiny paths.data_dir="$DATA" data.num_images="$NUM_IMAGES" task.solver_progress=false
        ++trainer.enable_progress_bar=false)
$PY evaluate.py "${common[@]}" paths.output_dir="$OUT/eval/resample"
$PY evaluate.py "${common[@]}" paths.output_dir="$OUT/eval/latent_dps" solver=dps '~solver.num_steps' \
  sampling_grid=vp sampling_grid.num_steps=100 sampling_grid.beta_schedule=sqrt_linear
$PY evaluate.py "${common[@]}" paths.output_dir="$OUT/eval/bicubic" solver=bicubic '~solver.num_steps'
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| method | PSNR (dB), mean ± 95% CI | SSIM | s / image |\n|---|---|---|---|")
for name in ("bicubic", "latent_dps", "resample"):
    s = json.loads((out / "eval" / name / "results.json").read_text())["summary"]
    print(f"| {name} | {s['psnr']:.2f} ± {s['psnr_ci95']:.2f} | {s['ssim']:.3f} | {s['wall_time_s']:.2f} |")
PY
