"""Tokenizers: ids, offsets and decoding equal transformers' for tiny tokenizers trained here (tokenizer_folders)."""

import json
from pathlib import Path

import pytest
from tokenizer_folders import (
    FAMILIES,
    SPECIALS,
    TEMPLATES,
    TEXTS,
    make_tokenizer_folder,
)
from transformers import AutoTokenizer

from polm_jax.data.tokenizer import has_tokenizer, load_tokenizer
from polm_jax.errors import TokenizerError


@pytest.fixture(scope="module", params=FAMILIES)
def folder(request, tmp_path_factory) -> Path:
    return make_tokenizer_folder(tmp_path_factory.mktemp("tok") / request.param, request.param)


def assert_like_transformers(ours, theirs, texts):
    """Encode (with and without special tokens) and decode (with and without skipping) agree on every text."""
    for text in texts:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == theirs(text, add_special_tokens=add)["input_ids"], (text, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def special_text(family: str) -> list[str]:
    """Texts that spell special and added tokens, alone and glued to words."""
    named = {"llama3": ["<|begin_of_text|>", "<|eot_id|>"], "qwen2": ["<|endoftext|>", "<|im_end|>"],
             "gemma": ["<bos>", "<eos>", "<pad>"], "llama2": ["<s>", "</s>", "<unk>"]}[family]
    tokens = SPECIALS[family] + named
    return ["".join(tokens), f"x{tokens[0]}user\nhi there{tokens[-1]} done", f" {tokens[1]} spaced {tokens[0]}"]


def test_ids_and_text_match_transformers(folder):
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.vocab_size == len(theirs) - (folder.name == "gemma")  # transformers adds "<mask>" to Gemma
    assert_like_transformers(ours, theirs, TEXTS + special_text(folder.name))


def test_special_ids_match_transformers(folder):
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    stops = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.stop_ids == tuple(dict.fromkeys([theirs.eos_token_id, *stops]))
    assert ours.pad_id == (theirs.pad_token_id if theirs.pad_token_id is not None else theirs.eos_token_id)
    assert ours.chat_template == theirs.chat_template
    for token in SPECIALS[folder.name]:
        assert ours.token_to_id(token) == theirs.convert_tokens_to_ids(token)
    assert ours.token_to_id("no such token ✗") is None


@pytest.mark.parametrize("text", TEXTS[1:])
def test_decode_round_trips(folder, text):
    tok = load_tokenizer(folder)
    if folder.name == "llama2" and text.startswith(" "):
        text = text.lstrip(" ")  # Llama 2 (and transformers) drop one leading space when decoding
    assert tok.decode(tok.encode(text)) == text


def test_offsets_cover_the_text(folder):
    tok = load_tokenizer(folder)
    marker = SPECIALS[folder.name][-1] if SPECIALS[folder.name] else "</s>"
    text = f"café 東京🙂 mixed\tline ☃𝔘\n{marker}\nend"  # ☃𝔘: not in the corpus, so byte pieces
    ids, offsets = tok.encode_with_offsets(text)
    assert len(ids) == len(offsets) and ids == tok.encode(text)
    if ids[0] == tok.bos_id:
        assert offsets[0] == (0, 0)  # added by the tokenizer: an empty span
        ids, offsets = ids[1:], offsets[1:]
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    for (start0, end0), (start1, end1) in zip(offsets, offsets[1:]):  # in order, no gaps
        assert start0 <= start1 <= end0 <= end1 and start1 < end1
    at = text.index(marker)
    assert offsets[ids.index(tok.token_to_id(marker))] == (at, at + len(marker))


def test_save_round_trip(folder, tmp_path):
    ours = load_tokenizer(folder)
    ours.save(tmp_path / "saved")
    again, theirs = load_tokenizer(tmp_path / "saved"), AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(ours.files)
    assert (again.stop_ids, again.pad_id, again.chat_template) == (ours.stop_ids, ours.pad_id, ours.chat_template)
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text) == theirs(text)["input_ids"]


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_add_bos_add_eos_flags(tmp_path, family):
    """The config's add_bos_token/add_eos_token drive a .model; a tokenizer.json's post-processor ignores them."""
    folder = make_tokenizer_folder(tmp_path / family, family)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for flags in ({"add_bos_token": False}, {"add_eos_token": True}, {"add_bos_token": True, "add_eos_token": True}):
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, **flags}))
        ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
        assert_like_transformers(ours, theirs, ["Hello world", ""])
        bos, eos = (ours.bos_id in ours.encode("Hello")), (ours.eos_id in ours.encode("Hello"))
        assert (bos, eos) == ((True, False) if family == "llama3" else (flags.get("add_bos_token", True),
                                                                         flags.get("add_eos_token", False)))


