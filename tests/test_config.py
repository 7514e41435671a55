"""Config loading: YAML files, dotted overrides, round trips, and errors that say what and where."""

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import yaml

from polm_jax.config import (
    DEFAULT_RULES,
    Config,
    MeshConfig,
    ModelSection,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_config,
    to_dict,
)
from polm_jax.errors import ConfigError


@dataclass
class Optim:
    lr: float = 1e-3
    schedule: Literal["cosine", "linear"] = "cosine"
    betas: tuple[float, ...] = (0.9, 0.95)
    clip: tuple[str, float] = ("global_norm", 1.0)


@dataclass
class Train:
    steps: int  # required
    name: str = "run"
    tags: list[str] = field(default_factory=list)
    extra: Any = None
    resume: int | str = 0


@dataclass
class Exp:
    train: Train
    optim: Optim = field(default_factory=Optim)
    model: ModelSection = field(default_factory=ModelSection)
    mesh: MeshConfig = field(default_factory=MeshConfig)


def write(tmp_path, text: str, name: str = "exp.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error(cls, path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, overrides)
    return str(info.value)


EXP_YAML = """\
train:
  steps: 100
  tags: [sft, tiny]
optim:
  lr: 3e-4
  betas: [0.8, 0.99]
model:
  path: /ckpt/llama
  dtype: bfloat16
  overrides: {num_layers: 2}
mesh:
  fsdp: 4
"""


def test_nested_yaml_loads_with_types_and_defaults(tmp_path):
    cfg = load_config(Exp, write(tmp_path, EXP_YAML))
    assert cfg.train == Train(steps=100, tags=["sft", "tiny"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.model == ModelSection(path="/ckpt/llama", dtype="bfloat16", overrides={"num_layers": 2})
    assert cfg.mesh == MeshConfig(fsdp=4)


def test_no_file_gives_defaults_and_empty_section_takes_defaults(tmp_path):
    assert load_config(Config) == Config()
    assert load_config(Config, write(tmp_path, "model:\nseed: 5\n")) == Config(seed=5)
    assert load_config(Config, write(tmp_path, "# nothing yet\n")) == Config()


@pytest.mark.parametrize(
    "override, get, expected",
    [
        ("train.steps=7", lambda c: c.train.steps, 7),
        ("optim.lr=1e-5", lambda c: c.optim.lr, 1e-5),
        ("optim.lr=2", lambda c: c.optim.lr, 2.0),
        ("mesh.multihost=true", lambda c: c.mesh.multihost, True),
        ("model.path=null", lambda c: c.model.path, None),
        ("train.name='1e-5'", lambda c: c.train.name, "1e-5"),
        ("train.tags=[a, b]", lambda c: c.train.tags, ["a", "b"]),
        ("optim.betas=[0.5, 0.6]", lambda c: c.optim.betas, (0.5, 0.6)),
        ("optim.clip=[value, 2]", lambda c: c.optim.clip, ("value", 2.0)),
        ("train.resume=latest", lambda c: c.train.resume, "latest"),
        ("train.extra={a: [1, 2]}", lambda c: c.train.extra, {"a": [1, 2]}),
        ("model.overrides.num_layers=4", lambda c: c.model.overrides, {"num_layers": 4}),
        ("optim.schedule=linear", lambda c: c.optim.schedule, "linear"),
    ],
)
def test_override_values_are_parsed_as_yaml(tmp_path, override, get, expected):
    cfg = load_config(Exp, write(tmp_path, EXP_YAML), [override])
    assert get(cfg) == expected
    assert type(get(cfg)) is type(expected)


def test_overrides_apply_in_order_and_create_sections(tmp_path):
    overrides = ["optim.lr=0.1", "optim.lr=0.2", "model.overrides.rope.theta=1e6"]
    cfg = load_config(Exp, write(tmp_path, "train: {steps: 1}\n"), overrides)
    assert cfg.optim.lr == 0.2
    assert cfg.model.overrides == {"rope": {"theta": 1e6}}


def test_override_into_a_dict_field_edits_its_default():
    cfg = load_config(Config, None, ["mesh.rules.embed=[fsdp, tensor]", "mesh.rules.seq=[]"])
    assert cfg.mesh.rules == {**DEFAULT_RULES, "embed": ["fsdp", "tensor"], "seq": []}
    assert DEFAULT_RULES["embed"] == ["fsdp"]


def test_dict_field_in_file_replaces_the_default(tmp_path):
    path = write(tmp_path, "mesh:\n  rules:\n    embed: [fsdp]\n")
    assert load_config(Config, path).mesh.rules == {"embed": ["fsdp"]}
    assert load_config(Config, path, ["mesh.rules.mlp=[tensor]"]).mesh.rules == {"embed": ["fsdp"], "mlp": ["tensor"]}


def test_apply_overrides_returns_a_new_dict():
    data = {"a": {"b": 1}, "c": None}
    out = apply_overrides(data, ["a.x.y=2", "c.d=[1, 2]", "e=1e-5"])
    assert out == {"a": {"b": 1, "x": {"y": 2}}, "c": {"d": [1, 2]}, "e": 1e-5}
    assert data == {"a": {"b": 1}, "c": None}


def test_round_trip_through_dump_yaml(tmp_path):
    overrides = ["train.name='1e-5'", "train.extra={k: [1, true]}", "mesh.rules.x=[]"]
    cfg = load_config(Exp, write(tmp_path, EXP_YAML), overrides)
    text = dump_yaml(cfg)
    assert from_dict(Exp, yaml.safe_load(text)) == cfg
    assert load_config(Exp, write(tmp_path, text, "dumped.yaml")) == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.8, 0.99]


# ----------------------------------------------------------------------------- errors


def test_unknown_key_in_file_names_line_nearest_key_and_valid_keys(tmp_path):
    path = write(tmp_path, "train:\n  steps: 1\noptim:\n  schedule: linear\n  lrr: 0.1\n")
    msg = error(Exp, path)
    assert msg.startswith(f"{path} line 5: unknown key 'optim.lrr'; did you mean 'optim.lr'?")
    assert "valid keys of 'optim': lr, schedule, betas, clip" in msg


def test_unknown_key_in_override_names_the_override(tmp_path):
    msg = error(Exp, write(tmp_path, "train: {steps: 1}\n"), ["optim.lrr=3"])
    assert msg.startswith("override 'optim.lrr=3': unknown key 'optim.lrr'; did you mean 'optim.lr'?")


def test_unknown_section_lists_top_level_keys(tmp_path):
    msg = error(Exp, write(tmp_path, "train: {steps: 1}\n\noptm:\n  lr: 1\n"))
    assert msg.startswith(f"{tmp_path / 'exp.yaml'} line 3: unknown key 'optm'; did you mean 'optim'?")
    assert "valid keys at the top level: train, optim, model, mesh" in msg


@pytest.mark.parametrize(
    "text, line, expected",
    [
        ("train:\n  steps: 1\n  name: 3\n", 3, "train.name: expected str, got int 3"),
        ("train:\n  steps: 1.5\n", 2, "train.steps: expected int, got float 1.5"),
        ("train: {steps: true}\n", 1, "train.steps: expected int, got bool True"),
        ("train: {steps: 1}\nmesh:\n  multihost: 1\n", 3, "mesh.multihost: expected bool, got int 1"),
        ("train: {steps: 1}\nmodel:\n  path: 3\n", 3, "model.path: expected str | None, got int 3"),
        ("train: {steps: 1}\noptim: {lr: fast}\n", 2, "optim.lr: expected float, got str 'fast'"),
        ("train: {steps: 1, tags: a}\n", 1, "train.tags: expected list[str], got str 'a'"),
        ("train: {steps: 1, resume: [1]}\n", 1, "train.resume: expected int | str, got list [1]"),
        ("train: {steps: 1}\noptim:\n  clip: [a]\n", 3, "optim.clip: expected tuple[str, float], got list ['a']"),
        ("train: 5\n", 1, "train: expected Train (a mapping), got int 5"),
        (
            "train: {steps: 1}\nmesh:\n  rules:\n    embed:\n      - fsdp\n      - 2\n",
            6,
            "mesh.rules.embed[1]: expected str, got int 2",
        ),
    ],
)
def test_wrong_type_names_key_line_and_expected_type(tmp_path, text, line, expected):
    path = write(tmp_path, text)
    assert error(Exp, path) == f"{path} line {line}: {expected}"


def test_literal_error_lists_choices_and_suggests(tmp_path):
    msg = error(Exp, write(tmp_path, "train: {steps: 1}\n"), ["optim.schedule=cosin"])
    expected = "optim.schedule: expected 'cosine' | 'linear', got str 'cosin'; did you mean 'cosine'?"
    assert msg == f"override 'optim.schedule=cosin': {expected}"
    msg = error(Config, None, ["model.remat=everything"])
    assert "model.remat: expected 'none' | 'full' | 'dots' | 'dots_no_batch' | None" in msg


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "optim: {lr: 0.1}\n")
    assert error(Exp, path) == f"{path}: missing required key 'train'; set it in the file or pass train=..."
    path = write(tmp_path, "optim: {lr: 0.1}\ntrain:\n  name: x\n")
    assert error(Exp, path).startswith(f"{path} line 2: missing required key 'train.steps'")
    assert load_config(Exp, path, ["train.steps=3"]).train.steps == 3


@pytest.mark.parametrize("override", ["optim.lr", "=3", "optim..lr=3", ".lr=3"])
def test_malformed_override_shows_expected_form(override):
    with pytest.raises(ConfigError, match=re.escape(f"override {override!r}: expected the form dotted.key=value")):
        apply_overrides({}, [override])


def test_override_value_that_is_bad_yaml_or_through_a_scalar(tmp_path):
    assert "the value is not valid YAML" in error(Config, None, ["mesh.rules.embed=[fsdp"])
    msg = error(Config, write(tmp_path, "seed: 3\n"), ["seed.x=1"])
    assert msg == "override 'seed.x=1': cannot set 'seed.x': 'seed' is int 3, not a mapping"


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "seed: 1\nmodel:\n  path: [a\n  dtype: float32\n")
    assert error(Config, path) == f"{path} line 4: invalid YAML: expected ',' or ']', but got ':'"
    path = write(tmp_path, "seed: 1\nmodel: a: b\n")
    assert error(Config, path).startswith(f"{path} line 2: invalid YAML: mapping values are not allowed here")


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- seed\n- 1\n")
    assert error(Config, path) == f"{path}: the top level must be a mapping of sections (key: value), got list"


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "seed: 1\nmodel:\n  path: a\n  path: b\n")
    assert error(Config, path) == f"{path} line 4: duplicate key 'model.path' (first at {path} line 3)"


