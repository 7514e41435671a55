"""Tokenizers: one `Tokenizer` interface over `tokenizer.json` and SentencePiece `.model` files.

    tok = load_tokenizer("checkpoints/gemma-2b")      # a Hugging Face style folder
    ids = tok.encode("Hello")                          # list[int], BOS as the model's files say
    tok = byte_tokenizer()                             # built in: one id per UTF-8 byte, vocab 263

Ids and decoded text equal those of `transformers.AutoTokenizer.from_pretrained(folder)`
(transformers 5) for folders laid out as Llama 3, Qwen 2.5/3, Gemma 2/3 and Llama 2 checkpoints
ship them (tests/test_tokenizer.py trains look-alikes). How each backend matches transformers,
and where it cannot, is documented on its class.
"""

from __future__ import annotations

import abc
import atexit
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from polm_jax.errors import TokenizerError

BYTES = "bytes"  # the name (for data.tokenizer and load_tokenizer) of the built-in byte-level tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # in order of preference
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

Offsets = list[tuple[int, int]]  # per token, its [start, end) character span in the text


def has_tokenizer(folder: str | Path) -> bool:
    """Whether `folder` holds a `tokenizer.json` or a `tokenizer.model`."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Loads the tokenizer of a Hugging Face style folder; `tokenizer.json` is preferred over `tokenizer.model`.

    The string "bytes" gives the built-in `byte_tokenizer()` (a folder named bytes: pass "./bytes").
    """
    if isinstance(folder, str) and folder == BYTES:
        return byte_tokenizer()
    folder = Path(folder)
    if not has_tokenizer(folder):
        raise TokenizerError(
            f"{folder}: no tokenizer.json or tokenizer.model found; point to the model folder that holds "
            "the tokenizer files (as saved by transformers' save_pretrained)"
        )
    meta = _read_meta(folder)
    if (folder / "tokenizer.json").is_file():
        return JsonTokenizer(folder, meta)
    return SentencePieceTokenizer(folder, meta)


# ----------------------------------------------------------------------------- metadata files


@dataclass(frozen=True)
class _Meta:
    """What the side files of a folder say: tokenizer_config.json and friends."""

    config: dict  # tokenizer_config.json, {} when absent
    special_map: dict  # special_tokens_map.json, {} when absent
    generation: dict  # generation_config.json, {} when absent
    chat_template: str | None
    files: tuple[str, ...]  # the side files present, by name


