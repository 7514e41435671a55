"""Record sources: random access to the records of JSONL files, TFDS datasets, ArrayRecord files and
synthetic tasks, as grain's data sources read them (`len(source)`, `source[i]`, from several threads).

    source = open_sources(["data/train-*.jsonl", "tfds:gsm8k:train"], config.data)
    source[0]  # {"question": ..., "answer": ..., "_where": "data/train-00.jsonl:1"}

Spec forms (data.train, data.eval):
- `x.jsonl`, or a glob of them (files in sorted order): one JSON object per non-blank line, parsed when read;
- `tfds:NAME[:SPLIT]` (split default train; NAME as TFDS spells it, e.g. `gsm8k`): a TFDS
  dataset prepared as array_record files in data.tfds_data_dir, read without TensorFlow;
- `x.array_record`, or a glob of them: each record one UTF-8 JSON object (as `write_array_record` writes);
- `synthetic:TASK[:N[:SEED]]` (N default 2000, seed 0): made on the spot by polm_jax.data.synthetic; TASK is
  arithmetic (SFT, RL), arithmetic_pairs (preference pairs) or arithmetic_kto (unpaired, labelled).

Every record is a plain dict with fields renamed by data.columns and one extra key, "_where", that
locates it for error messages: `data.jsonl:12` (line), `tfds:gsm8k:train#41`, `x.array_record#7`,
`synthetic:arithmetic#3` (index).
"""

from __future__ import annotations

import abc
import bisect
import glob
import itertools
import json
import operator
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from polm_jax.config import DataSection
from polm_jax.data import synthetic
from polm_jax.errors import DataError

SPEC_FORMS = "x.jsonl, x.array_record (or a glob of either), tfds:NAME[:SPLIT] or synthetic:TASK[:N[:SEED]]"
SYNTHETIC_TASKS = {"arithmetic": synthetic.arithmetic, "arithmetic_pairs": synthetic.arithmetic_pairs,
                   "arithmetic_kto": synthetic.arithmetic_kto, "parity_pairs": synthetic.parity_pairs}
SYNTHETIC_DEFAULT_N = 2000
_TFDS_SPEC = re.compile(r"tfds:(?P<name>[^:\[\]]+(?::[0-9*]+\.[0-9*]+\.[0-9*]+)?)(?::(?P<split>.+))?")
_SCAN_CHUNK = 1 << 22  # bytes read at a time while indexing a JSONL file
_WHITESPACE = b" \t\r\n"  # JSON whitespace: lines of only these are blank
_FIX = "fix the record, or set data.on_error: skip to skip such records"


def open_source(spec: str, section: DataSection) -> RecordSource:
    """The records named by one spec (see the module docstring), fields renamed by `section.columns`."""
    if spec.startswith("tfds:"):
        return _open_tfds(spec, section)
    if spec.startswith("synthetic:"):
        return _open_synthetic(spec, section)
    if spec.endswith(".jsonl"):
        return _open_files(spec, JsonlSource, section)
    if spec.endswith(".array_record"):
        return _open_files(spec, ArrayRecordSource, section)
    raise DataError(f"data source {spec!r}: unknown form; use {SPEC_FORMS}")


def open_sources(specs: list[str], section: DataSection, *, key: str = "data.train") -> RecordSource:
    """The records of several specs, one after the other; `key` names the config list in errors."""
    if isinstance(specs, str) or not specs:
        raise DataError(f"{key}: expected a non-empty list of data sources ({SPEC_FORMS}), got {specs!r}; "
                        f"set {key}, e.g. {key}=[data/train.jsonl]")
    sources = [open_source(spec, section) for spec in specs]
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


