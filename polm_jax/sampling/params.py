"""SamplingParams: how to draw completions (greedy or sampled, filters, stops, samples per prompt), one frozen dataclass.

Filters apply in the order Hugging Face and vLLM use: temperature, then top-k, then top-p, then min-p. Every field
but `seed` shapes the compiled decode loop, so a run keeps one SamplingParams (the seed is a traced key).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from polm_jax.errors import ConfigError

PROMPT_TRUNCATION = ("error", "left")


@dataclass(frozen=True)
class SamplingParams:
    """Generation options. Option names follow Hugging Face's `generate` and vLLM where they have one."""

    max_new_tokens: int = 256  # tokens generated per row at most (0: nothing is generated)
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0: off)
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches top_p (1: off)
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (0: off)
    n: int = 1  # samples per prompt (GRPO's group size); they share one prefill of the prompt
    stop_token_ids: tuple[int, ...] = ()  # ids that end a row, besides the model config's eos_token_id
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id sequences that end a row when generated
    vocab_size: int | None = None  # sample only ids below this (a tokenizer smaller than the model's vocabulary)
    seed: int = 0  # the host-level `generate` derives its key from it; device-level calls take a key instead
    max_prompt_length: int | None = None  # longest prompt accepted (None: the model's max positions - max_new_tokens)
    prompt_truncation: Literal["error", "left"] = "error"  # a longer prompt: an error, or keep its last tokens

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        object.__setattr__(self, "stop_sequences", tuple(tuple(int(i) for i in s) for s in self.stop_sequences))
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens: must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature: must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k: must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p: must be in (0, 1] (1: off), got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            problems.append(f"min_p: must be in [0, 1) (0: off), got {self.min_p}")
        if self.n < 1:
            problems.append(f"n: samples per prompt must be >= 1, got {self.n}")
        if any(not s for s in self.stop_sequences):
            problems.append("stop_sequences: an empty sequence cannot stop anything; remove it")
        if self.vocab_size is not None and self.vocab_size < 1:
            problems.append(f"vocab_size: must be >= 1 or None, got {self.vocab_size}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            problems.append(f"max_prompt_length: must be >= 1 or None, got {self.max_prompt_length}")
        if self.prompt_truncation not in PROMPT_TRUNCATION:
            problems.append(f"prompt_truncation: must be one of {PROMPT_TRUNCATION}, got {self.prompt_truncation!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        """Whether tokens are the argmax (temperature 0); top-k 1 samples the argmax too."""
        return self.temperature == 0.0

    @classmethod
    def from_section(cls, section, seed: int) -> SamplingParams:
        """The params a config's `sampling:` section sets (its stop strings are applied by text.text_sampling);
        `seed` is used when the section's seed is None."""
        names = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "n", "max_prompt_length",
                 "prompt_truncation")
        return cls(**{name: getattr(section, name) for name in names},
                   seed=seed if section.seed is None else section.seed)

    def replace(self, **changes) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
