"""Policy-gradient RL (the GRPO family, PPO): advantage estimators and policy/value losses as pure functions."""
