"""Typed dataclass configs: YAML files plus dotted command-line overrides, every key and type checked.

    cfg = load_config(Config, "configs/tiny.yaml", ["optim.lr=1e-5", "mesh.rules.embed=[fsdp]"])

The machinery is generic over any tree of dataclasses; the sections at the bottom are polm's.
Errors are `ConfigError`s naming the dotted key and where its value came from (file and line, or
the override). A section may define `validate(self)` raising `ConfigError("field: problem")`;
the field name at the start of the message gets the section prefix and the field's location.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import reprlib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, is_dataclass
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from polm_jax.errors import ConfigError
from polm_jax.models.config import (
    ATTENTION_IMPLS,
    DTYPES,
    LOGPROB_IMPLS,
    REMAT_POLICIES,
)
from polm_jax.models.lora import TARGET_MODULES

_Path = tuple  # a path into the config: str keys and int list indices
_Where = Callable[[_Path], str]  # path -> where its value came from
_CONTAINERS = {list: list, tuple: (list, tuple), dict: dict}  # container type -> accepted value types


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` (no dot) as a float, as YAML 1.2 does."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings like `1e-5`, so `_Loader` reads them back as strings."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)[eE][-+]?\d+$"),
        list("-+.0123456789"),
    )


# ----------------------------------------------------------------------------- public API


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Reads the YAML file at `path` (if any), applies `dotted.key=value` overrides, builds `cls`.

    An override reaching into a dict field the file does not set edits the field's default
    (`mesh.rules.embed=[fsdp]` changes one rule); a dict given in the file replaces the default.
    """
    data, origins = _read_yaml(path) if path is not None else ({}, {})
    for text in overrides:
        keys, value = _parse_override(text)
        _seed_dict_defaults(cls, data, keys)
        _set(data, keys, value, text)
        origins = {p: o for p, o in origins.items() if p[: len(keys)] != keys}
        origins[keys] = f"override {text!r}"
    return _build(cls, data, (), _locator(origins, str(path) if path is not None else "command line"))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Returns a copy of `data` with each `dotted.key=value` set (value parsed as YAML; dicts created as needed)."""
    data = copy.deepcopy(data)
    for text in overrides:
        _set(data, *_parse_override(text), text)
    return data


def from_dict(cls: type, data: dict, *, source: str = "<dict>") -> Any:
    """Builds dataclass `cls` (nested) from plain dicts, checking keys and types; errors start with `source`."""
    return _build(cls, data, (), _locator({}, source))


def to_dict(cfg: Any) -> Any:
    """The config as plain dicts, lists and scalars (tuples become lists), ready for YAML or JSON."""
    if is_dataclass(cfg):
        return {_key(f): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def dump_yaml(cfg: Any) -> str:
    """The config as YAML text, fields in declaration order; `load_config` reads it back equal."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=None, allow_unicode=True)


# ----------------------------------------------------------------------------- reading