def write_array_record(path: str | Path, records: Iterable[dict]) -> int:
    """Writes `records` (dicts, e.g. the lines of a JSONL file) to an ArrayRecord file read by
    `open_source`: one UTF-8 JSON object per record, a "_where" key dropped. Returns the count written."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")  # one record per chunk: fast random access
    count = 0
    try:
        for count, record in enumerate(records, 1):
            if not isinstance(record, dict):
                raise DataError(f"write_array_record: record {count - 1} is a {type(record).__name__}, not a dict")
            record = {k: v for k, v in record.items() if k != "_where"}
            writer.write(json.dumps(record, ensure_ascii=False).encode("utf-8"))
    finally:
        writer.close()
    return count


# ----------------------------------------------------------------------------- the interface


class RecordSource(abc.ABC):
    """Random access to records: `len(source)`; `source[i]` is a dict, fields renamed by `columns`,
    plus "_where". `name` is the spec it was opened from. Safe to read from several threads and to pickle."""

    def __init__(self, name: str, columns: dict[str, str] | None = None):
        self.name = name
        self.columns = dict(columns or {})

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _read(self, index: int) -> tuple[dict, str]:
        """Record `index` (0 <= index < len) as stored, and where it is."""

    def __getitem__(self, index: int) -> dict:
        record, where = self._read(_check_index(index, len(self), self.name))
        record = _rename(record, self.columns, where)
        record["_where"] = where
        return record

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} records)"


class ConcatSource(RecordSource):
    """Several sources one after the other: index i runs through the first, then the second, ..."""

    def __init__(self, sources: list[RecordSource], name: str | None = None):
        super().__init__(name or ",".join(s.name for s in sources))
        self.sources = list(sources)
        self._ends = list(itertools.accumulate(len(s) for s in self.sources))  # cumulative lengths

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _read(self, index: int) -> tuple[dict, str]:
        k = bisect.bisect_right(self._ends, index)
        record = self.sources[k][index - (self._ends[k - 1] if k else 0)]  # renamed by its own source
        return record, record["_where"]


def _check_index(index, size: int, name: str) -> int:
    """`index` as an int in [0, size); negative indices count from the end, as for lists."""
    index = operator.index(index)
    if index < 0:
        index += size
    if not 0 <= index < size:
        raise IndexError(f"{name}: index {index} out of range for {size} records")
    return index


def _rename(record: dict, columns: dict[str, str], where: str) -> dict:
    """A copy of `record` with fields renamed by `columns` (old name -> new name)."""
    if not columns:
        return dict(record)
    renamed = {}
    for key, value in record.items():
        new = columns.get(key, key)
        if new in renamed:
            raise DataError(f"{where}: data.columns renames a field to {new!r}, but the record already has "
                            f"a {new!r} field; drop one of them or change data.columns")
        renamed[new] = value
    return renamed


def _json_object(data: bytes, where: str) -> dict:
    """The JSON object in `data` (UTF-8); DataError naming `where` if it is not valid JSON or not an object."""
    try:
        value = json.loads(data)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON at column {e.colno}: {e.msg}; {_FIX}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); {_FIX}") from e
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object {{...}}, found {_json_kind(value)}; {_FIX}")
    return value


def _json_kind(value) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------- files


def _open_files(spec: str, kind: type[RecordSource], section: DataSection) -> RecordSource:
    """One source per file matched by `spec` (a path or a glob), concatenated in sorted order."""
    if not any(c in spec for c in "*?["):
        if not os.path.isfile(os.path.expanduser(spec)):
            raise DataError(f"data source {spec!r}: no such file (from {os.getcwd()})")
        return kind(spec, section.columns)
    paths = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"data source {spec!r}: no files match this pattern (from {os.getcwd()})")
    return ConcatSource([kind(path, section.columns) for path in paths], name=spec)


class JsonlSource(RecordSource):
    """A JSON Lines file: each non-blank line one JSON object, parsed when read. Opening scans the
    file once for line offsets (1-2 s per GB); reads use `os.pread`, so threads share nothing."""

    def __init__(self, path: str | Path, columns: dict[str, str] | None = None):
        super().__init__(str(path), columns)
        self.path = os.path.expanduser(str(path))
        self._starts, self._ends, self._lines = _index_lines(self.path)

    def __len__(self) -> int:
        return len(self._starts)

    def _read(self, index: int) -> tuple[dict, str]:
        where = f"{self.name}:{self._lines[index]}"
        start, size = int(self._starts[index]), int(self._ends[index] - self._starts[index])
        fd = os.open(self.path, os.O_RDONLY)  # per read: no shared file position, no descriptor to pickle
        try:
            data = os.pread(fd, size, start)
        finally:
            os.close(fd)
        if len(data) != size:
            raise DataError(f"{where}: the file shrank since it was opened; do not change data files during a run")
        return _json_object(data, where), where


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte start, byte end and 1-based line number of each non-blank line of `path` (blank: only
    JSON whitespace), from one chunked scan for newlines."""
    starts, ends, numbers = [], [], []
    offset = lines = 0  # the file offset of `tail`, and the number of lines before it
    tail = b""  # the unfinished line at the end of what was read
    with open(path, "rb") as f:
        while chunk := f.read(_SCAN_CHUNK):
            data = tail + chunk
            newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
            if not len(newlines):  # a line longer than a chunk: read on
                tail = data
                continue
            line_starts = np.concatenate([[0], newlines[:-1] + 1])
            keep = _has_content(data, line_starts, newlines)
            starts.append(offset + line_starts[keep])
            ends.append(offset + newlines[keep])
            numbers.append(lines + 1 + np.flatnonzero(keep))
            cut = int(newlines[-1]) + 1
            offset, lines, tail = offset + cut, lines + len(newlines), data[cut:]
    if tail.strip(_WHITESPACE):  # a last line without "\n"
        starts, ends, numbers = [*starts, [offset]], [*ends, [offset + len(tail)]], [*numbers, [lines + 1]]
    return tuple(np.concatenate([np.zeros(0, np.int64), *parts]).astype(np.int64) for parts in (starts, ends, numbers))


