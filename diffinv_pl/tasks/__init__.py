"""Tasks run by the entry points: the GMM exact-posterior benchmark (evaluate.py) and EDM denoiser training (train.py)."""
