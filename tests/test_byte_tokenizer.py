"""The built-in byte-level tokenizer: one id per UTF-8 byte, BOS/EOS/pad, a chat template with assistant masks."""

import pytest

from polm_jax.data.chat import render_chat, tokenize_chat
from polm_jax.data.tokenizer import BYTE_SPECIALS, byte_tokenizer, load_tokenizer
from polm_jax.errors import TokenizerError

TEXTS = ["", "Hello, world!", "  two  spaces\tand a tab\n", "Café 東京 🙂 ☃", "\x00\x7f control bytes",
         "What is 37 + 5?42", "<|bos is not special|>"]
CHAT = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Und café 東京?"},
    {"role": "assistant", "content": "☃ 東京\n\tdone"},
]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_ids_are_bytes_and_specials(tok):
    assert tok.vocab_size == 256 + len(BYTE_SPECIALS) <= 512
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (256, 257, 258, (257,))
    assert [tok.token_to_id(t) for t in BYTE_SPECIALS] == list(range(256, 256 + len(BYTE_SPECIALS)))
    for text in TEXTS:
        assert tok.encode(text) == [256, *text.encode("utf-8")]  # BOS, then the bytes
        assert tok.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == "<|bos|>" + text


def test_special_tokens_in_text(tok):
    assert tok.encode("a<|eos|>b", add_special_tokens=False) == [97, 257, 98]
    assert tok.decode([97, 257, 98]) == "ab"


def test_chat_template_and_assistant_mask(tok):
    text = render_chat(tok, CHAT[:3])
    assert text == ("<|bos|><|system|>Answer with a number.<|end|><|user|>What is 2 + 3?<|end|>"
                    "<|assistant|>5<|eos|>")
    assert render_chat(tok, CHAT[:2], add_generation_prompt=True) == text[: text.index("5<|eos|>")]
    ids, mask = tokenize_chat(tok, CHAT)
    assert ids == tok.encode(render_chat(tok, CHAT), add_special_tokens=False) and ids[0] == tok.bos_id
    runs, run = [], []
    for index, masked in zip(ids, mask):
        if masked:
            run.append(index)
        elif run:
            runs, run = [*runs, run], []
    runs += [run] if run else []
    assert runs == [[*tok.encode(m["content"], add_special_tokens=False), tok.eos_id]
                    for m in CHAT if m["role"] == "assistant"]


def test_chat_template_rejects_other_roles(tok):
    with pytest.raises(TokenizerError, match="roles are system, user and assistant"):
        render_chat(tok, [{"role": "tool", "content": "42"}])


def test_save_and_load(tok, tmp_path):
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat_template.jinja", "tokenizer.json",
                                                         "tokenizer_config.json"]
    loaded = load_tokenizer(tmp_path)
    assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (263, 256, 257, 258)
    assert loaded.chat_template == tok.chat_template
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    assert tokenize_chat(loaded, CHAT) == tokenize_chat(tok, CHAT)
    assert load_tokenizer("bytes").encode("hi") == [256, 104, 105]


def test_transformers_reads_the_saved_copy(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (len(theirs), theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (263, 256, 257, 258)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == tok.encode(text)
        assert theirs.decode(tok.encode(text), skip_special_tokens=True) == text
    out = theirs.apply_chat_template(CHAT, tokenize=True)
    assert list(out["input_ids"] if hasattr(out, "keys") else out) == tokenize_chat(tok, CHAT)[0]
