"""SFT data pipelines on grain: record -> ids and loss mask -> fit to max_length -> pack or pad -> batch, per host.

    ds, stats = sft_dataset(source, config.data, tokenizer, batch_size=8, seed=config.seed,
                            shard_index=jax.process_index(), shard_count=jax.process_count())
    it = iter(ds)
    batch = next(it)          # dict of np.int32 [batch_size, max_length]: tokens, positions, segment_ids, loss_mask
    state = it.get_state()    # store with the checkpoint; `it = iter(ds); it.set_state(state)` resumes exactly

Records (dicts, their fields already renamed by `data.columns` in sources.py) are one of:
  {"messages": [{"role", "content"}, ...]}           chat; loss on assistant turns (assistant_only_loss)
  {"prompt": str, "completion": str}                 loss on the completion and EOS (completion_only_loss)
  {"prompt": [messages], "completion": [messages]}   conversational prompt/completion (TRL's), same masks
  {"text": str}                                      plain text + EOS, loss on every token (but the first)
A source is any object with `__len__` and `__getitem__(i) -> dict`; a record's "_where" (e.g. "data.jsonl:12")
names it in errors.

Batch rows: `segment_ids` number the examples of a row 1, 2, 3, ... (0 = padding), `positions` restart at 0 in
each example, `loss_mask[t] = 1` when token t is a target (predicted from position t - 1 of the same segment;
an example's first token never is).
Without packing each example has a row of its own, padded with the tokenizer's pad id.

Order: the global stream (shuffled by seed with a new order each epoch, repeated) is cut per host by striding,
example i going to host i % shard_count, so the hosts' batches b together hold the examples of the
single-host batch b (with packing off and nothing dropped).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import grain
import numpy as np

from polm_jax.config import TRUNCATION, DataSection
from polm_jax.data.chat import render_chat, tokenize_chat
from polm_jax.data.tokenizer import Tokenizer
from polm_jax.errors import ConfigError, DataError, TokenizerError

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")
PACKING_BINS = 64  # rows packed at once (best fit); more rows, less padding, more examples re-read on resume
READ_AHEAD = 64  # examples tokenized ahead of use by the reader threads (grain scans this buffer per element)
MAX_PROBLEMS = 5  # messages of skipped or dropped records kept in DataStats

EXPECTED = (
    "expected one of {'messages': [{'role': ..., 'content': ...}, ...]}, {'prompt': str, 'completion': str} "
    "(or both lists of messages), {'text': str}; rename other fields with data.columns "
    "(e.g. {question: prompt, answer: completion})"
)


# ----------------------------------------------------------------------------- one record


def encode_example(record: dict, tokenizer: Tokenizer, section: DataSection) -> tuple[np.ndarray, np.ndarray]:
    """Record -> (ids [T] int32, loss_mask [T] int32), by record kind (see the module doc).

    Raises DataError naming record["_where"] for a malformed record, an empty completion or text, or a
    record with no target token; TokenizerError when the tokenizer lacks what the kind needs (EOS, a template).
    """
    if not isinstance(record, dict):
        raise DataError(f"record: expected a dict, got {type(record).__name__}; {EXPECTED}")
    where = record.get("_where", "record")
    if "messages" in record:
        ids, mask = _encode_messages(record["messages"], tokenizer, section, where)
    elif "prompt" in record or "completion" in record:
        ids, mask = _encode_prompt_completion(record, tokenizer, section, where)
    elif "text" in record:
        ids, mask = _encode_text(record["text"], tokenizer, where)
    else:
        fields = sorted(key for key in record if key != "_where")
        raise DataError(f"{where}: no 'messages', 'prompt'/'completion' or 'text' field (found {fields}); {EXPECTED}")
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    mask[:1] = 0  # nothing predicts the first token
    if not mask.any():
        raise DataError(f"{where}: no token to learn from (the loss mask is empty, e.g. no assistant message); "
                        f"{EXPECTED}")
    return ids, mask


def _encode_messages(messages, tokenizer: Tokenizer, section: DataSection, where: str) -> tuple[list, list]:
    """A chat: its template's ids; loss on assistant turns (or on everything)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts, "
                        f"got {messages!r:.100}")
    ids, assistant = _tokenize_chat(tokenizer, messages, where)
    return ids, assistant if section.assistant_only_loss else [1] * len(ids)


