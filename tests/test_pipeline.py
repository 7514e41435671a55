"""SFT pipeline: record kinds give the right ids and masks; truncation, skipping, packing, shuffling, per-host
sharding, exact resume and eval padding, through the public API with real tokenizers."""

import json
import threading
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from tokenizer_folders import make_tokenizer_folder

from polm_jax.config import DataSection
from polm_jax.data.pipeline import (
    BATCH_KEYS,
    DataStats,
    encode_example,
    fit_length,
    sft_dataset,
)
from polm_jax.data.tokenizer import load_tokenizer
from polm_jax.errors import DataError

TURN_TEXT = {"qwen2": "{}<|im_end|>\n", "llama3": "{}<|eot_id|>", "gemma": "{}<end_of_turn>\n"}
CHAT = [
    {"role": "user", "content": "What is two plus three?"},
    {"role": "assistant", "content": "Five."},
    {"role": "user", "content": "And café 東京?"},
    {"role": "assistant", "content": "☃ 東京 café"},
]


class ListSource:
    """An in-memory record source like sources.py's: records get a "_where"; an exception entry is raised."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        if isinstance(record, Exception):
            raise record
        return {**record, "_where": f"mem.jsonl:{index + 1}"}


@pytest.fixture(scope="module", params=["qwen2", "llama3", "gemma"])
def tok(request, tmp_path_factory):
    return load_tokenizer(make_tokenizer_folder(tmp_path_factory.mktemp("tok") / request.param, request.param))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return load_tokenizer(make_tokenizer_folder(tmp_path_factory.mktemp("tok") / "qwen2", "qwen2"))


def family(tok):
    return tok.folder.name


def masked_text(tok, ids, mask):
    return tok.decode(ids[mask == 1], skip_special_tokens=False)


def texts(n, words=3):
    """n distinct text records of varied length."""
    return [{"text": " ".join([f"item {i}"] + ["the quick brown fox"] * (i % words))} for i in range(n)]


def section(**options):
    return DataSection(**{"max_length": 64, "num_threads": 2, "prefetch": 2, **options})


def take(it, n):
    return [next(it) for _ in range(n)]


def rows_of(batches):
    """Every non-padding row's example tokens, in order, as tuples (unpacked batches)."""
    out = []
    for batch in batches:
        for tokens, segments in zip(batch["tokens"], batch["segment_ids"]):
            if segments.any():
                out.append(tuple(tokens[segments == 1]))
    return out


def order(ds, tok, records, sec):
    """The record indices in the order the (unpacked) dataset yields them."""
    index = {tuple(encode_example(r, tok, sec)[0]): i for i, r in enumerate(records)}
    return [index[row] for row in rows_of(iter(ds))]


# ----------------------------------------------------------------------------- record kinds


def test_prompt_completion(tok):
    record = {"_where": "d.jsonl:1", "prompt": "What is two plus three?", "completion": " Five. 🙂"}
    ids, mask = encode_example(record, tok, section())
    assert ids.dtype == mask.dtype == np.int32
    expected = [*tok.encode(record["prompt"]), *tok.encode(record["completion"], add_special_tokens=False), tok.eos_id]
    assert ids.tolist() == expected
    assert (ids[0] == tok.bos_id) == (family(tok) != "qwen2")
    eos = tok.special_tokens["eos_token"]
    assert masked_text(tok, ids, mask) == tok.decode(tok.encode(" Five. 🙂", False), False) + eos
    assert mask.sum() == len(tok.encode(" Five. 🙂", False)) + 1
    _, everything = encode_example(record, tok, section(completion_only_loss=False))
    assert everything.tolist() == [0] + [1] * (len(ids) - 1)  # nothing predicts the first token


def test_messages_mask_is_the_assistant_turns(tok):
    ids, mask = encode_example({"messages": CHAT}, tok, section())
    turn = TURN_TEXT[family(tok)]
    assert masked_text(tok, ids, mask) == turn.format("Five.") + turn.format("☃ 東京 café")
    _, everything = encode_example({"messages": CHAT}, tok, section(assistant_only_loss=False))
    assert everything.tolist() == [0] + [1] * (len(ids) - 1)


def test_conversational_prompt_completion_masks_the_completion(tok):
    record = {"prompt": CHAT[:3], "completion": CHAT[3:]}
    ids, mask = encode_example(record, tok, section())
    assert ids.tolist() == encode_example({"messages": CHAT}, tok, section())[0].tolist()
    assert masked_text(tok, ids, mask) == TURN_TEXT[family(tok)].format("☃ 東京 café")


