"""Tasks: what ``evaluate.py``/``train.py`` run (the GMM exact-posterior benchmark; Lightning tasks come later)."""
