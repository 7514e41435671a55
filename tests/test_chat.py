"""Chat templates: rendering and ids equal transformers' apply_chat_template; masks cover assistant turns."""

import json
from datetime import datetime

import pytest
from tokenizer_folders import FAMILIES, make_tokenizer_folder
from transformers import AutoTokenizer

from polm_jax.data.chat import render_chat, tokenize_chat
from polm_jax.data.tokenizer import load_tokenizer
from polm_jax.errors import TokenizerError

CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is two plus three?"},
    {"role": "assistant", "content": "Five. 🙂"},
    {"role": "user", "content": "Und café 東京?"},
    {"role": "assistant", "content": "☃ 東京 café\n\tdone"},
]

TURN_TEXT = {  # how an assistant turn decodes: its content plus the end-of-turn text the template writes
    "qwen2": "{}<|im_end|>\n",
    "llama3": "{}<|eot_id|>",
    "gemma": "{}<end_of_turn>\n",
    "llama2": "{} </s>",  # the template writes " {content} </s>"; decoding drops the dummy-prefix space
}


@pytest.fixture(scope="module", params=FAMILIES)
def folder(request, tmp_path_factory):
    return make_tokenizer_folder(tmp_path_factory.mktemp("chat") / request.param, request.param)


def hf_chat_ids(theirs, messages, add_generation_prompt):
    out = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_ids_and_text_match_transformers(folder, add_generation_prompt):
    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for messages in (CHAT, CHAT[1:3], CHAT[:2]):
        text = render_chat(ours, messages, add_generation_prompt=add_generation_prompt)
        assert text == theirs.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        ids, mask = tokenize_chat(ours, messages, add_generation_prompt=add_generation_prompt)
        assert ids == hf_chat_ids(theirs, messages, add_generation_prompt)
        assert len(mask) == len(ids)
    ids, _ = tokenize_chat(ours, CHAT[:2])
    assert ids.count(ours.bos_id) == (folder.name != "qwen2")  # the template's BOS, not one more


def test_assistant_mask_is_the_assistant_turns(folder):
    tok = load_tokenizer(folder)
    ids, mask = tokenize_chat(tok, CHAT, add_generation_prompt=False)
    runs, run = [], []
    for index, masked in zip(ids, mask):
        if masked:
            run.append(index)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    expected = [TURN_TEXT[folder.name].format(m["content"]) for m in CHAT if m["role"] == "assistant"]
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == expected
    ids_gen, mask_gen = tokenize_chat(tok, CHAT[:4], add_generation_prompt=True)
    assert sum(mask_gen) == len(runs[0])  # the generation prompt's role header is not masked


def test_save_round_trip_keeps_chat_ids(folder, tmp_path):
    tok = load_tokenizer(folder)
    tok.save(tmp_path / "saved")
    assert tokenize_chat(load_tokenizer(tmp_path / "saved"), CHAT) == tokenize_chat(tok, CHAT)


def write_template(tmp_path, template):
    folder = make_tokenizer_folder(tmp_path / "qwen2", "qwen2")
    (folder / "chat_template.jinja").write_text(template)
    return load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)


def test_template_environment_matches_transformers(tmp_path):
    """tojson (no HTML escaping, options), loop controls, the generation tag and extra variables."""
    template = (
        "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2, sort_keys=true) }}|{{ tools | tojson }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}{{ bos_token }}{{ eos_token }}{{ extra }}"
    )
    ours, theirs = write_template(tmp_path, template)
    messages = [{"role": "user", "content": "<b>&é 東京 \"q\"</b>", "n": 1}, {"role": "assistant", "content": "x"}]
    assert render_chat(ours, messages, extra="!") == theirs.apply_chat_template(messages, tokenize=False, extra="!")
    ours, _ = write_template(tmp_path, "{{ strftime_now('%Y') }}")
    assert render_chat(ours, []) == str(datetime.now().year)


def test_template_that_raises(tmp_path):
    tok = load_tokenizer(make_tokenizer_folder(tmp_path / "gemma", "gemma"))
    with pytest.raises(TokenizerError, match=r"chat template of .*gemma failed: Conversation roles must alternate"):
        tokenize_chat(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_template_with_syntax_error(tmp_path):
    tok, _ = write_template(tmp_path, "line one\n{% for m in messages %}{{ m.content }}")
    with pytest.raises(TokenizerError, match=r"chat template of .*qwen2, line 2: .*'endfor'"):
        render_chat(tok, CHAT)


def test_missing_template(tmp_path):
    folder = make_tokenizer_folder(tmp_path / "qwen2", "qwen2")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"qwen2 has no chat template; set 'chat_template' in its "
                                             r"tokenizer_config.json or add a chat_template.jinja"):
        tokenize_chat(load_tokenizer(folder), CHAT)


def test_template_that_rewrites_earlier_turns(tmp_path):
    """A render that depends on what follows (here: the message count) cannot locate assistant tokens."""
    tok, _ = write_template(tmp_path, "{{ messages | length }}{% for m in messages %}<{{ m.content }}>{% endfor %}")
    assert render_chat(tok, CHAT) == "5<You answer in one line.><What is two plus three?><Five. 🙂>" \
                                     "<Und café 東京?><☃ 東京 café\n\tdone>"
    with pytest.raises(TokenizerError, match=r"not prefix-consistent at messages\[2\]"):
        tokenize_chat(tok, CHAT)


@pytest.mark.parametrize("messages,where", [
    ("hello", "messages must be a list of {'role', 'content'} dicts, got str"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}], r"messages\[1\] must be a dict"),
    ([["user", "a"]], r"messages\[0\] must be a dict"),
    ([{"role": "user", "content": "a"}, {"role": None, "content": "b"}], r"messages\[1\] must be a dict"),
])
def test_malformed_messages(tmp_path, messages, where):
    tok = load_tokenizer(make_tokenizer_folder(tmp_path / "qwen2", "qwen2"))
    with pytest.raises(TokenizerError, match=where):
        tokenize_chat(tok, messages)
    with pytest.raises(TokenizerError, match=where):
        render_chat(tok, messages)
