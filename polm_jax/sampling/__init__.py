"""The KV-cache generation engine for rollouts and evaluation.

    from polm_jax.sampling import SamplingParams, generate, generate_text, make_rollout
    rollout = make_rollout(config, SamplingParams(max_new_tokens=256, temperature=1.0, n=8), mesh=mesh)  # RL, on device
    out = generate(config, params, [[1, 42, 7]], SamplingParams(temperature=0.0))                       # host, token ids
    texts = generate_text(model, ["What is 2 + 2?"], SamplingParams(max_new_tokens=32), chat=True)       # host, strings
"""

from polm_jax.sampling.engine import Rollout, make_engine, make_rollout
from polm_jax.sampling.generate import generate
from polm_jax.sampling.params import SamplingParams
from polm_jax.sampling.text import Completion, generate_text, stream_text

__all__ = ["Completion", "Rollout", "SamplingParams", "generate", "generate_text", "make_engine", "make_rollout",
           "stream_text"]