def _read_yaml(path: str | Path) -> tuple[dict, dict[_Path, str]]:
    """Parses a YAML file into (data, origins): origins maps each key path to 'file line N'."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {_problem(e)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        got = type(data).__name__
        raise ConfigError(f"{path}: the top level must be a mapping of sections (key: value), got {got}")
    origins: dict[_Path, str] = {}
    _record_lines(node, (), str(path), origins)
    return data, origins


def _record_lines(node: yaml.Node, path: _Path, file: str, origins: dict[_Path, str]) -> None:
    """Records 'file line N' for every key and list item under `node`; a repeated key is an error."""
    if isinstance(node, yaml.MappingNode):
        items = [(path + (str(k.value),), k, v) for k, v in node.value]
    elif isinstance(node, yaml.SequenceNode):
        items = [(path + (i,), v, v) for i, v in enumerate(node.value)]
    else:
        return
    for sub, mark_node, value in items:
        where = f"{file} line {mark_node.start_mark.line + 1}"
        if sub in origins:
            raise ConfigError(f"{where}: duplicate key '{_dotted(sub)}' (first at {origins[sub]})")
        origins[sub] = where
        _record_lines(value, sub, file, origins)


def _parse_override(text: str) -> tuple[_Path, Any]:
    """Splits `dotted.key=value` into the key path and the YAML-parsed value."""
    key, sep, raw = text.partition("=")
    keys = tuple(key.strip().split("."))
    if not sep or not all(keys):
        form = "expected the form dotted.key=value, e.g. optim.lr=1e-5 or mesh.rules.embed=[fsdp]"
        raise ConfigError(f"override {text!r}: {form}")
    try:
        return keys, yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {_problem(e)}") from None


def _set(data: dict, keys: _Path, value: Any, text: str) -> None:
    """Sets data[k0][k1]...[kn] = value, creating dicts for absent or empty (None) levels."""
    node = data
    for i, key in enumerate(keys[:-1]):
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            got = f"'{_dotted(keys[: i + 1])}' is {type(node).__name__} {reprlib.repr(node)}"
            raise ConfigError(f"override {text!r}: cannot set '{_dotted(keys)}': {got}, not a mapping")
    node[keys[-1]] = value


def _seed_dict_defaults(cls: type, data: dict, keys: _Path) -> None:
    """Copies into `data` the default of a dict field that `keys` reaches into, so the override edits it."""
    for key in keys[:-1]:
        fields = {f.name: f for f in dataclasses.fields(cls)} if is_dataclass(cls) else {}
        if key not in fields or not isinstance(data, dict):
            return
        tp = _strip_none(get_type_hints(cls)[key])
        if data.get(key) is None:
            default = to_dict(_default(fields[key])) if get_origin(tp) is dict else None
            data[key] = default or {}
        data, cls = data.get(key), tp


# ----------------------------------------------------------------------------- building


def _build(cls: type, data: Any, path: _Path, where: _Where) -> Any:
    """Builds dataclass `cls` from the mapping `data` found at `path`, then runs its `validate()`."""
    if data is None:
        data = {}  # an empty section (`model:` with nothing under it) takes every default
    if not isinstance(data, dict):
        raise _type_error(cls, data, path, where)
    fields = {_key(f): f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise _unknown_key(str(key), list(fields), path, where)
    hints = get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[f.name] = _convert(hints[f.name], data[name], path + (name,), where)
        elif f.default is MISSING and f.default_factory is MISSING:
            key, origin = _dotted(path + (name,)), where(path + (name,))
            raise ConfigError(f"{origin}: missing required key '{key}'; set it in the file or pass {key}=...")
    obj = cls(**kwargs)
    _validate(obj, list(fields), path, where)
    return obj


def _key(f: dataclasses.Field) -> str:
    """A field's key in YAML: its name, less a trailing underscore (`lambda_` is written `lambda`)."""
    return f.name.removesuffix("_")


def _convert(tp: Any, value: Any, path: _Path, where: _Where, shown: Any = None) -> Any:
    """Checks `value` against type `tp` (converting lists to tuples, ints to floats); `shown` names it in errors."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if is_dataclass(tp):
        return _build(tp, value, path, where)
    if origin in (Union, UnionType):
        return _convert_union(tp, value, path, where)
    if origin is Literal:
        if any(value == c and type(value) is type(c) for c in args):
            return value
        raise _type_error(shown or tp, value, path, where, [str(c) for c in args])
    if origin in _CONTAINERS and isinstance(value, _CONTAINERS[origin]):
        return _convert_container(origin, args, value, path, where, shown or tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is None and isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
        return value
    raise _type_error(shown or tp, value, path, where)


def _convert_union(tp: Any, value: Any, path: _Path, where: _Where) -> Any:
    """`X | None` checks X (errors inside X keep their key); other unions take the first arm that fits."""
    args = get_args(tp)
    if value is None and NoneType in args:
        return None
    arms = [a for a in args if a is not NoneType]
    if len(arms) == 1:
        return _convert(arms[0], value, path, where, shown=tp)
    for arm in arms:
        try:
            return _convert(arm, value, path, where)
        except ConfigError:
            continue
    raise _type_error(tp, value, path, where)


def _convert_container(origin: type, args: tuple, value: Any, path: _Path, where: _Where, shown: Any) -> Any:
    """Checks the items of a list, tuple or dict value."""
    if origin is dict:
        kt, vt = args or (Any, Any)
        out = {}
        for k, v in value.items():
            out[_convert(kt, k, path + (str(k),), where)] = _convert(vt, v, path + (str(k),), where)
        return out
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _type_error(shown, value, path, where)
        return tuple(_convert(t, v, path + (i,), where) for i, (t, v) in enumerate(zip(args, value)))
    items = [_convert(args[0] if args else Any, v, path + (i,), where) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _validate(obj: Any, names: list[str], path: _Path, where: _Where) -> None:
    """Runs `obj.validate()` if defined; its 'field: problem' error gets the full key and the field's location."""
    check = getattr(type(obj), "validate", None)
    if not callable(check):
        return
    try:
        check(obj)
    except ConfigError as e:
        rel, sep, msg = str(e).partition(": ")
        sub = tuple(rel.split("."))
        if not sep or sub[0] not in names:
            sub, msg = (), str(e)
        raise ConfigError(f"{where(path + sub)}: {_dotted(path + sub) or 'config'}: {msg}") from None


