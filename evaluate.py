"""Evaluate a solver: ``python evaluate.py experiment=gmm_dps`` (see conf/evaluate.yaml and README.md)."""

from diffinv_pl.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
