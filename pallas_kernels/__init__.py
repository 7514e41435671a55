"""Pallas kernels for polm-jax's hot paths (flash attention, fused per-token log-probs), importable without polm_jax.

polm_jax.ops.attention calls flash_attention for the model's self-attention (training and prefill);
polm_jax.ops.logprob calls fused_logprob for every token log-prob and entropy.
"""

from pallas_kernels.flash_attention import flash_attention  # noqa: F401
from pallas_kernels.fused_logprob import fused_logprob  # noqa: F401