# ----------------------------------------------------------------------------- errors


def _locator(origins: dict[_Path, str], default: str) -> _Where:
    """Where a path's value came from: its or its nearest parent's origin, else an override below it, else `default`."""

    def where(path: _Path) -> str:
        for n in range(len(path), 0, -1):
            if path[:n] in origins:
                return origins[path[:n]]
        return next((o for p, o in origins.items() if p[: len(path)] == path), default)

    return where


def _unknown_key(key: str, valid: list[str], path: _Path, where: _Where) -> ConfigError:
    """'unknown key' error with the nearest valid key and the list of valid ones."""
    msg = f"{where(path + (key,))}: unknown key '{_dotted(path + (key,))}'"
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        msg += f"; did you mean '{_dotted(path + (close[0],))}'?"
    section = f"of '{_dotted(path)}'" if path else "at the top level"
    return ConfigError(f"{msg} (valid keys {section}: {', '.join(valid)})")


def _type_error(tp: Any, value: Any, path: _Path, where: _Where, choices: list[str] | None = None) -> ConfigError:
    """'expected T, got type value' error; for a string near one of `choices`, a suggestion."""
    got = f"{type(value).__name__} {reprlib.repr(value)}"
    msg = f"{where(path)}: {_dotted(path) or 'config'}: expected {_type_name(tp)}, got {got}"
    close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) and choices else []
    return ConfigError(msg + (f"; did you mean '{close[0]}'?" if close else ""))


def _type_name(tp: Any) -> str:
    """A type as a user reads it: `str | None`, `list[str]`, `'cosine' | 'linear'`, `OptimSection (a mapping)`."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is NoneType:
        return "None"
    if tp is Any:
        return "anything"
    if origin in (Union, UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    if is_dataclass(tp):
        return f"{tp.__name__} (a mapping)"
    return getattr(tp, "__name__", str(tp))


def _dotted(path: _Path) -> str:
    """('mesh', 'rules', 'embed', 0) -> 'mesh.rules.embed[0]'."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else p
    return out


def _problem(e: yaml.YAMLError) -> str:
    """The short description of a YAML error."""
    return getattr(e, "problem", None) or str(e)


def _strip_none(tp: Any) -> Any:
    """`X | None` -> X; other types unchanged."""
    arms = [a for a in get_args(tp) if a is not NoneType]
    return arms[0] if get_origin(tp) in (Union, UnionType) and len(arms) == 1 else tp


def _default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (a fresh one for a default_factory)."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None if f.default is MISSING else f.default


# ----------------------------------------------------------------------------- polm's sections

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = {  # logical axis -> mesh axes (absent or [] = replicated)
    "batch": ["data", "fsdp"], "vocab": ["tensor"], "embed": ["fsdp"],
    "heads": ["tensor"], "kv_heads": ["tensor"], "mlp": ["tensor"],
    "act_batch": ["data", "fsdp"], "act_heads": ["tensor"], "act_kv_heads": ["tensor"],
    "act_mlp": ["tensor"], "act_vocab": ["tensor"],
}  # fmt: skip

Dtype = Literal[DTYPES]


@dataclass
class ModelSection:
    preset: str | None = "tiny-llama"  # a named architecture (polm_jax.models.presets); ignored when path is set
    path: str | None = None  # a Hugging Face folder or a polm (orbax) checkpoint
    dtype: Dtype | None = None  # compute dtype (None: the preset's / checkpoint's)
    param_dtype: Dtype | None = None  # parameter dtype (None: the preset's / checkpoint's)
    remat: Literal[REMAT_POLICIES] | None = None  # activation checkpointing policy
    attention_impl: Literal[ATTENTION_IMPLS] | None = None  # see polm_jax.ops.attention
    logprob_impl: Literal[LOGPROB_IMPLS] | None = None  # see polm_jax.ops.logprob
    overrides: dict[str, Any] = field(default_factory=dict)  # architecture fields to change, e.g. {num_layers: 4}