def _has_content(data: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Whether each line data[start:end] holds more than JSON whitespace; only lines that start
    with whitespace (rare in JSONL, where lines start with "{") are looked into."""
    first = np.frombuffer(data, np.uint8)[starts]  # an empty line's first byte is its "\n"
    keep = np.ones(len(starts), bool)
    for i in np.flatnonzero(np.isin(first, np.frombuffer(_WHITESPACE, np.uint8))):
        keep[i] = bool(data[starts[i] : ends[i]].strip(_WHITESPACE))
    return keep


class ArrayRecordSource(RecordSource):
    """An ArrayRecord file whose records are UTF-8 JSON objects (see `write_array_record`), read with grain."""

    def __init__(self, path: str | Path, columns: dict[str, str] | None = None):
        import grain

        super().__init__(str(path), columns)
        try:
            self._records = grain.sources.ArrayRecordDataSource(os.path.expanduser(str(path)))
        except Exception as e:  # array_record's C++ reader raises bare ValueErrors and RuntimeErrors
            raise DataError(f"{path}: cannot be read as an ArrayRecord file ({e}); write it with "
                            "polm_jax.data.sources.write_array_record") from e

    def __len__(self) -> int:
        return len(self._records)

    def _read(self, index: int) -> tuple[dict, str]:
        where = f"{self.name}#{index}"
        return _json_object(self._records[index], where), where


# ----------------------------------------------------------------------------- TFDS


def _open_tfds(spec: str, section: DataSection) -> RecordSource:
    match = _TFDS_SPEC.fullmatch(spec)
    if not match:
        raise DataError(f"data source {spec!r}: expected tfds:NAME[:SPLIT], e.g. tfds:gsm8k:train")
    return TfdsSource(match["name"], match["split"] or "train", section.tfds_data_dir, section.columns, spec)


class TfdsSource(RecordSource):
    """A split of a TFDS dataset prepared as array_record files, read with TFDS's random-access data
    source (no TensorFlow); values become plain Python: bytes -> str, numpy -> scalars and lists."""

    def __init__(self, dataset: str, split: str = "train", data_dir: str | None = None,
                 columns: dict[str, str] | None = None, name: str | None = None):
        super().__init__(name or f"tfds:{dataset}:{split}", columns)
        self.location = f"tfds:{dataset}:{split}"
        self._records = _tfds_data_source(dataset, split, data_dir and os.path.expanduser(data_dir))

    def __len__(self) -> int:
        return len(self._records)

    def _read(self, index: int) -> tuple[dict, str]:
        where = f"{self.location}#{index}"
        record = _plain(self._records[index])
        if not isinstance(record, dict):
            raise DataError(f"{where}: the dataset's examples are {type(record).__name__}s, not dicts of "
                            "features; use a dataset whose features are a FeaturesDict")
        return record, where


def _tfds_data_source(dataset: str, split: str, data_dir: str | None):
    """TFDS's random-access data source of one split; DataError saying what to do when it is not there."""
    import tensorflow_datasets as tfds

    where = f"tfds:{dataset}"
    folder = data_dir or "TFDS's default data_dir ($TFDS_DATA_DIR, else ~/tensorflow_datasets)"
    prepare = (f"prepare it there as array_record files: `tfds build {dataset} --file_format array_record"
               f"{f' --data_dir {data_dir}' if data_dir else ''}` (the tfds CLI needs TensorFlow; without it, "
               f"in Python: tfds.builder({dataset!r}, data_dir=..., file_format='array_record')"
               ".download_and_prepare()), or set data.tfds_data_dir to the folder that holds it")
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError, or a builder that fails to load
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{where}: not found in {folder} ({first_line}); {prepare}") from e
    if not builder.is_prepared():
        raise DataError(f"{where}: not prepared in {folder}; {prepare}")
    try:
        return builder.as_data_source(split=split)
    except Exception as e:  # an unknown split, or files in a format without random access (tfrecord)
        raise DataError(f"{where}: cannot read split {split!r} from {builder.data_dir}: {e}") from e


def _plain(value):
    """A TFDS value as plain Python: UTF-8 bytes -> str (other bytes kept), numpy -> Python scalars/lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


# ----------------------------------------------------------------------------- synthetic


def _open_synthetic(spec: str, section: DataSection) -> RecordSource:
    _, task, *rest = spec.split(":")
    if task not in SYNTHETIC_TASKS or len(rest) > 2 or not all(re.fullmatch(r"\d+", r) for r in rest):
        raise DataError(f"data source {spec!r}: expected synthetic:TASK[:N[:SEED]] with TASK one of "
                        f"{sorted(SYNTHETIC_TASKS)} and N, SEED non-negative integers, e.g. synthetic:arithmetic:2000")
    n = int(rest[0]) if rest else SYNTHETIC_DEFAULT_N
    seed = int(rest[1]) if len(rest) > 1 else 0
    return SyntheticSource(spec, SYNTHETIC_TASKS[task](n, seed), section.columns)


class SyntheticSource(RecordSource):
    """Records made in memory (e.g. by `synthetic.arithmetic`); record i is at `{name}#{i}`."""

    def __init__(self, name: str, records: list[dict], columns: dict[str, str] | None = None):
        super().__init__(name, columns)
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def _read(self, index: int) -> tuple[dict, str]:
        return self._records[index], f"{self.name}#{index}"
