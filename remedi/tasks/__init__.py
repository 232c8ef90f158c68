"""Benchmarks and the synthetic task: one small module each (load rows, render a prompt, check an answer)."""