@dataclass
class MeshConfig:
    data: int = 1  # data-parallel axis size
    fsdp: int = -1  # fully sharded data-parallel axis size; -1 takes the remaining devices
    tensor: int = 1  # tensor-parallel axis size
    multihost: bool = False  # call jax.distributed.initialize()
    coordinator_address: str | None = None  # host:port of process 0 (None: auto-detected on TPU / SLURM)
    num_processes: int | None = None  # None: auto-detected
    process_id: int | None = None  # None: auto-detected
    rules: dict[str, list[str]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_RULES))  # logical -> mesh axes

    def validate(self) -> None:
        """Axis sizes are >= 1 or -1 (at most one -1); rules name only mesh axes."""
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if size == 0 or size < -1:
                raise ConfigError(f"{axis}: a mesh axis size must be >= 1, or -1 for the rest; got {size}")
        fill = [axis for axis in MESH_AXES if getattr(self, axis) == -1]
        if len(fill) > 1:
            both = " and ".join(fill)
            raise ConfigError(f"{fill[1]}: only one mesh axis may be -1, but {both} are; give the others sizes")
        for name, axes in self.rules.items():
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                raise ConfigError(f"rules.{name}: unknown mesh axis {bad[0]!r}; mesh axes are {', '.join(MESH_AXES)}")


TRUNCATION = ("error", "drop", "truncate_left", "truncate_right")


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)  # x.jsonl | tfds:NAME[:SPLIT] | x.array_record | synthetic:arithmetic[:N[:SEED]]
    eval: list[str] = field(default_factory=list)  # held-out sources for eval loss (same forms)
    tokenizer: str | None = None  # a tokenizer folder, or "bytes" (built in); None: the model's own
    columns: dict[str, str] = field(default_factory=dict)  # rename record fields, e.g. {question: prompt, answer: completion}
    tfds_data_dir: str | None = None  # where TFDS datasets are prepared (None: TFDS's default)
    max_length: int = 512  # tokens per row (packed or padded)
    truncation: Literal[TRUNCATION] = "error"  # what to do with an example longer than max_length
    packing: bool = True  # pack several examples per row (segment ids keep them apart)
    completion_only_loss: bool = True  # prompt/completion records: loss on the completion only
    assistant_only_loss: bool = True  # messages records: loss on assistant turns only
    shuffle: bool = True  # shuffle examples (by the run's seed, a new order each epoch)
    epochs: int | None = None  # passes over the data; None: repeat until train.steps
    on_error: Literal["error", "skip"] = "error"  # a malformed record: stop naming it, or skip and count it
    num_threads: int = 2  # grain reader threads per process
    prefetch: int = 8  # batches prefetched per process

    def validate(self) -> None:
        if self.max_length < 2:
            raise ConfigError(f"max_length: must be at least 2, got {self.max_length}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs: must be >= 1 or null (repeat), got {self.epochs}")


@dataclass
class OptimSection:
    lr: float = 1e-4  # peak learning rate
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    warmup_steps: int = 0  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    no_decay: list[str] = field(default_factory=lambda: ["norm", "bias", "embed"])  # param path parts without decay
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # global-norm clipping (None: off)


@dataclass
class LoRASection:
    rank: int = 0  # 0: LoRA off (full fine-tuning)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter input
    targets: list[str] = field(default_factory=lambda: list(TARGET_MODULES))  # q k v o gate up down, or regexes on param paths

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"rank: must be >= 0 (0 turns LoRA off), got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")


@dataclass
class TrainSection:
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # rows per step, over all processes (each row data.max_length tokens)
    microbatches: int = 1  # gradient accumulation: the batch is split into this many forward/backward passes
    output_dir: str = "runs/default"  # checkpoints, metrics.jsonl, TensorBoard events, the final model
    log_every: int = 1  # steps between metric lines
    eval_every: int = 0  # steps between eval-loss passes (0: only at the end, if data.eval is set)
    eval_batches: int | None = None  # batches per eval pass (None: the whole eval set)
    save_every: int = 0  # steps between checkpoints (0: only at the end and on SIGTERM)
    keep: int = 3  # checkpoints kept
    async_save: bool = True  # write checkpoints in the background
    resume: bool = True  # continue from the latest complete checkpoint in output_dir
    stop_at: int | None = None  # save and stop after this step (a later run resumes and finishes the schedule)
    on_nan: Literal["stop", "skip"] = "stop"  # a non-finite loss or gradient: stop (nothing saved) or skip the step
    export: Literal["polm", "hf", "none"] = "polm"  # the final model (LoRA merged) in output_dir/final
    tensorboard: bool = True  # also write TensorBoard event files
    progress: bool = True  # a progress bar with loss, tokens/s and ETA
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU (None: from the device kind, if known)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "microbatches", "log_every", "keep"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.microbatches:
            raise ConfigError(f"microbatches: {self.microbatches} does not divide batch_size {self.batch_size}")


