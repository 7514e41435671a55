"""Record sources: JSONL, ArrayRecord, TFDS (a tiny builder prepared here, no TensorFlow) and synthetic records."""

import json
import pickle
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow_datasets as tfds

from polm_jax.config import DataSection
from polm_jax.data.sources import open_source, open_sources, write_array_record
from polm_jax.data.synthetic import arithmetic
from polm_jax.errors import DataError

RECORDS = [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "Café 東京 🙂?", "answer": "ja"},
           {"question": "x", "answer": "y", "extra": [1, {"k": None}]}]


def write_jsonl(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def plain(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "_where"}


# ----------------------------------------------------------------------------- JSONL


def test_jsonl_records_and_line_numbers(tmp_path):
    lines = [json.dumps(RECORDS[0]), "", "   \t", json.dumps(RECORDS[1], ensure_ascii=False) + "\r",
             "", json.dumps(RECORDS[2])]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    source = open_source(path, DataSection())
    assert source.name == path and len(source) == 3
    assert [plain(source[i]) for i in range(3)] == RECORDS
    assert [source[i]["_where"] for i in range(3)] == [f"{path}:1", f"{path}:4", f"{path}:6"]
    assert source[-1] == source[2]
    with pytest.raises(IndexError):
        source[3]


def test_jsonl_last_line_without_newline(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}')
    source = open_source(str(path), DataSection())
    assert [(r["a"], r["_where"]) for r in source] == [(1, f"{path}:1"), (2, f"{path}:3")]


def test_jsonl_bad_lines_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ['{"a": 1}', "", '{"a": }', "[1, 2]", '"text"'])
    source = open_source(path, DataSection())
    assert len(source) == 4 and source[0]["a"] == 1
    with pytest.raises(DataError, match=re.escape(f"{path}:3: invalid JSON at column 7: Expecting value")):
        source[1]
    with pytest.raises(DataError, match=re.escape(f"{path}:4: expected a JSON object") + ".*an array"):
        source[2]
    with pytest.raises(DataError, match=re.escape(f"{path}:5: expected a JSON object") + ".*a string"):
        source[3]


def test_jsonl_glob_concatenates_sorted_files(tmp_path):
    second = write_jsonl(tmp_path / "part-1.jsonl", [json.dumps(RECORDS[2])])
    first = write_jsonl(tmp_path / "part-0.jsonl", [json.dumps(r) for r in RECORDS[:2]])
    source = open_source(str(tmp_path / "part-*.jsonl"), DataSection())
    assert source.name == str(tmp_path / "part-*.jsonl") and len(source) == 3
    assert [plain(r) for r in source] == RECORDS
    assert [r["_where"] for r in source] == [f"{first}:1", f"{first}:2", f"{second}:1"]


def test_columns_rename_fields(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(RECORDS[0]), '{"question": "q", "prompt": "p"}'])
    source = open_source(path, DataSection(columns={"question": "prompt", "answer": "completion"}))
    assert source[0] == {"prompt": "What is 2 + 3?", "completion": "5", "_where": f"{path}:1"}
    with pytest.raises(DataError, match=re.escape(f"{path}:2: data.columns renames a field to 'prompt'")):
        source[1]


def test_sources_read_from_threads_and_pickle(tmp_path):
    lines = [json.dumps({"i": i, "pad": "x" * (i % 7)}) for i in range(500)]
    source = open_source(write_jsonl(tmp_path / "data.jsonl", lines), DataSection())
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda i: source[i]["i"], range(500))) == list(range(500))
    copy = pickle.loads(pickle.dumps(source))
    assert [copy[i] for i in (0, 499)] == [source[i] for i in (0, 499)]


def test_open_sources_concatenates_and_needs_one(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(r) for r in RECORDS])
    source = open_sources([path, "synthetic:arithmetic:4"], DataSection())
    assert len(source) == 7
    assert source[2]["_where"] == f"{path}:3" and source[3]["_where"] == "synthetic:arithmetic:4#0"
    assert plain(source[6]) == arithmetic(4)[3]
    with pytest.raises(DataError, match="set data.train"):
        open_sources([], DataSection())


@pytest.mark.parametrize("spec", ["data.csv", "data.json", "hf:gsm8k", "tfds:", "synthetic:poetry", "synthetic:arithmetic:x"])
def test_unknown_specs_are_errors(spec):
    with pytest.raises(DataError, match=re.escape(spec)):
        open_source(spec, DataSection())


def test_missing_files_are_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_source(str(tmp_path / "missing.jsonl"), DataSection())
    with pytest.raises(DataError, match="no files match"):
        open_source(str(tmp_path / "*.array_record"), DataSection())


# ----------------------------------------------------------------------------- ArrayRecord


