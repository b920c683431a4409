"""Training: optimisers, checkpoints, metric logging and the task loops."""
