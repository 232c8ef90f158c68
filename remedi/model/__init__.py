"""The model: LLaDA config and backbone, the UPS (head, stream, residual policy), checkpoints, and the one loader."""
