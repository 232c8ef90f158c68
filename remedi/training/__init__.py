"""Remask SFT: noise, losses, data, arguments, and the training loop (build, state and resume, steps)."""