def test_array_record_round_trip(tmp_path):
    path = str(tmp_path / "data.array_record")
    assert write_array_record(path, [*RECORDS, {**RECORDS[0], "_where": "elsewhere:1"}]) == 4
    source = open_source(path, DataSection(columns={"question": "prompt"}))
    assert len(source) == 4
    assert source[1] == {"prompt": "Café 東京 🙂?", "answer": "ja", "_where": f"{path}#1"}
    assert plain(source[3]) == plain(source[0])  # the written "_where" was dropped
    assert pickle.loads(pickle.dumps(source))[2] == source[2]


def test_array_record_glob_and_bad_record(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    write_array_record(tmp_path / "a.array_record", RECORDS[:2])
    writer = ArrayRecordWriter(str(tmp_path / "b.array_record"), "group_size:1")
    for data in (json.dumps(RECORDS[2]).encode(), b"[1, 2]", b"{not json"):
        writer.write(data)
    writer.close()
    source = open_source(str(tmp_path / "*.array_record"), DataSection())
    assert len(source) == 5 and [plain(source[i]) for i in range(3)] == RECORDS
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'b.array_record'}#1: expected a JSON object")):
        source[3]
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'b.array_record'}#2: invalid JSON")):
        source[4]


# ----------------------------------------------------------------------------- TFDS


class PolmTinyQa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tiny text dataset; unregistered, so it is found only through the files it prepares (as any
    dataset prepared elsewhere would be)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({
            "question": tfds.features.Text(), "answer": tfds.features.Text(), "id": np.int32,
            "score": np.float32, "tags": tfds.features.Sequence(tfds.features.Text()),
        })
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(5), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"question": f"Q{i}: 東京?", "answer": str(i * i), "id": i, "score": i / 2,
                      "tags": ["tag", "ü"][: i % 3]}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfds")
    PolmTinyQa(data_dir=str(folder), file_format="array_record").download_and_prepare()
    return str(folder)


def test_tfds_records_are_plain_python(tfds_dir):
    section = DataSection(tfds_data_dir=tfds_dir, columns={"question": "prompt", "answer": "completion"})
    source = open_source("tfds:polm_tiny_qa:train", section)
    assert source.name == "tfds:polm_tiny_qa:train" and len(source) == 5
    records = sorted((source[i] for i in range(5)), key=lambda r: r["id"])  # TFDS shuffles at preparation
    for i, record in enumerate(records):
        assert {k: v for k, v in record.items() if k != "_where"} == {
            "prompt": f"Q{i}: 東京?", "completion": str(i * i), "id": i, "score": i / 2, "tags": ["tag", "ü"][: i % 3]}
        assert type(record["id"]) is int and type(record["score"]) is float
    assert sorted(source[i]["_where"] for i in range(5)) == [f"tfds:polm_tiny_qa:train#{i}" for i in range(5)]
    assert pickle.loads(pickle.dumps(source))[3] == source[3]


def test_tfds_split_and_version(tfds_dir):
    section = DataSection(tfds_data_dir=tfds_dir)
    test = open_source("tfds:polm_tiny_qa:1.0.0:test", section)
    assert len(test) == 2 and test[0]["_where"] == "tfds:polm_tiny_qa:1.0.0:test#0"
    assert len(open_source("tfds:polm_tiny_qa:train[:3]", section)) == 3
    with pytest.raises(DataError, match="split 'validation'"):
        open_source("tfds:polm_tiny_qa:validation", section)


def test_tfds_missing_dataset_says_what_to_do(tfds_dir, tmp_path):
    with pytest.raises(DataError, match=f"tfds:polm_no_such_dataset: not found in {re.escape(tfds_dir)}.*tfds build"):
        open_source("tfds:polm_no_such_dataset", DataSection(tfds_data_dir=tfds_dir))
    with pytest.raises(DataError, match=f"tfds:polm_tiny_qa: not found in {re.escape(str(tmp_path))}"):
        open_source("tfds:polm_tiny_qa", DataSection(tfds_data_dir=str(tmp_path)))


# ----------------------------------------------------------------------------- synthetic


def test_arithmetic_is_deterministic_and_correct():
    records = arithmetic(300, seed=1)
    assert records == arithmetic(300, seed=1) and records[:50] == arithmetic(50, seed=1)
    assert records != arithmetic(300, seed=2)
    assert {r["prompt"].split()[3] for r in records} == {"+", "-", "*"}
    for record in records:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", record["prompt"]).groups()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert record["completion"] == record["answer"] == str(expected)
        assert len(record["prompt"] + record["completion"]) < 40


def test_synthetic_source():
    source = open_source("synthetic:arithmetic", DataSection())
    assert len(source) == 2000 and source[3] == {**arithmetic(4)[3], "_where": "synthetic:arithmetic#3"}
    assert [plain(r) for r in open_source("synthetic:arithmetic:10:7", DataSection())] == arithmetic(10, seed=7)