def _encode_prompt_completion(record: dict, tokenizer: Tokenizer, section: DataSection, where: str):
    """Prompt + completion (+ EOS), both text or both message lists; loss on the completion (or on everything)."""
    for name in ("prompt", "completion"):
        if name not in record:
            raise DataError(f"{where}: has {'completion' if name == 'prompt' else 'prompt'} but no '{name}'; "
                            f"{EXPECTED}")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):
        return _encode_conversational(prompt, completion, tokenizer, section, where)
    if not (isinstance(prompt, str) and isinstance(completion, str)):
        raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages, "
                        f"got {type(prompt).__name__} and {type(completion).__name__}")
    if not completion:
        raise DataError(f"{where}: 'completion' is empty; nothing to learn from")
    head = tokenizer.encode(prompt)
    tail = [*tokenizer.encode(completion, add_special_tokens=False), _eos(tokenizer)]
    mask = [0] * len(head) if section.completion_only_loss else [1] * len(head)
    return head + tail, mask + [1] * len(tail)


def _encode_conversational(prompt: list, completion: list, tokenizer: Tokenizer, section: DataSection, where: str):
    """Prompt and completion messages rendered as one chat; loss on the completion's assistant tokens."""
    if not completion:
        raise DataError(f"{where}: 'completion' is an empty list of messages; nothing to learn from")
    ids, mask = _tokenize_chat(tokenizer, [*prompt, *completion], where)
    if not section.assistant_only_loss:
        mask = [1] * len(ids)
    if section.completion_only_loss and prompt:
        try:
            head = tokenizer.encode(render_chat(tokenizer, prompt, add_generation_prompt=True),
                                    add_special_tokens=False)
        except TokenizerError as e:
            raise DataError(f"{where}: {e}") from e
        shared = next((i for i, (a, b) in enumerate(zip(ids, head)) if a != b), min(len(ids), len(head)))
        mask = [0] * shared + list(mask[shared:])  # a token merged across the boundary counts as completion
    return ids, mask


def _encode_text(text, tokenizer: Tokenizer, where: str) -> tuple[list, list]:
    """Plain text + EOS, loss on every token (encode_example clears the first)."""
    if not isinstance(text, str) or not text:
        raise DataError(f"{where}: 'text' must be a non-empty string, got {text!r:.100}")
    ids = [*tokenizer.encode(text), _eos(tokenizer)]
    return ids, [1] * len(ids)


def _tokenize_chat(tokenizer: Tokenizer, messages: list, where: str) -> tuple[list, list]:
    """tokenize_chat with a bad conversation as a DataError naming the record (a missing template stays a
    TokenizerError: it is the tokenizer's fault, not the record's)."""
    if tokenizer.chat_template is None:
        raise TokenizerError(f"the tokenizer in {tokenizer.folder} has no chat template, needed by chat records "
                             f"such as {where}; add a chat_template.jinja file next to it")
    try:
        return tokenize_chat(tokenizer, messages)
    except TokenizerError as e:
        raise DataError(f"{where}: {e}") from e


def _eos(tokenizer: Tokenizer) -> int:
    if tokenizer.eos_id is None:
        raise TokenizerError(f"the tokenizer in {tokenizer.folder} has no EOS token, needed to end text and "
                             "completions; set eos_token in its tokenizer_config.json")
    return tokenizer.eos_id