PREFERENCE_LOSSES = ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo", "kto", "sft")


@dataclass
class PreferenceSection:
    loss_type: Literal[PREFERENCE_LOSSES] | list[Literal[PREFERENCE_LOSSES]] = "sigmoid"  # a list is summed (loss_weights)
    loss_weights: list[float] | None = None  # one per loss_type (None: all 1)
    beta: float = 0.1  # inverse temperature of the implicit reward (DPO 0.1; SimPO 2-2.5)
    label_smoothing: float = 0.0  # cDPO / robust DPO: the assumed probability that a label is flipped
    gamma: float = 0.5  # SimPO's target reward margin
    lambda_: float = 0.1  # ORPO's weight of the odds-ratio term (written `lambda`)
    desirable_weight: float = 1.0  # KTO: weight of desirable examples
    undesirable_weight: float = 1.0  # KTO: weight of undesirable examples
    center_rewards_coefficient: float = 0.0  # reward models: weight of (r_chosen + r_rejected)^2 (TRL's; 0.01 typical)
    precompute_ref: bool = False  # compute reference log-probs once before training, store and reuse them
    ref_logps_dir: str | None = None  # where they are stored (None: beside the data file, else output_dir)

    @property
    def losses(self) -> list[tuple[str, float]]:
        """(loss name, weight) pairs."""
        names = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        return list(zip(names, self.loss_weights or [1.0] * len(names)))

    def validate(self) -> None:
        names = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        if not names:
            raise ConfigError("loss_type: give at least one loss")
        if self.loss_weights is not None and len(self.loss_weights) != len(names):
            raise ConfigError(f"loss_weights: {len(self.loss_weights)} weights for {len(names)} losses {names}")
        if "kto" in names and len(names) > 1:
            raise ConfigError("loss_type: kto trains on unpaired data and cannot be combined with paired losses")
        if self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class SamplingSection:
    max_new_tokens: int = 256  # tokens generated per completion at most
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens (0: off)
    top_p: float = 1.0  # nucleus sampling (1: off)
    min_p: float = 0.0  # drop tokens below min_p times the most likely one's probability (0: off)
    n: int = 1  # samples per prompt (eval: raised to the K of pass@K / maj@K)
    stop: list[str] = field(default_factory=list)  # stop strings (matched as token sequences), besides EOS
    seed: int | None = None  # None: the run's seed
    max_prompt_length: int | None = None  # None: the model's max positions - max_new_tokens
    prompt_truncation: Literal["error", "left"] = "error"  # a longer prompt: an error, or keep its last tokens

    def validate(self) -> None:
        from polm_jax.sampling.params import SamplingParams

        SamplingParams.from_section(self, seed=0)  # raises "field: problem"


@dataclass
class EvalSection:
    metric: str = "exact_match"  # exact_match | pass@K | maj@K
    batch_size: int = 32  # prompts per generation call
    limit: int | None = None  # evaluate the first N records of data.eval only (None: all)
    chat: bool = False  # prompts as a user turn of the tokenizer's chat template, with the generation prompt
    prompt_format: str = "{prompt}"  # the prompt text; {prompt} is the record's prompt field
    answer_field: str = "answer"  # the record field with the gold answer (GSM8K's "... #### 42", or just "42")
    last_number: bool = True  # a completion without #### or \boxed{}: its last number is the answer
    output: str = "runs/eval/samples.jsonl"  # every sample as a JSON line
    progress: bool = True  # a progress bar over prompts

    def validate(self) -> None:
        from polm_jax.eval.metrics import parse_metric

        parse_metric(self.metric)  # raises "metric: problem"
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be >= 1 or null (all), got {self.limit}")
        if "{prompt}" not in self.prompt_format:
            raise ConfigError(f"prompt_format: must contain {{prompt}}, got {self.prompt_format!r}")


ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce++", "gae")


