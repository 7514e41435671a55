"""`polm rm`: a reward model trained on preference pairs (Bradley-Terry), and its use as an RL reward function.

    run_rm(cfg)                                   # model + scoring head, trained on data.train pairs
    score = reward_function("runs/rm_tiny/final")
    score(["2+2="], ["4"])                        # -> [reward]: (prompts, completions, **columns) -> list[float]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from polm_jax import api
from polm_jax.algorithms.reward_model import reward_model_loss
from polm_jax.config import Config, DataSection
from polm_jax.data.pipeline import encode_example
from polm_jax.data.preference import example_batch, preference_dataset
from polm_jax.data.sources import open_sources
from polm_jax.errors import CheckpointError
from polm_jax.models.config import ModelConfig
from polm_jax.models.transformer import forward
from polm_jax.train.loop import LoopResult
from polm_jax.train.session import Session


def reward_model_config(cfg: Config) -> Config:
    """`cfg` with a one-score head on the model (a causal LM's checkpoint gets a fresh head)."""
    model = dataclasses.replace(cfg.model, overrides={**cfg.model.overrides, "num_labels": 1})
    return dataclasses.replace(cfg, model=model)


def run_rm(cfg: Config) -> LoopResult:
    """Trains a reward model on `cfg.data` preference records (prompt, chosen, rejected): the decoder with a
    scalar head (with LoRA, the adapters and the head train), Bradley-Terry loss, pair accuracy as a metric."""
    cfg = reward_model_config(cfg)
    session = Session.create(cfg)
    data, rows = cfg.data, session.local_batch_size
    shard = {"shard_index": jax.process_index(), "shard_count": jax.process_count()}

    def dataset(specs: list[str], train: bool):
        source = open_sources(specs, data, key="data.train" if train else "data.eval")
        return preference_dataset(source, data, session.tokenizer, kind="paired", batch_size=rows, seed=cfg.seed,
                                  train=train, **shard)

    example = example_batch(data, rows, kind="paired", precomputed=False)
    loss_fn = reward_model_loss(session.model.config, session.model_params, cfg.preference)
    eval_fn = None
    if data.eval:
        eval_fn = session.evaluator(loss_fn, dataset(data.eval, train=False)[0], example, cfg.train.eval_batches)
    train_set, stats = dataset(data.train, train=True)
    return session.train(loss_fn, train_set, example_batch=example, eval_fn=eval_fn, data_stats=stats.as_dict)


@partial(jax.jit, static_argnames="config")
def _last_token_scores(config: ModelConfig, params: dict, tokens, lengths):
    """Rewards [B] of right-padded rows tokens [B, T] with `lengths` [B]: the head's output at each last token."""
    segment_ids = (jnp.arange(tokens.shape[1])[None] < lengths[:, None]).astype(jnp.int32)
    scores = forward(config, params, tokens, segment_ids=segment_ids)[..., 0]
    return jnp.take_along_axis(scores, (lengths - 1)[:, None], axis=1)[:, 0]


def reward_function(path: str, *, batch_size: int = 16, max_length: int | None = None,
                    section: DataSection | None = None) -> Callable[..., list[float]]:
    """A trained reward model (a folder `polm rm` exported, or a HF *ForSequenceClassification one) as an RL
    reward function `(prompts, completions, **columns) -> list[float]`.

    Each (prompt, completion) is encoded as in training (`section`: data options such as the chat template use;
    default DataSection()) and scored at its last token; a longer one keeps its last `max_length` tokens
    (default: the model's max positions). Rows are scored `batch_size` at a time, padded to a power of two.
    """
    model = api.load(path)
    if model.config.num_labels != 1:
        raise CheckpointError(f"{path}: not a reward model (num_labels={model.config.num_labels}, expected 1); "
                              "train one with `polm rm`")
    if model.tokenizer is None:
        raise CheckpointError(f"{path}: the reward model has no tokenizer files to encode completions with")
    section = section or DataSection()
    limit = min(max_length or model.config.max_position_embeddings, model.config.max_position_embeddings)

    def score(prompts: list, completions: list, **_) -> list[float]:
        encoded = [encode_example({"prompt": p, "completion": c, "_where": f"completion {i}"}, model.tokenizer,
                                  section)[0][-limit:] for i, (p, c) in enumerate(zip(prompts, completions))]
        out = []
        for start in range(0, len(encoded), batch_size):
            rows = encoded[start:start + batch_size]
            width = min(limit, 1 << (max(len(r) for r in rows) - 1).bit_length())
            tokens = np.zeros((batch_size, width), np.int32)
            lengths = np.ones(batch_size, np.int32)
            for i, ids in enumerate(rows):
                tokens[i, :len(ids)], lengths[i] = ids, len(ids)
            out += np.asarray(_last_token_scores(model.config, model.params, tokens, lengths))[:len(rows)].tolist()
        return out

    return score
