#!/usr/bin/env bash
# Add the DAPS, CoDPS and CoDPS+ rows (conf/task/gmm_all_solvers.yaml) to the committed MCGdiff and TMPD tables
# without rerunning DPS and the oracle: run only the new samplers (their streams do not depend on the other samplers,
# so the rows are bitwise those of a full `experiment=gmm_table` / `gmm_tmpd` run), in two processes of one thread
# each, then merge with the existing runs (merge_tables.py checks that the floors, i.e. the problems, are equal).
#   bash experiments/gmm_posterior/run_seed_solvers.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export OMP_NUM_THREADS=1
out=experiments/gmm_posterior/runs
new=("~task.samplers.solver" "~task.samplers.oracle")
run() {  # name, experiment, overrides...
  local name=$1 exp=$2; shift 2
  /usr/bin/time -f "wall %e s, max RSS %M KB" .venv/bin/python evaluate.py experiment="$exp" "${new[@]}" "$@" \
      paths.output_dir="$out/$name" > "$out/$name.log" 2>&1
}
( run mcgdiff_seeds gmm_table && run tmpd_seeds_1 gmm_tmpd "task.sigmas_y=[1.0]" ) &
( run tmpd_seeds_001_01 gmm_tmpd "task.sigmas_y=[0.01,0.1]" ) &
wait
py=.venv/bin/python
$py experiments/gmm_posterior/merge_tables.py experiments/gmm_posterior/mcgdiff experiments/gmm_posterior/mcgdiff "$out/mcgdiff_seeds" \
    --command "python evaluate.py experiment=gmm_table paths.output_dir=experiments/gmm_posterior/mcgdiff (DPS, oracle)" \
    --command "python evaluate.py experiment=gmm_table ~task.samplers.solver ~task.samplers.oracle (DAPS, CoDPS, CoDPS+)"
$py experiments/gmm_posterior/merge_tables.py experiments/gmm_posterior/tmpd experiments/gmm_posterior/tmpd "$out/tmpd_seeds_001_01" "$out/tmpd_seeds_1" \
    --command "python evaluate.py experiment=gmm_tmpd paths.output_dir=experiments/gmm_posterior/tmpd (DPS, oracle)" \
    --command "python evaluate.py experiment=gmm_tmpd ~task.samplers.solver ~task.samplers.oracle task.sigmas_y=[0.01,0.1] / [1.0] (DAPS, CoDPS, CoDPS+)"