def test_text(tok):
    ids, mask = encode_example({"text": "Hello world"}, tok, section())
    assert ids.tolist() == [*tok.encode("Hello world"), tok.eos_id]
    assert mask.tolist() == [0] + [1] * (len(ids) - 1)


@pytest.mark.parametrize("record, message", [
    ({"question": "hi"}, r"no 'messages', 'prompt'/'completion' or 'text' field \(found \['question'\]\)"),
    ({"prompt": "hi"}, "has prompt but no 'completion'"),
    ({"prompt": "hi", "completion": 5}, "must both be strings or both lists of messages, got str and int"),
    ({"prompt": "hi", "completion": ""}, "'completion' is empty"),
    ({"prompt": CHAT[:1], "completion": []}, "'completion' is an empty list"),
    ({"text": ""}, "'text' must be a non-empty string"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"content": "no role"}]}, "messages\\[0\\] must be a dict with a string 'role'"),
    ({"messages": CHAT[:1]}, "no token to learn from"),
])
def test_bad_records_name_the_record_and_the_expected_fields(qwen, record, message):
    with pytest.raises(DataError, match=message) as e:
        encode_example({**record, "_where": "bad.jsonl:7"}, qwen, section())
    assert str(e.value).startswith("bad.jsonl:7: ")


# ----------------------------------------------------------------------------- truncation


