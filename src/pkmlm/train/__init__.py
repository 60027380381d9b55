"""Training: optimizer groups and schedules, checkpoints, the loop."""
