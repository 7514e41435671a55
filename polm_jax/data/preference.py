"""Preference data: paired (prompt, chosen, rejected) and unpaired KTO (prompt, completion, label) records as
units of two sequences, packed or padded into rows, on the SFT pipeline's grain machinery.

    ds, stats = preference_dataset(source, cfg.data, tokenizer, kind="paired", batch_size=8, seed=0)
    batch = next(iter(ds))   # [batch_size, max_length]: tokens, positions, segment_ids, loss_mask (int32),
                             # record (int32), plus ref_logps (float32) when given, label (int32) when unpaired

A unit's first sequence is the chosen response (KTO: the example), its second the rejected one (KTO: the same
prompt with the next record's completion, for the KL estimate). In a row, unit u holds segments 2u-1 and 2u, each
sequence with positions from 0; both sides of a unit always share a row, so one forward pass scores both. The
loss covers the responses only. A unit must fit in data.max_length; a longer one follows data.truncation, with
truncate_left/right cutting each sequence to max_length // 2.
Per-sequence values sit on each sequence's first token (0 elsewhere): `record` = source index + 1 on the
unit's first token, `ref_logps` the sequence's precomputed reference log-prob, `label` 1 for desirable.
Paired records: `prompt` (optional when chosen and rejected are conversations sharing their opening turns)
and `chosen`, `rejected`, each a string or a list of messages.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import grain
import numpy as np

from polm_jax.config import DataSection
from polm_jax.data.pipeline import (
    DataStats,
    Examples,
    batched,
    check_shard,
    encode_example,
    fit_length,
)
from polm_jax.data.tokenizer import Tokenizer
from polm_jax.errors import DataError

INT_KEYS = ("tokens", "positions", "segment_ids", "loss_mask", "record")
PAIRED = "expected {'prompt': str or messages (optional with conversations), 'chosen': ..., 'rejected': ...}"
UNPAIRED = "expected {'prompt': ..., 'completion': ..., 'label': true|false} (KTO)"


def split_pair(record: dict) -> tuple[dict, dict]:
    """A paired record -> two prompt/completion records (chosen, rejected) the SFT encoder reads.

    A string prompt with conversational responses becomes a user turn; responses that repeat the prompt's turns
    (or, without a prompt, share opening turns) have them moved to the prompt.
    """
    where = record.get("_where", "record")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        found = sorted(k for k in record if k != "_where")
        raise DataError(f"{where}: no {' or '.join(repr(k) for k in missing)} field (found {found}); {PAIRED}")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical; the pair carries no preference")
    if isinstance(chosen, list) and isinstance(rejected, list):
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        head = prompt or _shared_turns(chosen, rejected)
        if chosen[: len(head)] == head and rejected[: len(head)] == head:
            chosen, rejected = chosen[len(head):], rejected[len(head):]
        prompt = head
    elif prompt is None:
        raise DataError(f"{where}: no 'prompt' (needed when 'chosen' and 'rejected' are strings); {PAIRED}")
    return ({"prompt": prompt, "completion": chosen, "_where": where},
            {"prompt": prompt, "completion": rejected, "_where": where})


def _shared_turns(a: list, b: list) -> list:
    """The opening messages two conversations share, up to the last differing assistant turn."""
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return a[:n]


def fit_unit(seqs: list[tuple[np.ndarray, np.ndarray]], section: DataSection,
             where: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], bool] | str:
    """Applies data.truncation to a unit longer than data.max_length: (sequences, truncated), or the reason it
    is dropped; DataError with truncation=error."""
    total, limit = sum(len(ids) for ids, _ in seqs), section.max_length
    if total <= limit:
        return seqs, False
    if section.truncation == "error":
        raise DataError(f"{where}: the two sequences have {total} tokens together, more than data.max_length="
                        f"{limit}; set data.truncation=drop|truncate_left|truncate_right or a larger "
                        "data.max_length")
    if section.truncation == "drop":
        return f"{where}: {total} tokens > data.max_length={limit}, too long"
    half = dataclasses.replace(section, max_length=limit // 2)
    fitted = [fit_length(ids, mask, half, where) for ids, mask in seqs]
    if any(f is None for f in fitted):
        return f"{where}: no response token left after truncating to data.max_length // 2 = {limit // 2}"
    return fitted, True


class _Units(Examples):
    """index -> a unit of two sequences (see the module doc)."""

    def __init__(self, *args, kind: str, ref_logps: np.ndarray | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kind, self.ref_logps = kind, ref_logps
        self.section = dataclasses.replace(self.section, completion_only_loss=True, assistant_only_loss=True)

    def _sequences(self, index: int) -> tuple[list[dict], int, str]:
        record, where = self.record(index)
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a dict, got {type(record).__name__}; "
                            f"{PAIRED if self.kind == 'paired' else UNPAIRED}")
        if self.kind == "paired":
            return list(split_pair(record)), 0, where
        label = record.get("label")
        if not isinstance(label, bool):
            raise DataError(f"{where}: 'label' must be true or false, got {label!r}; {UNPAIRED}")
        other, _ = self.record((index + 1) % len(self.source))
        mismatched = {**record, "completion": other.get("completion") if isinstance(other, dict) else None}
        if len(self.source) == 1 or not isinstance(mismatched["completion"], (str, list)):
            mismatched = record
        return [record, {**mismatched, "_where": where}], int(label), where

    def encode(self, index: int) -> tuple[tuple[list, int, int], str]:
        records, label, where = self._sequences(index)
        return ([encode_example(r, self.tokenizer, self.section) for r in records], label, index), where

    def fit(self, encoded: tuple[list, int, int], where: str) -> tuple[dict[str, np.ndarray], bool] | str:
        seqs, label, index = encoded
        fitted = fit_unit(seqs, self.section, where)
        if isinstance(fitted, str):
            return fitted
        (a, ma), (b, mb) = fitted[0]
        n, starts = len(a) + len(b), (0, len(a))  # where each sequence's per-sequence values go
        example = {"tokens": np.concatenate([a, b]), "loss_mask": np.concatenate([ma, mb]),
                   "positions": np.concatenate([np.arange(len(a)), np.arange(len(b))]).astype(np.int32),
                   "half": np.concatenate([np.ones(len(a)), np.full(len(b), 2)]).astype(np.int32),
                   "record": np.zeros(n, np.int32)}
        example["record"][0] = index + 1
        if self.ref_logps is not None:
            example["ref_logps"] = np.zeros(n, np.float32)
            example["ref_logps"][list(starts)] = self.ref_logps[index]
        if self.kind == "unpaired":
            example["label"] = np.zeros(n, np.int32)
            example["label"][0] = label
        return example, fitted[1]

    def row(self, example: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """One unit alone in a row of max_length (an empty row when None)."""
        row = self.empty_row(batch_dtypes(self.kind, self.ref_logps is not None))
        if example is not None:
            n = len(example["tokens"])
            for k in row:
                if k != "segment_ids":
                    row[k][:n] = example[k]
            row["segment_ids"][:n] = example["half"]
        return row


def _packed_units(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packer output -> batch keys: unit u's sequences become segments 2u-1 and 2u."""
    unit = packed["tokens_segment_ids"]
    row = {k: v for k, v in packed.items() if not k.endswith(("_segment_ids", "_positions")) and k != "half"}
    row["segment_ids"] = np.where(unit > 0, 2 * unit - 2 + packed["half"], 0).astype(np.int32)
    return row


