#!/usr/bin/env bash
# Reproduce the committed GMM exact-posterior tables (2 CPU cores; see README.md in this folder).
#   bash experiments/gmm_posterior/run.sh            # MCGdiff table, the TMPD variant, then the DPS-variant cell
# experiment=gmm_table / gmm_tmpd now run every seed solver beside DPS and the oracle (task=gmm_all_solvers): about
# 1.5 h (MCGdiff) and 4-5 h (TMPD) on one core each; the committed tables were produced as a DPS/oracle run plus the
# seed solvers' rows (run_seed_solvers.sh), merged by merge_tables.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
out=experiments/gmm_posterior
/usr/bin/time -f "wall %e s, max RSS %M KB" .venv/bin/python evaluate.py experiment=gmm_table \
    paths.output_dir="$out/mcgdiff" 2>&1 | tee "$out/mcgdiff.log"
/usr/bin/time -f "wall %e s, max RSS %M KB" .venv/bin/python evaluate.py experiment=gmm_tmpd \
    paths.output_dir="$out/tmpd" 2>&1 | tee "$out/tmpd.log"
/usr/bin/time -f "wall %e s, max RSS %M KB" .venv/bin/python evaluate.py experiment=gmm_dps_mcgdiff \
    paths.output_dir="$out/dps_mcgdiff" 2>&1 | tee "$out/dps_mcgdiff.log"