def _read_meta(folder: Path) -> _Meta:
    """Reads the side files of `folder` that exist."""
    config, special_map, generation = (_read_json(folder / name) for name in SIDE_FILES[:3])
    files = tuple(name for name in SIDE_FILES if (folder / name).is_file())
    return _Meta(config, special_map, generation, _read_chat_template(folder, config), files)


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg}); fix or re-export the file"
        ) from e
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text ({e}); fix or re-export the file") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_chat_template(folder: Path, config: dict) -> str | None:
    """`chat_template.jinja` if present, else tokenizer_config.json's `chat_template` (its "default" if named)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    where = folder / "tokenizer_config.json"
    if isinstance(template, list):
        try:
            template = {item["name"]: item["template"] for item in template}
        except (TypeError, KeyError) as e:
            raise TokenizerError(f"{where}: chat_template list entries need 'name' and 'template' keys") from e
    if not isinstance(template, dict):
        raise TokenizerError(f"{where}: chat_template must be a string or a list of named templates")
    if "default" not in template:
        raise TokenizerError(
            f"{where}: chat_template holds named templates {sorted(template)} but none named 'default'; "
            "add a 'default' one"
        )
    return template["default"]


def _token_text(value) -> str | None:
    """A special token as written in the config files: a string, a {"content": ...} dict, or None."""
    return value.get("content") if isinstance(value, dict) else value


def _named_tokens(meta: _Meta) -> dict[str, str]:
    """The named special tokens (bos_token, eos_token, ...) that are set, as transformers resolves them.

    special_tokens_map.json overrides tokenizer_config.json unless the config has
    `added_tokens_decoder` (then the map only fills gaps), as in transformers 5.
    """
    first, second = (meta.config, meta.special_map)
    if "added_tokens_decoder" not in meta.config:
        first, second = second, first
    named = {}
    for name in SPECIAL_TOKEN_NAMES:
        source = first if name in first else second
        text = _token_text(source.get(name))
        if text:
            named[name] = text
    return named


def _extra_tokens(meta: _Meta, named: dict[str, str]) -> list[tuple[int | None, AddedToken]]:
    """Tokens the config declares beyond the vocabulary file: (declared id or None, token), in transformers' order."""
    tokens = []
    for index, entry in sorted(meta.config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
        entry = entry if isinstance(entry, dict) else {"content": str(entry)}
        keys = ("single_word", "lstrip", "rstrip", "normalized", "special")
        tokens.append((int(index), AddedToken(entry["content"], **{k: entry[k] for k in keys if k in entry})))
    extras = meta.config.get("additional_special_tokens") or meta.config.get("extra_special_tokens") or []
    extras = list(extras.values()) if isinstance(extras, dict) else extras
    for text in [*named.values(), *map(_token_text, extras)]:
        tokens.append((None, AddedToken(text, special=True, normalized=False)))
    return tokens


# ----------------------------------------------------------------------------- the interface


class Tokenizer(abc.ABC):
    """Text <-> token ids for one model, with its special tokens and chat template.

    Attributes: `folder` and `files` (where it was loaded from), `special_tokens` (name -> text,
    e.g. {"bos_token": "<bos>"}), `bos_id`, `eos_id` (the main end-of-sequence id), `stop_ids`
    (every id that ends generation: eos plus generation_config.json's eos_token_id), `pad_id`
    (the pad token, else `eos_id`: padding is masked out, so any real id serves), `chat_template`.
    """

    def __init__(self, folder: Path, vocab_file: str, meta: _Meta):
        self.folder = folder
        self.files = (vocab_file, *meta.files)
        self.chat_template = meta.chat_template
        self.special_tokens = _named_tokens(meta)
        self.bos_id = self._named_id("bos_token")
        self.eos_id = self._named_id("eos_token")
        stops = meta.generation.get("eos_token_id")
        stops = [stops] if isinstance(stops, int) else stops or []
        if not isinstance(stops, list) or not all(isinstance(i, int) for i in stops):
            raise TokenizerError(f"{folder / 'generation_config.json'}: eos_token_id must be an int or a list "
                                 f"of ints, found {stops!r}")
        self.stop_ids = tuple(dict.fromkeys(i for i in [self.eos_id, *stops] if i is not None))
        self.eos_id = self.stop_ids[0] if self.stop_ids else None  # generation_config's when no eos_token
        pad = self._named_id("pad_token")
        self.pad_id = pad if pad is not None else self.eos_id

    def _named_id(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self.token_to_id(text)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (largest id + 1)."""

    @abc.abstractmethod
    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], Offsets]:
        """Token ids of `text` and each token's [start, end) character span; added BOS/EOS get (0, 0)."""

    @abc.abstractmethod
    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of one token's text (e.g. "<|im_end|>"), None when it is not in the vocabulary."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS as the model's files say."""
        return self.encode_with_offsets(text, add_special_tokens)[0]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids; special tokens (BOS, EOS, <|im_end|>, ...) are dropped when skipped."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"decode: ids {bad[:5]} are outside the vocabulary of {self.folder} "
                                 f"(size {self.vocab_size})")
        return self._decode(ids, skip_special_tokens)

    def save(self, folder: str | Path) -> None:
        """Copies the files this tokenizer was loaded from into `folder` (an existing
        generation_config.json there is kept: it belongs to the model export)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.files:
            source, target = self.folder / name, folder / name
            if target.exists() and (source.samefile(target) or name == "generation_config.json"):
                continue
            shutil.copyfile(source, target)


# ----------------------------------------------------------------------------- tokenizer.json


class JsonTokenizer(Tokenizer):
    """A `tokenizer.json` run by the `tokenizers` library, as transformers 5 runs it.

    The file's normalizer, pre-tokenizer, post-processor (BOS for Llama 3 and Gemma, none for Qwen)
    and decoder are used unchanged; tokenizer_config.json's add_bos_token/add_eos_token are ignored,
    as transformers ignores them when a tokenizer.json exists. The config's special and added
    tokens missing from the file are added, as transformers adds them.
    """

    def __init__(self, folder: Path, meta: _Meta):
        path = folder / "tokenizer.json"
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust parser raises a bare Exception
            raise TokenizerError(f"{path}: cannot be parsed by the tokenizers library ({e}); re-export it "
                                 "with transformers' save_pretrained") from e
        known = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        for _, token in _extra_tokens(meta, _named_tokens(meta)):
            if token.content not in known:
                self._tok.add_tokens([token])
                known.add(token.content)
        self._size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        super().__init__(folder, "tokenizer.json", meta)

    @property
    def vocab_size(self) -> int:
        return self._size

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], Offsets]:
        encoding = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return list(encoding.ids), [tuple(span) for span in encoding.offsets]

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


