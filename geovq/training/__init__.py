"""Training loops, checkpoints and rate control."""
