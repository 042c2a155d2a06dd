"""Training: the shared loop, parallelism, checkpoints, and the pretraining / alignment stages."""
