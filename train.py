"""Train a diffusion prior: ``python train.py experiment=<name>`` (see conf/train.yaml and README.md)."""

from diffinv_pl.cli import train_main

if __name__ == "__main__":
    train_main()