def fit_length(ids: np.ndarray, mask: np.ndarray, section: DataSection,
               where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Applies data.truncation to an example longer than data.max_length; None: dropped (too long with
    truncation=drop, or no target token left after truncating). DataError with truncation=error."""
    length, limit = len(ids), section.max_length
    if length <= limit:
        return ids, mask
    if section.truncation not in TRUNCATION:
        raise ConfigError(f"data.truncation: expected one of {TRUNCATION}, got {section.truncation!r}")
    if section.truncation == "error":
        raise DataError(f"{where}: {length} tokens, longer than data.max_length={limit}; set "
                        "data.truncation=drop|truncate_left|truncate_right or a larger data.max_length")
    if section.truncation == "drop":
        return None
    keep = slice(length - limit, length) if section.truncation == "truncate_left" else slice(0, limit)
    ids, mask = ids[keep], mask[keep].copy()
    mask[:1] = 0  # the new first token is no target either
    return (ids, mask) if mask.any() else None


# ----------------------------------------------------------------------------- counters


class DataStats:
    """What a pipeline did with its records, counted by its reader threads (records read ahead included).

    examples: kept; skipped: malformed, with data.on_error=skip; dropped: too long (truncation=drop) or no
    target left after truncation; truncated: kept but cut; tokens, loss_tokens: of kept examples (before
    padding); problems: the first few skip/drop messages.
    """

    COUNTS = ("examples", "skipped", "dropped", "truncated", "tokens", "loss_tokens")

    def __init__(self):
        self._lock = threading.Lock()
        self.examples = self.skipped = self.dropped = self.truncated = self.tokens = self.loss_tokens = 0
        self.problems: list[str] = []

    def add(self, problem: str | None = None, **counts: int) -> None:
        """Adds to the named counters and keeps `problem` if fewer than MAX_PROBLEMS are kept."""
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)
            if problem is not None and len(self.problems) < MAX_PROBLEMS:
                self.problems.append(problem)

    def as_dict(self) -> dict[str, Any]:
        """The counters and the kept problem messages, as plain values (for logs)."""
        with self._lock:
            return {**{name: getattr(self, name) for name in self.COUNTS}, "problems": list(self.problems)}


# ----------------------------------------------------------------------------- the pipeline


class Examples:
    """index -> an encoded example {"tokens", "loss_mask", ...} [T], or with `rows` a padded row; None when the
    record is skipped or dropped, or with `fill` an empty row instead (also past the source's end).

    Subclasses define `encode(index)` (a record -> its token ids; DataError for a malformed record, skipped under
    data.on_error=skip), `fit(encoded, where) -> (example, truncated) | str` (data.truncation; a str says why it
    was dropped; its DataError for truncation=error always stops) and `row(example | None)`.
    """

    def __init__(self, source, tokenizer: Tokenizer, section: DataSection, stats: DataStats, *,
                 rows: bool, fill: bool, give_up_after: int):
        self.source, self.tokenizer, self.section, self.stats = source, tokenizer, section, stats
        self.rows, self.fill, self.give_up_after = rows, fill, give_up_after
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def __call__(self, index: int) -> dict[str, np.ndarray] | None:
        example = self._example(index) if index < len(self.source) else None
        if example is None and not self.fill:
            return None
        return self.row(example) if self.rows else example

    def encode(self, index: int) -> tuple[object, str]:
        raise NotImplementedError

    def fit(self, encoded, where: str) -> tuple[dict[str, np.ndarray], bool] | str:
        raise NotImplementedError

    def row(self, example: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def record(self, index: int) -> tuple[dict, str]:
        """The source's record `index` and where it is (for messages)."""
        record = self.source[index]
        return record, record.get("_where", f"record {index}") if isinstance(record, dict) else f"record {index}"

    def _example(self, index: int) -> dict[str, np.ndarray] | None:
        try:
            encoded, where = self.encode(index)
        except DataError as e:
            if self.section.on_error != "skip":
                raise
            self._reject(f"skipped {e}", skipped=1)
            return None
        fitted = self.fit(encoded, where)
        if isinstance(fitted, str):
            self._reject(f"dropped {fitted}", dropped=1)
            return None
        example, truncated = fitted
        self.stats.add(examples=1, truncated=int(truncated), tokens=len(example["tokens"]),
                       loss_tokens=int(example["loss_mask"].sum()))
        return example

    def _reject(self, problem: str, **counts: int) -> None:
        """Counts a skipped or dropped record; DataError once every record read so far was rejected
        (an all-bad source would otherwise loop forever when repeated)."""
        self.stats.add(problem, **counts)
        stats = self.stats
        if stats.examples == 0 and stats.skipped + stats.dropped >= self.give_up_after:
            raise DataError(f"none of the {stats.skipped + stats.dropped} records read so far could be used "
                            f"({stats.skipped} skipped, {stats.dropped} dropped), the first: {stats.problems[0]}")

    def empty_row(self, dtypes: dict[str, type]) -> dict[str, np.ndarray]:
        """A row of max_length per key: tokens the pad id, everything else 0."""
        length = self.section.max_length
        return {k: np.full(length, self.pad_id if k == "tokens" else 0, dtype) for k, dtype in dtypes.items()}


class _SFTExamples(Examples):
    """SFT records: encode_example, then fit_length."""

    def encode(self, index: int) -> tuple[tuple[np.ndarray, np.ndarray], str]:
        record, where = self.record(index)
        return encode_example(record, self.tokenizer, self.section), where

    def fit(self, encoded: tuple[np.ndarray, np.ndarray], where: str) -> tuple[dict[str, np.ndarray], bool] | str:
        ids, mask = encoded
        fitted = fit_length(ids, mask, self.section, where)
        if fitted is None:
            reason = "too long" if self.section.truncation == "drop" else "no target left after truncation"
            return f"{where}: {len(ids)} tokens > data.max_length={self.section.max_length}, {reason}"
        return {"tokens": fitted[0], "loss_mask": fitted[1]}, len(fitted[0]) < len(ids)

    def row(self, example: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """One example alone in a row of max_length (an empty row when None)."""
        row = self.empty_row(dict.fromkeys(BATCH_KEYS, np.int32))
        n = 0 if example is None else len(example["tokens"])
        if n:
            row["tokens"][:n], row["loss_mask"][:n] = example["tokens"], example["loss_mask"]
            row["positions"][:n], row["segment_ids"][:n] = np.arange(n), 1
        return row


def _packed_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packer output (tokens, tokens_segment_ids, tokens_positions, loss_mask, ...) -> BATCH_KEYS."""
    return {"tokens": packed["tokens"], "positions": packed["tokens_positions"],
            "segment_ids": packed["tokens_segment_ids"], "loss_mask": packed["loss_mask"]}


def sft_dataset(source, section: DataSection, tokenizer: Tokenizer, *, batch_size: int, seed: int,
                shard_index: int = 0, shard_count: int = 1,
                train: bool = True) -> tuple[grain.IterDataset, DataStats]:
    """Batches of SFT rows from `source` for this host: dicts of np.int32 [batch_size, max_length] with
    BATCH_KEYS, and the pipeline's DataStats.

    `batch_size` is this host's (the global batch / shard_count). train: shuffled by `seed` (a new order
    each epoch) if data.shuffle, data.epochs passes (None: forever), packed if data.packing, last partial
    batch dropped. Eval (train=False): one pass in order, never packed, skipped records and the tail padded
    with empty rows (segment 0), so every host gets the same number of full-shape batches.
    `iter(ds)` has get_state()/set_state() for exact resume.
    """
    check_shard(shard_index, shard_count, batch_size, source)
    stats = DataStats()
    pack = train and section.packing
    examples = _SFTExamples(source, tokenizer, section, stats, rows=not pack, fill=not train,
                            give_up_after=len(source) * shard_count)
    ds = batched(examples, section, batch_size=batch_size, seed=seed, shard_index=shard_index,
                 shard_count=shard_count, train=train, pack_keys=("tokens", "loss_mask"), packed_row=_packed_row)
    return ds, stats


def check_shard(shard_index: int, shard_count: int, batch_size: int, source) -> None:
    """ValueError / DataError for an impossible shard, batch size or an empty source."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is outside 0..{shard_count - 1}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(source) == 0:
        raise DataError(f"the data source {source!r:.200} is empty; check data.train / data.eval")


def batched(examples: Examples, section: DataSection, *, batch_size: int, seed: int, shard_index: int,
            shard_count: int, train: bool, pack_keys: tuple[str, ...], packed_row) -> grain.IterDataset:
    """The grain pipeline over `examples` (see sft_dataset for the order, sharding and eval padding); packing
    (train and data.packing) packs `pack_keys` into rows and maps grain's output through `packed_row`."""
    size = len(examples.source)
    if train:
        ds = grain.MapDataset.range(size)
        if section.shuffle:
            ds = ds.shuffle(seed=seed % 2**32)  # indices past one epoch get a new order per epoch
        ds = ds.repeat(section.epochs)
    else:
        ds = grain.MapDataset.range(math.ceil(size / (shard_count * batch_size)) * shard_count * batch_size)
    ds = ds[shard_index::shard_count].map(examples)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=section.num_threads, prefetch_buffer_size=READ_AHEAD))
    if train and section.packing:
        ds = grain.experimental.BestFitPackIterDataset(
            ds, length_struct=dict.fromkeys(pack_keys, section.max_length),
            num_packing_bins=max(PACKING_BINS, batch_size), shuffle_bins=False,
            padding_struct={k: examples.pad_id if k == "tokens" else 0 for k in pack_keys},
        ).map(packed_row)
    ds = ds.batch(batch_size, drop_remainder=train)
    if section.prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=section.prefetch)
    return ds
