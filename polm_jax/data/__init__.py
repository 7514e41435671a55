"""Data: tokenizers, chat templates, sources and pipelines."""
