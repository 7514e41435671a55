"""Chat templates: render a conversation with the tokenizer's Jinja template, tokenize it, mask the assistant turns.

    text = render_chat(tok, messages, add_generation_prompt=True)
    ids, assistant_mask = tokenize_chat(tok, messages)   # both [T]; mask True on assistant tokens

Rendering matches transformers' `apply_chat_template`: a sandboxed Jinja environment with
trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`, transformers' `tojson`, the
`{% generation %}` tag, and the tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from polm_jax.data.tokenizer import Tokenizer
from polm_jax.errors import TokenizerError


def render_chat(tokenizer: Tokenizer, messages: list[dict], *, add_generation_prompt: bool = False,
                **template_kwargs) -> str:
    """The conversation as the model sees it; `template_kwargs` become template variables (e.g. tools=...)."""
    _check_messages(messages)
    template = _compile(tokenizer)
    variables = {**tokenizer.special_tokens, "tools": None, "documents": None, **template_kwargs}
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except Exception as e:  # anything raised while rendering comes from the template's own code
        raise TokenizerError(f"chat template of {tokenizer.folder} failed: {e}") from e


def tokenize_chat(tokenizer: Tokenizer, messages: list[dict], *,
                  add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation (as transformers' apply_chat_template(tokenize=True))
    and a mask, True on each assistant message's tokens and its end-of-turn text (not the role header)."""
    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    spans = _assistant_spans(tokenizer, messages, text)
    ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=False)  # the template wrote BOS
    mask = [end > start and any(start < e and end > s for s, e in spans) for start, end in offsets]
    return ids, mask


def _assistant_spans(tokenizer: Tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of `text` written by each assistant message: the render of the
    messages through it, minus the render of those before it with the generation prompt."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise TokenizerError(
                f"chat template of {tokenizer.folder} is not prefix-consistent at messages[{i}]: rendering the "
                f"conversation up to messages[{i}] is not a prefix of rendering all of it (the template rewrites "
                "earlier turns), so assistant tokens cannot be located; use a template that renders each turn "
                "the same whatever follows it"
            )
        spans.append((len(before), len(through)))
    return spans


def _check_messages(messages) -> None:
    """TokenizerError unless `messages` is a list of {"role": str, "content": ...} dicts."""
    if not isinstance(messages, (list, tuple)):
        raise TokenizerError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message):
            raise TokenizerError(
                f"messages[{i}] must be a dict with a string 'role' and a 'content', got {message!r:.200}"
            )


def _compile(tokenizer: Tokenizer) -> jinja2.Template:
    """The tokenizer's chat template, compiled once per template text."""
    if tokenizer.chat_template is None:
        raise TokenizerError(
            f"the tokenizer in {tokenizer.folder} has no chat template; set 'chat_template' in its "
            "tokenizer_config.json or add a chat_template.jinja file next to it"
        )
    try:
        return _compile_text(tokenizer.chat_template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template of {tokenizer.folder}, line {e.lineno}: {e.message}") from e


@functools.lru_cache(maxsize=32)
def _compile_text(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env.from_string(template)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' `tojson`: plain json.dumps, no HTML escaping, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant marker): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()
