"""Evaluation: the run loop, results files, reports, plots, answer checking and paired statistics."""
