"""Errors polm-jax raises for bad input: each says what was wrong, where, and what to do."""


class PolmError(ValueError):
    """Base class of every bad-input error raised by polm-jax."""


class ConfigError(PolmError):
    """A config file or command-line override is invalid (unknown key, wrong type, bad value)."""


class CheckpointError(PolmError):
    """A checkpoint folder cannot be loaded into the requested model (missing, extra or misshaped tensors)."""


class TokenizerError(PolmError):
    """A tokenizer file is missing or cannot be parsed, or a chat template fails to render."""


class DataError(PolmError):
    """A data record is malformed, lacks its fields, or cannot be fit to the configured length."""


class TrainingError(PolmError):
    """Training cannot go on: a non-finite loss, a batch that does not fit the mesh, data that ran out too early."""
