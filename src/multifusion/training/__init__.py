"""Training: the loop, its resumable state, its logs, and the comparison runner."""
