"""polm-jax: post-training (SFT, preference optimisation, reasoning RL) for LLMs in JAX.

    import polm_jax as pj
    model = pj.load("path/to/hf_folder")                      # config, params, tokenizer
    logits = pj.forward(model.config, model.params, tokens)   # [B, T] int32 -> [B, T, V]
    pj.save_hf(model, "out_folder")
    model = pj.init("tiny-llama", seed=0)
"""

from polm_jax.api import Model, from_section, init, load, param_shardings, save, save_hf
from polm_jax.models.config import ModelConfig
from polm_jax.models.presets import get_preset, preset_names
from polm_jax.models.transformer import forward, init_cache, lm_head

__all__ = ["Model", "ModelConfig", "forward", "from_section", "get_preset", "init", "init_cache", "lm_head", "load",
           "param_shardings", "preset_names", "save", "save_hf"]
