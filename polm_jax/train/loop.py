"""The one training loop: batches -> step -> metrics -> eval -> checkpoint, with preemption and NaN handling.

It knows nothing of any algorithm: it takes a jitted `train_step(state, frozen, batch) -> (state, metrics)`
(see polm_jax.train.step), an iterator of host batches (dicts of numpy arrays) and optional eval and
checkpoint hooks. Resuming is the caller's: restore the state and the iterator, then call `fit` again.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.experimental import multihost_utils

from polm_jax.errors import TrainingError
from polm_jax.train.checkpoint import Checkpointer
from polm_jax.train.metrics import MetricsWriter, Progress


@dataclass
class LoopOptions:
    total_steps: int
    log_every: int = 1
    eval_every: int = 0  # 0: eval only at the end
    save_every: int = 0  # 0: save only at the end and on preemption
    on_nan: str = "stop"  # stop | skip
    stop_at: int | None = None  # save and stop after this step, as if preempted
    progress: bool = True
    flops_per_token: float | None = None  # model FLOPs per processed token (forward + backward), for MFU
    peak_flops: float | None = None  # per device


@dataclass
class LoopResult:
    state: object
    status: str  # done | stopped (stop_at) | preempted | data_exhausted
    step: int
    last: dict = field(default_factory=dict)  # the last metrics written


class _Preemption:
    """SIGTERM (a preempted VM) asks the loop to save and stop; on several hosts they agree on the step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def due(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def batch_stats(batch: dict) -> dict:
    """Host-side figures of a batch: real (non-padding) tokens, slots (rows x length), examples, rows ({} for a
    batch without segment ids, e.g. RL's prompt indices: its step reports its own tokens)."""
    if "segment_ids" not in batch:
        return {}
    seg = np.asarray(batch["segment_ids"])
    real = int((seg > 0).sum())
    examples = int(seg.max(axis=1).sum())  # segments are numbered 1, 2, ... in each row
    return {"tokens": real, "slots": int(seg.size), "examples": examples, "rows": int(seg.shape[0])}


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def fit(state, frozen, train_step: Callable, batches: Iterator[dict], *, put_batch: Callable[[dict], dict],
        options: LoopOptions, writer: MetricsWriter, checkpointer: Checkpointer | None = None, data_iterator=None,
        eval_fn: Callable[[object], dict] | None = None, data_stats: Callable[[], dict] | None = None) -> LoopResult:
    """Trains from `state.step` to `options.total_steps`; returns the final state and why the loop ended.

    `put_batch` turns this process's host batch into global device arrays; `data_iterator` is what the
    checkpointer saves for the data position (usually `batches` itself). A non-finite loss stops the run with
    TrainingError before anything further is saved (or is skipped with on_nan="skip": the step leaves params
    unchanged either way).
    """
    start = int(state.step)
    total = options.total_steps
    progress = Progress(total, start, enabled=options.progress)
    n_proc, devices = jax.process_count(), jax.device_count()
    status, last, pending = "done", {}, None
    clock = time.perf_counter()

    def report(step, device_metrics, stats, evaluate=False):
        nonlocal clock, last
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        seconds, clock = metrics.get("step_seconds", now - clock), now  # a host-side step (RL) times itself
        if metrics["skipped_nonfinite"] and options.on_nan == "stop":
            raise TrainingError(f"step {step}: the loss or gradient is not finite (loss {metrics['loss']}, grad norm "
                                f"{metrics['grad_norm']}); stopped before saving anything from this step. Lower "
                                f"optim.lr, check the data, or set train.on_nan=skip to skip such steps")
        tokens = metrics.setdefault("tokens", stats.get("tokens", 0) * n_proc)
        metrics.update(step_seconds=seconds, tokens_per_s=tokens / seconds)
        if stats:
            metrics.update(fill=stats["tokens"] / stats["slots"], examples_per_row=stats["examples"] / stats["rows"])
        if options.flops_per_token and options.peak_flops and stats:
            metrics["mfu"] = options.flops_per_token * stats["slots"] * n_proc / seconds / (options.peak_flops * devices)
        if evaluate:  # outside the step's timing
            metrics.update(eval_fn(state))
            clock = time.perf_counter()
        if data_stats is not None:
            metrics.update({f"data/{k}": v for k, v in data_stats().items()})
        progress.update(metrics)
        if _due(step, options.log_every, total) or evaluate:
            writer.write(step, metrics)
        last = metrics

    with _Preemption() as preemption:
        try:
            exhausted, filler = False, None
            for step in range(start + 1, total + 1):
                host_batch = next(batches, None)
                if host_batch is None and n_proc == 1:
                    status = "data_exhausted"
                    break
                if host_batch is None:  # other hosts may still have data: step along with empty rows
                    exhausted, host_batch = True, filler
                filler = filler or {k: np.zeros_like(v) for k, v in host_batch.items()}
                state, device_metrics = train_step(state, frozen, put_batch(host_batch))
                if pending is not None:
                    report(*pending)  # the previous step's metrics, fetched while this step runs
                pending = (step, device_metrics, batch_stats(host_batch))
                preempted = preemption.due(step)
                stop = preempted or step == options.stop_at
                evaluate = eval_fn is not None and _due(step, options.eval_every, total)
                if stop or evaluate or exhausted or _due(step, options.save_every, total):
                    report(*pending, evaluate=evaluate)
                    pending = None
                if exhausted and last["tokens"] == 0:  # every host is out of data (all agree: a global count)
                    status = "data_exhausted"
                    break
                if checkpointer is not None and (stop or _due(step, options.save_every, total)):
                    checkpointer.save(state, data_iterator)
                if stop:
                    status = "preempted" if preempted else "stopped"
                    break
            if pending is not None:
                report(*pending)
            if status == "data_exhausted" and checkpointer is not None and int(state.step) > start:
                checkpointer.save(state, data_iterator)
        finally:
            progress.close()
            if checkpointer is not None:
                checkpointer.wait()
    return LoopResult(state, status, int(state.step), last)
