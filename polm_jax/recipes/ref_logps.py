"""Reference log-probs computed once per dataset and stored, so preference training runs one forward per step.

The file is an .npy array [records, 2] (each record's two sequences; NaN for records skipped or dropped) named by
a fingerprint of what decides the numbers: the sources, the model (path and its modification time, or preset and
seed), the tokenizer and the data settings. It lives beside a local data file, in `preference.ref_logps_dir`
when set, else in train.output_dir; a later run with the same fingerprint loads it instead of recomputing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from polm_jax.algorithms.preference import sequence_logps, sequence_values
from polm_jax.config import Config
from polm_jax.data.preference import preference_dataset
from polm_jax.train.session import Session


def ref_logps_path(cfg: Config, specs: list[str], kind: str) -> str:
    """Where the reference log-probs of the records of `specs` are stored (see the module doc)."""
    model = cfg.model
    key = {"sources": specs, "kind": kind, "model": model.path or model.preset, "dtype": model.dtype,
           "overrides": model.overrides, "seed": None if model.path else cfg.seed,
           "model_mtime": os.path.getmtime(model.path) if model.path else None,
           "data": {k: v for k, v in dataclasses.asdict(cfg.data).items()
                    if k in ("tokenizer", "columns", "max_length", "truncation", "on_error")}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    first = specs[0]
    folder = cfg.preference.ref_logps_dir or (first + ".ref_logps" if os.path.isfile(first)
                                              else os.path.join(cfg.train.output_dir, "ref_logps"))
    return os.path.join(folder, f"{digest}.npy")


def compute_ref_logps(session: Session, source, *, kind: str, reference: dict) -> np.ndarray:
    """[len(source), 2] f32 log-probs of each record's two sequences under the `reference` params (one pass)."""
    cfg, rows = session.cfg, session.local_batch_size
    dataset, _ = preference_dataset(source, cfg.data, session.tokenizer, kind=kind, batch_size=rows, seed=cfg.seed,
                                    shard_index=jax.process_index(), shard_count=jax.process_count(), train=False)
    config = session.model.config

    @jax.jit
    def score(params, batch):
        (first, second), _ = sequence_logps(config, params, batch)
        records, _ = sequence_values(batch, "record")
        return records, first, second

    out = np.full((len(source), 2), np.nan, np.float32)
    total = -(-len(source) // cfg.train.batch_size)
    for batch in tqdm(dataset, total=total, desc="reference log-probs", disable=jax.process_index() != 0):
        records, first, second = multihost_utils.process_allgather(score(reference, session.put_batch(batch)),
                                                                   tiled=True)
        ids = records.astype(np.int64).ravel()
        keep = ids > 0
        out[ids[keep] - 1] = np.stack([first.ravel()[keep], second.ravel()[keep]], axis=1)
    return out


def load_or_compute(session: Session, source, specs: list[str], *, kind: str, reference: dict) -> np.ndarray:
    """The stored reference log-probs for `specs` if present, else computed now and stored (process 0 writes)."""
    path = ref_logps_path(session.cfg, specs, kind)
    if os.path.exists(path):
        logps = np.load(path)
        if logps.shape == (len(source), 2):
            print(f"reference log-probs: reusing {path}")
            return logps
    logps = compute_ref_logps(session, source, kind=kind, reference=reference)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path + ".tmp.npy", logps)
        os.replace(path + ".tmp.npy", path)
        print(f"reference log-probs: stored {path}")
    multihost_utils.sync_global_devices("ref_logps")
    return logps