def preference_dataset(source, section: DataSection, tokenizer: Tokenizer, *,
                       kind: Literal["paired", "unpaired"], batch_size: int, seed: int, shard_index: int = 0,
                       shard_count: int = 1, train: bool = True,
                       ref_logps: np.ndarray | None = None) -> tuple[grain.IterDataset, DataStats]:
    """Batches of preference rows for this host (keys in the module doc) and the pipeline's DataStats.

    Order, sharding, shuffling, packing and eval padding as `sft_dataset`. `ref_logps` [len(source), 2]: the
    precomputed reference log-probs of each record's two sequences, placed in the rows as `ref_logps`.
    """
    check_shard(shard_index, shard_count, batch_size, source)
    if ref_logps is not None and len(ref_logps) != len(source):
        raise DataError(f"reference log-probs cover {len(ref_logps)} records but the source has {len(source)}; "
                        "recompute them (preference.precompute_ref)")
    stats = DataStats()
    units = _Units(source, tokenizer, section, stats, rows=not (train and section.packing), fill=not train,
                   give_up_after=len(source) * shard_count, kind=kind, ref_logps=ref_logps)
    keys = (*[k for k in batch_dtypes(kind, ref_logps is not None) if k != "segment_ids"], "half")
    ds = batched(units, section, batch_size=batch_size, seed=seed, shard_index=shard_index, shard_count=shard_count,
                 train=train, pack_keys=keys, packed_row=_packed_units)
    return ds, stats


def batch_dtypes(kind: str, precomputed: bool) -> dict[str, type]:
    """The keys of a preference batch and their dtypes."""
    dtypes = dict.fromkeys(INT_KEYS, np.int32)
    if precomputed:
        dtypes["ref_logps"] = np.float32
    if kind == "unpaired":
        dtypes["label"] = np.int32
    return dtypes


def example_batch(section: DataSection, rows: int, *, kind: str, precomputed: bool) -> dict[str, np.ndarray]:
    """Zeros with the keys, shapes and dtypes of a preference batch of `rows` rows."""
    return {k: np.zeros((rows, section.max_length), t) for k, t in batch_dtypes(kind, precomputed).items()}