@dataclass
class RLSection:
    num_generations: int = 8  # completions per prompt (G); train.batch_size is the prompts per step
    max_prompt_length: int = 256  # prompt tokens at most (a longer prompt follows sampling.prompt_truncation)
    max_completion_length: int = 256  # tokens generated per completion at most
    chat: bool = False  # prompts as a user turn of the chat template, with the generation prompt
    prompt_format: str = "{prompt}"  # the prompt text; {prompt} is the record's prompt field
    rewards: list[str] = field(default_factory=lambda: ["math"])  # math | format | overlong | reward_model | module:function
    reward_weights: list[float] | None = None  # one per reward (None: all 1)
    reward_timeout_s: float = 60.0  # a reward call running longer scores 0 for that batch (counted, logged)
    reward_model: str | None = None  # the `reward_model` reward's checkpoint (a `polm rm` output)
    overlong_cache_length: int = 64  # DAPO soft overlong punishment: the last tokens before the limit that cost
    format_pattern: str | None = None  # the `format` reward's regex (None: <think>...</think><answer>...</answer>)
    advantage: Literal[ADVANTAGES] = "grpo"  # a group baseline, or gae: PPO with a value head on the policy
    scale_rewards: Literal["group", "batch", "none"] = "group"  # grpo: divide by the group's / batch's std, or not
    std_ddof: int = 1  # the reward std's delta degrees of freedom (1: Bessel, as reference implementations)
    loss_type: Literal["grpo", "dapo", "bnpo", "dr_grpo"] = "grpo"  # aggregation over tokens (see policy_loss)
    epsilon: float = 0.2  # clip range of the ratio below 1 (and above, unless epsilon_high is set)
    epsilon_high: float | None = None  # DAPO clip-higher: 0.28
    dual_clip: float | None = None  # c > 1: bound the loss of negative advantages at -c A (None: off)
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence: GSPO
    beta: float = 0.0  # KL-to-reference coefficient (0: no reference model is held); DeepSeekMath used 0.04
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    num_iterations: int = 1  # mu: optimisation passes over each rollout batch
    num_minibatches: int = 1  # optimizer steps per pass (each on B*G / num_minibatches completions)
    mask_truncated_completions: bool = False  # DAPO overlong filtering: no loss on completions cut by the limit
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill from more prompts
    max_refills: int = 4  # dynamic sampling: extra prompt batches sampled per step at most
    vf_coef: float = 0.1  # PPO: weight of the clipped value loss
    cliprange_value: float = 0.2  # PPO: how far a value may move from its old value before the clip
    gamma: float = 1.0  # PPO: discount
    lam: float = 0.95  # PPO: GAE lambda
    eval_limit: int | None = 64  # held-out prompts scored greedily at each eval (None: all of data.eval)

    def validate(self) -> None:
        if self.num_generations < 1 or self.max_completion_length < 1 or self.max_prompt_length < 1:
            raise ConfigError("num_generations, max_prompt_length and max_completion_length must be >= 1")
        if self.advantage in ("grpo", "rloo", "reinforce++") and self.num_generations < 2 and not (
                self.advantage == "grpo" and self.scale_rewards == "none"):
            raise ConfigError(f"num_generations: {self.advantage} compares completions of the same prompt; use at "
                              f"least 2 (got {self.num_generations})")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"reward_weights: {len(self.reward_weights)} weights for {len(self.rewards)} rewards")
        if not self.rewards:
            raise ConfigError("rewards: give at least one reward function")
        if "reward_model" in self.rewards and not self.reward_model:
            raise ConfigError("reward_model: the `reward_model` reward needs the path of a trained reward model")
        if self.num_iterations < 1 or self.num_minibatches < 1:
            raise ConfigError("num_iterations and num_minibatches must be >= 1")
        if "{prompt}" not in self.prompt_format:
            raise ConfigError(f"prompt_format: must contain {{prompt}}, got {self.prompt_format!r}")


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)  # which model, in which dtypes
    mesh: MeshConfig = field(default_factory=MeshConfig)  # device mesh and logical axis rules
    data: DataSection = field(default_factory=DataSection)  # sources, tokenization, masks, packing
    optim: OptimSection = field(default_factory=OptimSection)  # AdamW, schedule, clipping
    lora: LoRASection = field(default_factory=LoRASection)  # low-rank adapters (rank 0: off)
    train: TrainSection = field(default_factory=TrainSection)  # steps, batch, eval, checkpoints, logs
    preference: PreferenceSection = field(default_factory=PreferenceSection)  # DPO family, KTO, reward models
    sampling: SamplingSection = field(default_factory=SamplingSection)  # generation (eval, generate, RL rollouts)
    eval: EvalSection = field(default_factory=EvalSection)  # polm eval: metric, prompts, answers, output
    rl: RLSection = field(default_factory=RLSection)  # polm rl: rollouts, rewards, advantages, policy loss
    seed: int = 0  # the run's root random seed