def test_missing_file(tmp_path):
    assert "cannot read the config file" in error(Config, str(tmp_path / "absent.yaml"))


def test_from_dict_names_its_source():
    with pytest.raises(ConfigError, match=r"^job\.json: seed: expected int, got str 'x'$"):
        from_dict(Config, {"seed": "x"}, source="job.json")
    assert from_dict(Config, {"mesh": {"tensor": 2}}) == Config(mesh=MeshConfig(tensor=2))


# ----------------------------------------------------------------------------- validation hooks


@pytest.mark.parametrize(
    "text, line, expected",
    [
        ("mesh:\n  data: 2\n  tensor: 0\n", 3, "mesh.tensor: a mesh axis size must be >= 1, or -1 for the rest; got 0"),
        ("mesh:\n  data: -2\n", 2, "mesh.data: a mesh axis size must be >= 1"),
        ("mesh:\n  fsdp: -1\n  tensor: -1\n", 3, "mesh.tensor: only one mesh axis may be -1, but fsdp and tensor are"),
        ("mesh:\n  rules:\n    embed: [fsdp]\n    mlp: [model]\n", 4, "mesh.rules.mlp: unknown mesh axis 'model'"),
    ],
)
def test_mesh_validation_names_key_and_line(tmp_path, text, line, expected):
    path = write(tmp_path, text)
    assert error(Config, path).startswith(f"{path} line {line}: {expected}")


def test_validation_error_from_an_override_names_the_override(tmp_path):
    path = write(tmp_path, "mesh:\n  fsdp: -1\n")
    msg = error(Config, path, ["mesh.tensor=-1"])
    assert msg.startswith("override 'mesh.tensor=-1': mesh.tensor: only one mesh axis may be -1, but fsdp and tensor")
    assert error(Config, path, ["mesh.data=0"]).startswith("override 'mesh.data=0': mesh.data: a mesh axis size")


def test_validate_hook_without_a_field_name_gets_the_section_prefix(tmp_path):
    @dataclass
    class Section:
        low: int = 0
        high: int = 1

        def validate(self):
            if self.low > self.high:
                raise ConfigError("low must not exceed high")

    @dataclass
    class Root:
        range: Section = field(default_factory=Section)

    path = write(tmp_path, "range:\n  low: 5\n")
    assert error(Root, path) == f"{path} line 1: range: low must not exceed high"
    assert error(Root, None, ["range.low=5"]) == "override 'range.low=5': range: low must not exceed high"
