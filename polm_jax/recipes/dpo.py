"""`polm dpo`: preference optimisation (DPO, cDPO/robust, hinge, IPO, SimPO, ORPO, KTO; full or LoRA)."""

from __future__ import annotations

import jax

from polm_jax.algorithms.preference import preference_loss, uses_reference
from polm_jax.config import Config
from polm_jax.data.preference import example_batch, preference_dataset
from polm_jax.data.sources import open_sources
from polm_jax.recipes.ref_logps import load_or_compute
from polm_jax.train.loop import LoopResult
from polm_jax.train.session import Session


def data_kind(cfg: Config) -> str:
    """"unpaired" for KTO, else "paired"."""
    return "unpaired" if cfg.preference.losses[0][0] == "kto" else "paired"


def run_dpo(cfg: Config) -> LoopResult:
    """Trains `cfg.model` on `cfg.data` preference records with the losses of `cfg.preference`.

    The reference is the initial model: with LoRA the frozen base (adapters off, no second copy), in full
    fine-tuning a frozen copy, or, with preference.precompute_ref, log-probs computed once and stored.
    """
    options, data = cfg.preference, cfg.data
    precompute = options.precompute_ref and uses_reference(options)
    session = Session.create(cfg, reference=uses_reference(options) and not precompute and not cfg.lora.rank)
    kind, rows = data_kind(cfg), session.local_batch_size
    shard = {"shard_index": jax.process_index(), "shard_count": jax.process_count()}
    reference = session.frozen if cfg.lora.rank else session.trainable  # the initial weights, before training

    def dataset(specs: list[str], train: bool):
        source = open_sources(specs, data, key="data.train" if train else "data.eval")
        ref = load_or_compute(session, source, specs, kind=kind, reference=reference) if precompute else None
        return preference_dataset(source, data, session.tokenizer, kind=kind, batch_size=rows, seed=cfg.seed,
                                  train=train, ref_logps=ref, **shard)

    eval_set = dataset(data.eval, train=False)[0] if data.eval else None
    train_set, stats = dataset(data.train, train=True)
    example = example_batch(data, rows, kind=kind, precomputed=precompute)
    loss_fn = preference_loss(session.model.config, session.model_params, options)
    eval_fn = session.evaluator(loss_fn, eval_set, example, cfg.train.eval_batches) if eval_set else None
    return session.train(loss_fn, train_set, example_batch=example, eval_fn=eval_fn, data_stats=stats.as_dict)
