"""The training loop, its resumable state and checkpoints."""