def test_fit_length_policies():
    ids, mask = np.arange(10, dtype=np.int32), np.array([0] * 4 + [1] * 6, np.int32)
    sec = section(max_length=6)
    with pytest.raises(DataError) as e:
        fit_length(ids, mask, sec, "d.jsonl:3")
    for part in ("d.jsonl:3", "10 tokens", "max_length=6", "data.truncation=drop|truncate_left|truncate_right"):
        assert part in str(e.value)
    assert fit_length(ids, mask, replace(sec, truncation="drop"), "w") is None
    left = fit_length(ids, mask, replace(sec, truncation="truncate_left"), "w")
    right = fit_length(ids, mask, replace(sec, truncation="truncate_right"), "w")
    assert left[0].tolist() == [4, 5, 6, 7, 8, 9] and right[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert left[1].tolist() == [0] + [1] * 5 and right[1].tolist() == [0, 0, 0, 0, 1, 1]
    assert fit_length(ids, mask, replace(sec, max_length=10), "w")[0] is ids
    assert fit_length(ids, mask, replace(sec, max_length=4, truncation="truncate_right"), "w") is None  # no target


@pytest.mark.parametrize("truncation", ["drop", "truncate_left", "truncate_right"])
def test_pipeline_counts_drops_and_truncations(qwen, truncation):
    records = [{"prompt": "short", "completion": " yes"}, {"prompt": "long " * 40, "completion": " answer " * 3},
               {"prompt": "hi", "completion": " done " * 40}]
    sec = section(max_length=32, truncation=truncation, packing=False, shuffle=False, epochs=1)
    ds, stats = sft_dataset(ListSource(records), sec, qwen, batch_size=1, seed=0)
    rows = rows_of(iter(ds))
    full = [encode_example(r, qwen, sec)[0].tolist() for r in records]
    if truncation == "drop":
        assert rows == [tuple(full[0])] and stats.dropped == 2 and stats.truncated == 0
    elif truncation == "truncate_left":
        assert rows == [tuple(full[0]), tuple(full[1][-32:]), tuple(full[2][-32:])] and stats.truncated == 2
    else:  # the long prompt loses its whole completion: dropped
        assert rows == [tuple(full[0]), tuple(full[2][:32])] and (stats.truncated, stats.dropped) == (1, 1)
    assert stats.examples == len(rows)


def test_pipeline_stops_on_too_long_example_naming_it(qwen):
    records = [{"text": "fine"}, {"text": "the quick brown fox " * 30}]
    ds, _ = sft_dataset(ListSource(records), section(shuffle=False, on_error="skip"), qwen, batch_size=1, seed=0)
    with pytest.raises(DataError, match=r"^mem.jsonl:2: \d+ tokens, longer than data.max_length=64"):
        list(iter(ds))


# ----------------------------------------------------------------------------- bad records in the pipeline


BAD = [{"text": "one"}, DataError("mem.jsonl:2: not valid JSON (line 2, column 5)"), {"prompt": "p"},
       {"text": "two"}, {"prompt": "p", "completion": ""}, {"text": "three"}]


def test_on_error_skip_counts_and_skips(qwen):
    sec = section(on_error="skip", shuffle=False, epochs=1, packing=False)
    ds, stats = sft_dataset(ListSource(BAD), sec, qwen, batch_size=1, seed=0)
    assert [qwen.decode(row) for row in rows_of(iter(ds))] == ["one", "two", "three"]
    assert (stats.examples, stats.skipped, stats.dropped) == (3, 3, 0)
    assert [p.split(":")[1] for p in stats.problems] == ["2", "3", "5"]
    assert "not valid JSON" in stats.problems[0] and "'completion' is empty" in stats.problems[2]
    assert json.loads(json.dumps(stats.as_dict()))["skipped"] == 3


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("bad, message", [(1, "^mem.jsonl:2: not valid JSON"), (2, "^mem.jsonl:3: has prompt but"),
                                          (4, "^mem.jsonl:5: 'completion' is empty")])
def test_on_error_error_raises_the_data_error_itself(qwen, packing, bad, message):
    records = [BAD[0]] * bad + [BAD[bad]]  # the bad record keeps its line number
    ds, _ = sft_dataset(ListSource(records), section(shuffle=False, packing=packing), qwen, batch_size=1, seed=0)
    with pytest.raises(DataError, match=message):
        take(iter(ds), 20)


def test_all_records_bad_is_an_error_not_an_endless_loop(qwen):
    ds, _ = sft_dataset(ListSource([{"prompt": "p"}] * 5), section(on_error="skip"), qwen, batch_size=2, seed=0)
    message = r"none of the \d+ records read so far could be used .*the first: skipped mem.jsonl:\d: has prompt but"
    with pytest.raises(DataError, match=message):
        next(iter(ds))


# ----------------------------------------------------------------------------- packing


def test_packing_keeps_examples_whole_with_their_masks(qwen):
    records = [{"messages": [{"role": "user", "content": f"q {i} " * (i % 4)}, {"role": "assistant", "content":
                f"a {i} " * (1 + i % 5)}]} for i in range(30)] + [{"prompt": f"p {i}", "completion": f" c {i}"}
                                                                   for i in range(10)]
    sec = section(max_length=96, shuffle=False, epochs=1)
    ds, stats = sft_dataset(ListSource(records), sec, qwen, batch_size=1, seed=0)
    batches = list(iter(ds))
    segments = []
    for batch in batches:
        assert set(batch) == set(BATCH_KEYS) and all(v.shape == (1, 96) and v.dtype == np.int32 for v in batch.values())
        tokens, positions, segment_ids, loss_mask = (batch[k][0] for k in BATCH_KEYS)
        count = segment_ids.max()
        used = segment_ids > 0
        assert used[: used.sum()].all()  # padding only at the end
        assert (segment_ids[used] == np.repeat(np.arange(1, count + 1), np.bincount(segment_ids[used])[1:])).all()
        assert (tokens[~used] == qwen.pad_id).all() and not loss_mask[~used].any() and not positions[~used].any()
        for s in range(1, count + 1):
            where = segment_ids == s
            assert positions[where].tolist() == list(range(where.sum())) and loss_mask[where][0] == 0
            segments.append((tuple(tokens[where]), tuple(loss_mask[where])))
    expected = [tuple(map(tuple, encode_example(r, qwen, sec))) for r in records]
    assert Counter(segments) == Counter(expected)  # every example once, whole, with its own mask
    total = sum(int(b["loss_mask"].sum()) for b in batches)
    assert total == sum(sum(m) for _, m in expected) and len(batches) < len(records) / 2
    assert stats.examples == len(records)


def test_assistant_only_loss_survives_packing(qwen):
    records = [{"messages": CHAT}] * 6
    ds, _ = sft_dataset(ListSource(records), section(max_length=128, shuffle=False, epochs=1), qwen,
                        batch_size=1, seed=0)
    batch = next(iter(ds))
    assert batch["segment_ids"][0].max() > 1
    turn = TURN_TEXT["qwen2"]
    for s in range(1, batch["segment_ids"][0].max() + 1):
        where = batch["segment_ids"][0] == s
        assert masked_text(qwen, batch["tokens"][0][where], batch["loss_mask"][0][where]) == \
            turn.format("Five.") + turn.format("☃ 東京 café")


def test_unpacked_rows_are_padded(qwen):
    sec = section(packing=False, shuffle=False, epochs=1)
    ds, _ = sft_dataset(ListSource([{"text": "Hello world"}]), sec, qwen, batch_size=1, seed=0)
    batch = next(iter(ds))
    ids, _ = encode_example({"text": "Hello world"}, qwen, sec)
    n = len(ids)
    assert batch["tokens"][0, :n].tolist() == ids.tolist() and (batch["tokens"][0, n:] == qwen.pad_id).all()
    assert batch["segment_ids"][0].tolist() == [1] * n + [0] * (64 - n)
    assert batch["positions"][0].tolist() == list(range(n)) + [0] * (64 - n)


# ----------------------------------------------------------------------------- order


def test_shuffle_is_by_seed_with_a_new_order_each_epoch(qwen):
    records = texts(16)
    sec = section(packing=False, epochs=2)

    def run(seed, sec=sec):
        return order(sft_dataset(ListSource(records), sec, qwen, batch_size=4, seed=seed)[0], qwen, records, sec)

    first = run(seed=3)
    assert len(first) == 32 and first == run(seed=3)
    assert sorted(first[:16]) == sorted(first[16:]) == list(range(16))
    assert first[:16] != first[16:] and first[:16] != list(range(16))
    assert run(seed=4) != first
    assert run(seed=3, sec=replace(sec, shuffle=False)) == list(range(16)) * 2


def test_one_epoch_ends_and_drops_the_partial_batch(qwen):
    ds, _ = sft_dataset(ListSource(texts(10)), section(packing=False, epochs=1), qwen, batch_size=4, seed=0)
    assert len(list(iter(ds))) == 2


def test_hosts_share_the_global_batches(qwen):
    records = texts(24)
    sec = section(packing=False, epochs=2)
    single = list(iter(sft_dataset(ListSource(records), sec, qwen, batch_size=8, seed=5)[0]))
    hosts = [list(iter(sft_dataset(ListSource(records), sec, qwen, batch_size=2, seed=5, shard_index=h,
                                   shard_count=4)[0])) for h in range(4)]
    assert len(single) == 6 and all(len(h) == 6 for h in hosts)
    for step, batch in enumerate(single):
        union = Counter(row for h in hosts for row in rows_of([h[step]]))
        assert union == Counter(rows_of([batch]))


@pytest.mark.parametrize("packing", [False, True])
def test_resume_reproduces_the_following_batches(qwen, packing):
    records = [{"prompt": f"question {i} " * (1 + i % 3), "completion": f" answer {i}"} for i in range(30)]
    sec = section(packing=packing, max_length=48)
    ds, _ = sft_dataset(ListSource(records), sec, qwen, batch_size=3, seed=1)
    it = iter(ds)
    take(it, 7)
    state = it.get_state()
    assert json.loads(json.dumps(state)) == state  # plain values: the checkpoint can store it
    expected = take(it, 12)
    resumed = iter(sft_dataset(ListSource(records), sec, qwen, batch_size=3, seed=1)[0])
    resumed.set_state(state)
    for a, b in zip(expected, take(resumed, 12)):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


# ----------------------------------------------------------------------------- eval


def test_eval_is_one_ordered_pass_with_a_padded_last_batch(qwen):
    records = texts(10)
    sec = section(packing=True)  # eval rows are never packed
    ds, _ = sft_dataset(ListSource(records), sec, qwen, batch_size=4, seed=0, train=False)
    batches = list(iter(ds))
    assert len(batches) == 3 and all(b[k].shape == (4, 64) for b in batches for k in BATCH_KEYS)
    assert order(ds, qwen, records, sec) == list(range(10))
    assert batches[-1]["segment_ids"][2:].sum() == 0 and batches[-1]["segment_ids"][:2].any(axis=1).all()


def test_eval_hosts_get_equal_batch_counts_and_skips_become_padding(qwen):
    records = texts(11)
    records[4] = {"prompt": "no completion"}
    sec = section(on_error="skip")
    hosts = [list(iter(sft_dataset(ListSource(records), sec, qwen, batch_size=2, seed=0, shard_index=h,
                                   shard_count=3, train=False)[0])) for h in range(3)]
    assert [len(h) for h in hosts] == [2, 2, 2]
    assert sum(len(rows_of(h)) for h in hosts) == 10


def test_data_stats_count_from_many_threads():
    stats = DataStats()
    threads = [threading.Thread(target=lambda: [stats.add("x", examples=1, tokens=2) for _ in range(1000)])
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.as_dict() == {"examples": 8000, "skipped": 0, "dropped": 0, "truncated": 0, "tokens": 16000,
                               "loss_tokens": 0, "problems": ["x"] * 5}
