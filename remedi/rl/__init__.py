"""Remask RL (RemeDi Eq. 8): Plackett-Luce unmasking-policy log-probs, samplers and GRPO-style clipped losses."""
