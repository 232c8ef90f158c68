"""Learned remask policies on top of the sampler: the residual UPS, its features, and its derivative-free search."""
