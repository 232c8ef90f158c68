"""Remask RL (RemeDi Eq. 8): GRPO on the joint token / Plackett-Luce position policy.

policy   Plackett-Luce and token log-probs, samplers, clipped GRPO loss
advantages  group / leave-one-out / greedy-baseline advantages, per-block credit, remask statistics
rollout  block-wise rollouts with the joint policy, every step's state and old log-probs recorded
loss     block-causal re-scoring of the recorded steps ([prompt | final | x_t]) and the per-step GRPO loss
rewards  reward functions by name (math_verify, equation_truth, their sum, toy rewards for tests)
data     training prompts with gold answers
args     the script's flags and their defaults (authors' settings; embedded-model CPU settings)
trainer  the accelerate loop: updates, checkpoints, exact resume, metrics, curves
plots    reward / accuracy / remask curves from metrics.jsonl
"""