# ----------------------------------------------------------------------------- SentencePiece


_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6  # sentencepiece_model.proto piece types
_SPACE = "\u2581"  # SentencePiece's whitespace symbol


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` run by the `sentencepiece` library, matching transformers 5.

    transformers 5 converts the `.model` into a `tokenizers` pipeline; this class runs sentencepiece
    configured as that pipeline behaves:
    - special and added tokens (control and user-defined pieces, the config's tokens) are cut out
      of the text first, so "<bos>" written in a chat template is the BOS id, not characters
      (their lstrip/rstrip flags are not applied: real Gemma and Llama 2 files do not set them);
    - the dummy prefix "▁" follows transformers, not the `.model`'s add_dummy_prefix: only for
      tokenizer_class LlamaTokenizer, prepended to text at offset 0 that does not already start
      with a space ("first"; to every piece of text between added tokens if `legacy: true`);
    - the `.model`'s remove_extra_whitespaces is ignored, and so is its normalization rule (e.g.
      nmt_nfkc) for Llama and Gemma tokenizer classes;
    - BOS/EOS are added when tokenizer_config.json sets add_bos_token/add_eos_token (default no);
    - decoding fuses byte pieces (invalid UTF-8 gives one U+FFFD per byte), writes every token's
      text (control tokens included unless skipped), and strips one leading space if prefixed.
    Divergences: transformers reads unigram `.model`s as BPE for Llama and Gemma classes (real
    Gemma and Llama 2 models are BPE), and adds class-default tokens (GemmaTokenizer's "<mask>").
    """

    def __init__(self, folder: Path, meta: _Meta):
        proto, self._sp = _load_sentencepiece(folder / "tokenizer.model", meta.config)
        self._prefix = _prefix_scheme(meta.config)
        self._pieces = [p.piece for p in proto.pieces]
        self._size = len(self._pieces)  # grows with added tokens beyond the .model
        self._unk_piece = proto.trainer_spec.unk_piece
        self._byte_ids = {i for i, p in enumerate(proto.pieces) if p.type == _BYTE}
        self._added: dict[str, int] = {}  # text -> id of tokens cut out of the text before encoding
        self._special_ids: set[int] = set()
        for i, p in enumerate(proto.pieces):
            if p.type in (_CONTROL, _USER_DEFINED):
                self._add_token(p.piece, i, special=p.type == _CONTROL)
        for index, token in _extra_tokens(meta, _named_tokens(meta)):
            self._add_token(token.content, index, token.special)
        self._id_to_added = {i: text for text, i in self._added.items()}
        longest_first = sorted(self._added, key=len, reverse=True)
        self._splitter = re.compile("|".join(map(re.escape, longest_first))) if self._added else None
        self._add_bos = bool(meta.config.get("add_bos_token", False))
        self._add_eos = bool(meta.config.get("add_eos_token", False))
        super().__init__(folder, "tokenizer.model", meta)

    def _add_token(self, text: str, index: int | None, special: bool) -> None:
        """Registers an added token; its id is the vocabulary's, else `index`, else the next free one."""
        if text not in self._added:
            found = self._piece_id(text)
            index = found if found is not None else index if index is not None else self._size
            self._added[text] = index
            self._size = max(self._size, index + 1)
        if special:
            self._special_ids.add(self._added[text])

    def _piece_id(self, text: str) -> int | None:
        index = self._sp.piece_to_id(text)
        return None if index == self._sp.unk_id() and text != self._unk_piece else index

    @property
    def vocab_size(self) -> int:
        return self._size

    def token_to_id(self, token: str) -> int | None:
        return self._added[token] if token in self._added else self._piece_id(token)

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], Offsets]:
        ids, offsets, start = [], [], 0
        for match in self._splitter.finditer(text) if self._splitter else ():
            self._encode_plain(text[start : match.start()], start, ids, offsets)
            ids.append(self._added[match.group()])
            offsets.append(match.span())
            start = match.end()
        self._encode_plain(text[start:], start, ids, offsets)
        if add_special_tokens and self._add_bos and self.bos_id is not None:
            ids, offsets = [self.bos_id, *ids], [(0, 0), *offsets]
        if add_special_tokens and self._add_eos and self.eos_id is not None:
            ids, offsets = [*ids, self.eos_id], [*offsets, (0, 0)]
        return ids, offsets

    def _encode_plain(self, text: str, start: int, ids: list[int], offsets: Offsets) -> None:
        """Appends the ids and spans of `text` (no added tokens in it), found at character `start`."""
        if not text:
            return
        prefix = self._prefix == "always" or (self._prefix == "first" and start == 0)
        shift = int(prefix and not text.startswith((" ", _SPACE)))
        text = _SPACE * shift + text
        to_char = _byte_to_char(text)
        spans = []
        for piece in self._sp.encode(text, return_type="proto").pieces:
            ids.append(piece.id)
            spans.append([max(to_char[piece.begin] - shift, 0) + start, max(to_char[piece.end] - shift, 0) + start])
        for i in reversed(range(len(spans) - 1)):  # leading byte pieces of a character: that character's span
            if spans[i][0] == spans[i][1] == spans[i + 1][0]:
                spans[i] = spans[i + 1]
        offsets.extend(tuple(span) for span in spans)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        parts, pending = [], bytearray()
        for i in ids:
            if skip_special_tokens and i in self._special_ids:
                continue
            if i in self._byte_ids:
                pending.append(int(self._pieces[i][3:5], 16))  # "<0xE2>" -> 0xE2
                continue
            parts.append(_bytes_text(pending))
            pending.clear()
            parts.append(self._id_to_added.get(i) or self._pieces[i].replace(_SPACE, " "))
        text = "".join(parts) + _bytes_text(pending)
        return text[1:] if self._prefix != "never" and text.startswith(" ") else text


def _load_sentencepiece(path: Path, config: dict) -> tuple[spm_pb2.ModelProto, spm.SentencePieceProcessor]:
    """The `.model`'s proto and a processor of it normalizing as transformers does."""
    proto = spm_pb2.ModelProto()
    processor = spm.SentencePieceProcessor()
    try:
        proto.ParseFromString(path.read_bytes())
        _normalize_like_transformers(proto.normalizer_spec, config)
        processor.load_from_serialized_proto(proto.SerializeToString())
    except Exception as e:  # protobuf's DecodeError or sentencepiece's RuntimeError
        raise TokenizerError(f"{path}: not a valid SentencePiece model ({e}); re-export the file") from e
    return proto, processor


def _prefix_scheme(config: dict) -> str:
    """Where transformers 5 prepends "▁": "never", "first" (text at offset 0) or "always".

    Only its LlamaTokenizer prepends (unless `add_prefix_space` is false; "always" if `legacy`);
    GemmaTokenizer and its generic conversion never do, whatever the `.model` says.
    """
    if not str(config.get("tokenizer_class") or "").startswith("Llama") or config.get("add_prefix_space") is False:
        return "never"
    return "always" if config.get("legacy") else "first"


def _normalize_like_transformers(spec: spm_pb2.NormalizerSpec, config: dict) -> None:
    """Edits the `.model`'s normalizer to what transformers 5 applies: no dummy prefix (prepended by
    hand), no extra-whitespace removal, and no normalization rule for Llama and Gemma classes."""
    spec.add_dummy_prefix = False
    spec.remove_extra_whitespaces = False
    if str(config.get("tokenizer_class") or "").startswith(("Llama", "Gemma")):
        spec.precompiled_charsmap = b""
        spec.name = "identity"


def _byte_to_char(text: str) -> list[int]:
    """Maps each UTF-8 byte index of `text` (and the end) to its character index."""
    if text.isascii():
        return list(range(len(text) + 1))
    table = [i for i, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
    return table + [len(text)]


def _bytes_text(data: bytearray) -> str:
    """Byte-fallback pieces as text: their UTF-8 decoding, else one U+FFFD per byte (as `tokenizers` does)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)


# ----------------------------------------------------------------------------- the built-in byte tokenizer


BYTE_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # ids 256..262

# <|bos|><|user|>What is 2 + 3?<|end|><|assistant|>5<|eos|>: a header token per turn, <|end|> closing
# system and user turns and <|eos|> (the stop token) closing assistant turns, no newlines (short rows).
BYTE_CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message['role'] not in ('system', 'user', 'assistant') -%}\n"
    "        {{- raise_exception('byte tokenizer chat template: roles are system, user and assistant, got ' "
    "+ message['role']) -}}\n"
    "    {%- endif -%}\n"
    "    {{- '<|' + message['role'] + '|>' + message['content'] -}}\n"
    "    {{- eos_token if message['role'] == 'assistant' else '<|end|>' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}\n"
)


def byte_tokenizer() -> Tokenizer:
    """The built-in byte-level tokenizer (data.tokenizer: bytes): id b is UTF-8 byte b (0..255), then
    BYTE_SPECIALS (vocab 263); BOS (256) starts every encoding, EOS (257) ends assistant turns, pad is 258.

    An ordinary `JsonTokenizer` over files written once per process to a temporary folder, so
    `save(folder)` writes a tokenizer.json folder that `load_tokenizer` (and transformers) read back.
    """
    return load_tokenizer(_byte_tokenizer_folder())


_byte_folder: Path | None = None


def _byte_tokenizer_folder() -> Path:
    """This process's folder of byte tokenizer files, written on first use and removed at exit."""
    global _byte_folder
    if _byte_folder is None or not (_byte_folder / "tokenizer.json").is_file():
        folder = Path(tempfile.mkdtemp(prefix="polm-byte-tokenizer-"))
        _write_byte_tokenizer(folder)
        atexit.register(_remove_if_owner, folder, os.getpid())
        _byte_folder = folder
    return _byte_folder


def _remove_if_owner(folder: Path, pid: int) -> None:
    if os.getpid() == pid:  # not from a forked child exiting
        shutil.rmtree(folder, ignore_errors=True)


def _write_byte_tokenizer(folder: Path) -> None:
    """Writes tokenizer.json, tokenizer_config.json and chat_template.jinja of the byte tokenizer into `folder`."""
    symbols = _byte_symbols()
    tok = tokenizers.Tokenizer(models.BPE(vocab={s: b for b, s in enumerate(symbols)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIALS])
    bos = BYTE_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, 256)]
    )
    tok.save(str(folder / "tokenizer.json"))
    added = {str(256 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True} for i, t in enumerate(BYTE_SPECIALS)}
    config = {"added_tokens_decoder": added, "bos_token": "<|bos|>", "eos_token": "<|eos|>",
              "pad_token": "<|pad|>", "clean_up_tokenization_spaces": False,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "chat_template.jinja").write_text(BYTE_CHAT_TEMPLATE, encoding="utf-8")


def _byte_symbols() -> list[str]:
    """The character ByteLevel pre-tokenization writes for each byte 0..255 (GPT-2's bytes_to_unicode):
    printable Latin-1 characters stand for themselves, the others for chr(256), chr(257), ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    stand_ins = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(stand_ins)) for b in range(256)]
