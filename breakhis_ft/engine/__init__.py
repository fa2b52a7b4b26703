"""Engine stage: the accelerate training loop, checkpoints, evaluation metrics."""
