"""Text in, text out: prompts as strings (optionally through the chat template), completions decoded, streaming.

    sampling = SamplingParams(max_new_tokens=64, temperature=0.7)
    completions = generate_text(model, ["What is 2 + 2?"], sampling, chat=True)   # B * n Completions
    for piece in stream_text(model, "Once upon a time", sampling):                # text as it is generated
        print(piece, end="", flush=True)

Prompts are encoded as the SFT pipeline encodes them: plain text with the tokenizer's special tokens (so an
empty string starts from BOS when the tokenizer adds one, and is an error otherwise), chat prompts rendered
with the generation prompt. Rows stop at the tokenizer's stop ids as well as the model's EOS. Stop strings are
matched as token sequences (their encoding on their own, so a string the tokenizer splits differently in
context is not caught on device); a completion's text is cut before the first stop string it contains.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from polm_jax.api import Model
from polm_jax.data.chat import render_chat
from polm_jax.data.tokenizer import Tokenizer
from polm_jax.errors import DataError, TokenizerError
from polm_jax.sampling.engine import make_engine
from polm_jax.sampling.generate import generate, place_prompts
from polm_jax.sampling.params import SamplingParams

STREAM_CHUNK = 8  # decode steps per device call while streaming


@dataclass
class Completion:
    """One sampled completion: its prompt's index, decoded text (stop string cut), token ids, and whether it was
    truncated by max_new_tokens."""

    prompt_index: int
    text: str
    tokens: list[int]
    truncated: bool


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str], *, chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt: plain text with special tokens, or a user turn rendered with the generation prompt."""
    if not chat:
        return [tokenizer.encode(p) for p in prompts]
    return [tokenizer.encode(render_chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True),
                             add_special_tokens=False)  # the template writes BOS itself
            for p in prompts]


def text_sampling(tokenizer: Tokenizer, sampling: SamplingParams, stop: Sequence[str] = ()) -> SamplingParams:
    """`sampling` that samples only the tokenizer's ids and also stops at its stop ids and at the token sequences
    of `stop` strings."""
    sequences = []
    for s in stop:
        ids = tokenizer.encode(s, add_special_tokens=False)
        if not ids:
            raise DataError(f"stop string {s!r} encodes to no tokens; remove it")
        sequences.append(tuple(ids))
    return sampling.replace(stop_token_ids=(*sampling.stop_token_ids, *tokenizer.stop_ids),
                            stop_sequences=(*sampling.stop_sequences, *sequences), vocab_size=tokenizer.vocab_size)


def _tokenizer(model: Model) -> Tokenizer:
    if model.tokenizer is None:
        raise TokenizerError("the model has no tokenizer; load it from a folder with tokenizer files, or set "
                             "model.tokenizer (e.g. polm_jax.data.tokenizer.load_tokenizer('bytes'))")
    return model.tokenizer


def _cut(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def generate_text(model: Model, prompts: Sequence[str], sampling: SamplingParams, *, chat: bool = False,
                  stop: Sequence[str] = (), mesh=None, rules: dict | None = None) -> list[Completion]:
    """Completions of text prompts, len(prompts) * n of them, prompt-major; text decoded without special tokens."""
    tokenizer = _tokenizer(model)
    out = generate(model.config, model.params, encode_prompts(tokenizer, prompts, chat=chat),
                   text_sampling(tokenizer, sampling, stop), mesh=mesh, rules=rules)
    completions = []
    for row in range(len(out.lengths)):
        ids = out.tokens[row, : out.lengths[row]].tolist()
        completions.append(Completion(int(out.prompt_index[row]), _cut(tokenizer.decode(ids), stop), ids,
                                      bool(out.truncated[row])))
    return completions


def stream_text(model: Model, prompt: str, sampling: SamplingParams, *, chat: bool = False, stop: Sequence[str] = (),
                mesh=None, rules: dict | None = None, chunk: int = STREAM_CHUNK) -> Iterator[str]:
    """Yields the completion of one prompt (n = 1) piece by piece, decoding `chunk` tokens per device call."""
    tokenizer = _tokenizer(model)
    sampling = text_sampling(tokenizer, sampling.replace(n=1), stop)
    if not sampling.max_new_tokens:
        return
    tokens, lengths = place_prompts(encode_prompts(tokenizer, [prompt], chat=chat), model.config, sampling,
                                    mesh=mesh, rules=rules)
    engine = make_engine(model.config, sampling, mesh=mesh, rules=rules)
    state = engine.prefill(model.params, tokens, lengths, jax.random.key(sampling.seed))
    shown = 0  # characters yielded so far
    while True:
        length, done = int(state.lengths[0]), bool(state.done[0])
        last = done or length >= sampling.max_new_tokens
        text = _cut(tokenizer.decode(np.asarray(state.tokens[0, :length])), stop)
        if not last:  # an unfinished multi-byte character decodes as U+FFFD until its last byte arrives
            text = text.rstrip("\ufffd")
        if len(text) > shown:
            yield text[shown:]
            shown = len(text)
        if last:
            return
        state = engine.decode(model.params, state, int(state.step) + chunk)
