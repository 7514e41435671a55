"""Metrics out of the loop: a JSONL file (always), TensorBoard event files, a progress bar; FLOPs and MFU estimates."""

from __future__ import annotations

import json
import math
import os
import time

import jax
from tqdm.auto import tqdm

from polm_jax.models.config import ModelConfig

# Peak dense bf16 FLOP/s per device by jax `device_kind` prefix (vendor data sheets).
PEAK_FLOPS = {
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
    "NVIDIA GH200": 989e12, "NVIDIA B200": 2250e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}  # fmt: skip


def peak_flops(device=None) -> float | None:
    """Peak bf16 FLOP/s of one device, if its kind is known (CPUs are not)."""
    kind = (device or jax.devices()[0]).device_kind
    return next((v for k, v in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])) if kind.startswith(k)), None)


def flops_per_token(config: ModelConfig, seq_len: int, *, backward: bool = True, weight_grads: bool = True) -> float:
    """Model FLOPs per token of a [*, seq_len] pass: 2 per weight (embedding lookup excluded, output projection
    included) plus causal attention scores and values; the backward doubles that for input gradients and, with
    `weight_grads` (not for a frozen LoRA base), again for weight gradients."""
    weights = config.num_params() - config.vocab_size * config.hidden_size * (0 if config.tie_embeddings else 1)
    windows = [min(config.sliding_window, seq_len) if s else seq_len for s in config.is_sliding]
    attention = sum(2 * 2 * config.num_heads * config.head_dim * w / 2 for w in windows)  # q.k and p.v, causal half
    if not backward:
        return 2 * weights + attention
    return (6 if weight_grads else 4) * weights + 3 * attention


class MetricsWriter:
    """Appends one JSON object per call to `metrics.jsonl` and mirrors scalars to TensorBoard (process 0 writes)."""

    def __init__(self, directory: str, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(directory, "metrics.jsonl")
        self._file = self._tb = None
        if self.active:
            os.makedirs(directory, exist_ok=True)
            self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the run)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        """Records `metrics` (name -> number) at `step`; non-finite numbers are written as null in JSON."""
        if not self.active:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else None) if isinstance(v, (int, float)) else v
                 for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in clean.items():
                if isinstance(value, float):
                    self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A progress bar over steps showing loss and tokens/s (tqdm gives the ETA); silent off process 0."""

    def __init__(self, total: int, initial: int, *, enabled: bool = True, desc: str = "train"):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not enabled or jax.process_index() != 0)

    def update(self, metrics: dict) -> None:
        shown = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics.get('tokens_per_s', 0):,.0f}"}
        if "eval_loss" in metrics:
            shown["eval"] = f"{metrics['eval_loss']:.4f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