@pytest.mark.parametrize("family,config,options", [
    ("llama2", {"legacy": True}, {}),  # "▁" after every added token too
    ("llama2", {"add_prefix_space": False}, {}),
    ("gemma", {"add_prefix_space": True}, {}),  # GemmaTokenizer never prepends
    ("gemma", {}, {"add_dummy_prefix": True}),
    ("llama2", {"tokenizer_class": "PreTrainedTokenizerFast"}, {}),  # the generic conversion never prepends
    ("gemma", {}, {"normalization_rule_name": "nmt_nfkc", "remove_extra_whitespaces": True}),
    ("llama2", {}, {"normalization_rule_name": "nmt_nfkc", "remove_extra_whitespaces": True}),
])
def test_sentencepiece_settings_follow_transformers(tmp_path, family, config, options):
    """Dummy prefix and normalization as transformers 5 applies them, whatever the .model says."""
    folder = make_tokenizer_folder(tmp_path / family, family, **options)
    written = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**written, **config}))
    assert_like_transformers(load_tokenizer(folder), AutoTokenizer.from_pretrained(folder),
                             TEXTS + special_text(family))


def test_chat_template_sources(tmp_path):
    """chat_template.jinja wins over tokenizer_config.json; a list of named templates gives "default"."""
    folder = make_tokenizer_folder(tmp_path / "qwen2", "qwen2")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(folder).chat_template == "D"
    (folder / "chat_template.jinja").write_text("J{{ messages }}")
    assert load_tokenizer(folder).chat_template == "J{{ messages }}" == AutoTokenizer.from_pretrained(
        folder).chat_template
    config["chat_template"] = [{"name": "tool_use", "template": "T"}]
    (folder / "chat_template.jinja").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: .*\['tool_use'\].*'default'"):
        load_tokenizer(folder)


def test_has_tokenizer(tmp_path):
    assert not has_tokenizer(tmp_path)
    assert has_tokenizer(make_tokenizer_folder(tmp_path / "gemma", "gemma"))


@pytest.mark.parametrize("family,name,content", [
    ("qwen2", "tokenizer.json", '{"version": "1.0", "model": {"type": "BPE", "vocab": '),
    ("qwen2", "tokenizer.json", '{"model": {"type": "NoSuchModel"}}'),
    ("gemma", "tokenizer.model", "this is not a protobuf \x00\xff"),
    ("gemma", "tokenizer_config.json", '{"bos_token": "<bos>",\n  "eos_token": }'),
    ("gemma", "generation_config.json", '{"eos_token_id": "one"}'),
])
def test_corrupt_files_name_the_file(tmp_path, family, name, content):
    folder = make_tokenizer_folder(tmp_path / family, family)
    (folder / name).write_text(content)
    with pytest.raises(TokenizerError, match=rf"{folder / name}: "):
        load_tokenizer(folder)


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=rf"{tmp_path}: no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


def test_decode_rejects_ids_outside_the_vocabulary(tmp_path):
    tok = load_tokenizer(make_tokenizer_folder(tmp_path / "gemma", "gemma"))
    with pytest.raises(TokenizerError, match=r"ids \[500\] are outside the vocabulary"):
        tok.decode([5, 500])


def test_folders_saved_by_transformers(folder, tmp_path):
    """transformers' save_pretrained output (tokenizer.json, chat_template.jinja, its config) loads the same."""
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path)
    ours, theirs = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert "tokenizer.json" in ours.files and ours.chat_template == TEMPLATES[folder.name]
    assert_like_transformers(ours, theirs, TEXTS + special_text(folder.name))
    assert [ours.encode(t) for t in TEXTS] == [load_tokenizer(folder).encode(t) for t in TEXTS]
