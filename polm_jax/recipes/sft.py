"""`polm sft`: supervised fine-tuning (full or LoRA) on JSONL / TFDS / array_record / synthetic data."""

from __future__ import annotations

import jax
import numpy as np

from polm_jax.algorithms.sft import sft_loss
from polm_jax.config import Config
from polm_jax.data.pipeline import BATCH_KEYS, sft_dataset
from polm_jax.data.sources import open_sources
from polm_jax.train.loop import LoopResult
from polm_jax.train.session import Session


def run_sft(cfg: Config) -> LoopResult:
    """Trains `cfg.model` on `cfg.data` with the SFT loss; checkpoints, metrics and the final model go to
    `cfg.train.output_dir`. Resumes from the latest complete checkpoint there."""
    session = Session.create(cfg)
    data, rows = cfg.data, session.local_batch_size
    shard = {"shard_index": jax.process_index(), "shard_count": jax.process_count()}
    train_set, stats = sft_dataset(open_sources(data.train, data), data, session.tokenizer, batch_size=rows,
                                   seed=cfg.seed, train=True, **shard)
    example = {k: np.zeros((rows, data.max_length), np.int32) for k in BATCH_KEYS}
    loss_fn = sft_loss(session.model.config, session.model_params)
    eval_fn = None
    if data.eval:
        eval_set, _ = sft_dataset(open_sources(data.eval, data), data, session.tokenizer, batch_size=rows, seed=cfg.seed,
                                  train=False, **shard)
        eval_fn = session.evaluator(loss_fn, eval_set, example, cfg.train.eval_batches)
    return session.train(loss_fn, train_set, example_batch=example, eval_fn=eval_fn, data_stats=stats.as_dict)
