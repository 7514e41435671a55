"""Fused per-token log-probs: hidden [N, H] @ lm_head [H, V] -> log-probs (and entropies) of targets [N], with
gradients, never materialising the [N, V] logits. See api.py for the semantics and the implementations."""

from pallas_kernels.fused_logprob.api import IMPLS, fused_logprob, resolve_impl
from pallas_kernels.fused_logprob.tiles import BlockSizes

__all__ = ["IMPLS", "BlockSizes", "fused_logprob", "resolve_impl"]
