"""Remask SFT: arguments (args), noise (noise, self_noise), losses and metrics (losses), data (data), one
micro-batch's loss (step), run setup (build), state on disk (state), the loop (loop), the no-flag demo (demo)
and training curves (plots)."""
