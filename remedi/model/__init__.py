"""The model: LLaDA config and backbone, the UPS (head and stream), checkpoints, and the one loader."""
