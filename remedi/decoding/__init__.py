"""Decoding: the block sampler with dynamic remasking, its slow reference, flags and trajectory pictures."""
