"""Pallas kernels for polm-jax's hot paths (flash attention, fused per-token log-probs), importable without polm_jax.

Empty for now: polm_jax.ops.attention runs its XLA implementation until the kernels land here.
"""
