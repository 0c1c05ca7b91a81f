"""Training: parameter filters per stage, optimiser, train step, checkpoints, synthetic data."""
