"""Tiny Hugging Face style tokenizer folders, trained on the spot, for tokenizer and chat tests.

Four families, each as the real checkpoints ship it: llama3 / qwen2 (byte-level BPE tokenizer.json, BOS added by
the post-processor / none) and gemma / llama2 (SentencePiece BPE tokenizer.model with byte fallback, without /
with dummy prefix).
"""

import io
import json
import random
from pathlib import Path

import sentencepiece as spm
from tokenizers import (
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers import Tokenizer as HFTokenizer

FAMILIES = ("llama3", "qwen2", "gemma", "llama2")

SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],  # user-defined pieces; <pad> <eos> <bos> <unk> are control
    "llama2": [],
}

TEMPLATES = {
    "qwen2": (  # Qwen 2.5's ChatML, without tools
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
        "{%- else %}\n"
        "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
        "{%- endif %}\n"
        "{%- for message in messages %}\n"
        "    {%- if not (message.role == 'system' and loop.first) %}\n"
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|im_start|>assistant\\n' }}\n"
        "{%- endif %}\n"
    ),
    "llama3": (  # Llama 3's: BOS written by the template (and by the post-processor outside chats)
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "gemma": (  # Gemma 3's, text only
        "{{ bos_token }}\n"
        "{%- if messages[0]['role'] == 'system' -%}\n"
        "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
        "    {%- set loop_messages = messages[1:] -%}\n"
        "{%- else -%}\n"
        "    {%- set first_user_prefix = '' -%}\n"
        "    {%- set loop_messages = messages -%}\n"
        "{%- endif -%}\n"
        "{%- for message in loop_messages -%}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
        "    {%- endif -%}\n"
        "    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\n"
        "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}\n"
        "    {{- message['content'] | trim + '<end_of_turn>\\n' }}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "    {{ '<start_of_turn>model\\n' }}\n"
        "{%- endif -%}\n"
    ),
    "llama2": (  # Llama 2's [INST] format, system folded into the first user turn
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
        "{%- set loop_messages = messages[1:] %}"
        "{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}"
        "{%- for message in loop_messages %}"
        "{%- if message['role'] == 'user' %}"
        "{{- bos_token + '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{%- else %}{{- ' ' + message['content'] + ' ' + eos_token }}{%- endif %}"
        "{%- endfor %}"
    ),
}

# Hugging Face's pre-tokenizer regexes for Llama 3 (digits in threes) and Qwen 2 (single digits).
_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
REGEX = {"llama3": _REGEX, "qwen2": _REGEX.replace(r"\p{N}{1,3}", r"\p{N}")}

TEXTS = [
    "",
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nend",
    "café naïve résumé Ωmega straße",
    "東京 日本語 你好世界",
    "emoji 🙂🚀 👩‍👩‍👧 ☃",
    "numbers 1234567 3.14159",
    'code: def f(x):\n    return {"a": [1, 2]}',
    "   ",
    "\n",
    "mixed 東京café🙂\t\n x  ",
    "ｆｕｌｌ ｗｉｄｔｈ ①  a  b   c ",  # NFKC would change these; transformers does not normalize
]


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    """Deterministic training lines: English, accents, CJK, emoji, digits, code, chat words."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "user", "assistant", "system", "model", "answer", "question", "what", "is", "two", "plus", "three", "five", "tokenizer", "train", "data", "café", "naïve", "résumé", "straße", "東京", "日本語", "你好", "世界", "🙂", "🚀", "123", "4567", "3.14", "def", "return", "print(x)", "{json:", "true}", "[1,", "2]", "a-b_c"]
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        lines.append(rng.choice(["", "  ", "\t"]) + line + rng.choice(["", "\n", "  ", "\n\n"]))
    return lines


def make_tokenizer_folder(folder: Path, family: str, **sentencepiece_options) -> Path:
    """Trains a tiny tokenizer of `family` and writes it as a Hugging Face folder (with chat template);
    `sentencepiece_options` override the trainer's settings for gemma and llama2."""
    folder.mkdir(parents=True, exist_ok=True)
    if family in ("llama3", "qwen2"):
        config, stops = _write_byte_level(folder, family)
    else:
        config, stops = _write_sentencepiece(folder, family, sentencepiece_options)
    config["chat_template"] = TEMPLATES[family]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
    return folder


def _write_byte_level(folder: Path, family: str) -> tuple[dict, list[int]]:
    """A byte-level BPE tokenizer.json as Llama 3 (BOS via TemplateProcessing) or Qwen 2 (no BOS, NFC) ship it."""
    specials = SPECIALS[family]
    tok = HFTokenizer(models.BPE())
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(REGEX[family]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    ids = {t: tok.token_to_id(t) for t in specials}
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for t, i in ids.items()}
    if family == "llama3":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, ids[bos])]),
        ])
        config = {"added_tokens_decoder": added, "bos_token": bos, "eos_token": "<|eot_id|>",
                  "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True}
        stops = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        config = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
                  "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
                  "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
                  "errors": "replace", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer"}
        stops = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    tok.save(str(folder / "tokenizer.json"))
    return config, stops


def _write_sentencepiece(folder: Path, family: str, options: dict) -> tuple[dict, list[int]]:
    """A SentencePiece BPE tokenizer.model with Gemma's settings (no dummy prefix) or Llama 2's (dummy prefix)."""
    gemma = family == "gemma"
    names = ("<pad>", "<eos>", "<bos>", "<unk>") if gemma else (None, "</s>", "<s>", "<unk>")
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3) if gemma else dict(pad_id=-1, unk_id=0, bos_id=1, eos_id=2)
    pieces = {f"{k}_piece": v for k, v in zip(("pad", "eos", "bos", "unk"), names) if v}
    settings = dict(vocab_size=500, model_type="bpe", byte_fallback=True, add_dummy_prefix=not gemma,
                    remove_extra_whitespaces=False, split_digits=True, normalization_rule_name="identity",
                    allow_whitespace_only_pieces=True, character_coverage=1.0, user_defined_symbols=SPECIALS[family])
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=model, minloglevel=2,
                                   num_threads=1, **{**settings, **options}, **ids, **pieces)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": names[2], "eos_token": names[1],
              "unk_token": "<unk>", "tokenizer_class": "GemmaTokenizer" if gemma else "LlamaTokenizer"}
    if gemma:
        config["pad_token"] = "<pad>"
        return config, [1, 5]  # <eos> and <end_of_turn>, as Gemma's generation_config.json
    config["legacy"] = False
    return config, [2]
