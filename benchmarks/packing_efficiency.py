"""Packing efficiency of the real SFT pipeline (sft_dataset, packing on vs off) on chat-like example lengths.

    python benchmarks/packing_efficiency.py [--records 2000] [--median 300] [--sigma 1.0] [--max-length 2048]
        [--batch 8] [--batches 64]

Writes a JSONL file of {"prompt", "completion"} records whose token counts (built-in byte tokenizer: one token
per ASCII character, plus BOS and EOS) follow a lognormal distribution (median --median, log-space sigma --sigma,
clipped to [16, max_length]; the prompt takes 10-50% of each), then reads --batches batches of the repeated,
shuffled stream (steady state: no end-of-data flush) and reports the fraction of row slots holding real tokens
(fill), the fraction that are loss targets, examples per row and the pipeline's throughput.
"""

import argparse
import json
import os
import string
import tempfile
import time

import numpy as np
from common import emit

from polm_jax.config import DataSection
from polm_jax.data.pipeline import sft_dataset
from polm_jax.data.sources import open_sources
from polm_jax.data.tokenizer import byte_tokenizer
from polm_jax.train.loop import batch_stats

LETTERS = np.array(list(string.ascii_lowercase + " "))


def token_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, max_length: int) -> np.ndarray:
    """n example lengths in tokens: lognormal(log(median), sigma), rounded and clipped to [16, max_length]."""
    return np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), 16, max_length).astype(int)


def write_records(path: str, lengths: np.ndarray, rng: np.random.Generator) -> None:
    """One prompt/completion record per length: len(prompt) + len(completion) + 2 (BOS, EOS) = length bytes."""
    with open(path, "w") as f:
        for n in lengths:
            text = "".join(rng.choice(LETTERS, n - 2))
            cut = max(1, int(rng.uniform(0.1, 0.5) * (n - 2)))
            f.write(json.dumps({"prompt": text[:cut], "completion": text[cut:]}) + "\n")


def measure(path: str, section: DataSection, batch: int, batches: int) -> dict:
    """Reads `batches` batches of sft_dataset(path): totals of loop.batch_stats and loss targets; examples and
    seconds after the first batch (start-up excluded) for the throughput."""
    ds, _ = sft_dataset(open_sources([path], section), section, byte_tokenizer(), batch_size=batch, seed=0)
    totals = {"tokens": 0, "slots": 0, "examples": 0, "rows": 0, "targets": 0}
    iterator = iter(ds)
    for i in range(batches):
        rows = next(iterator)
        if i == 0:
            t0, first = time.perf_counter(), batch_stats(rows)
        for key, value in batch_stats(rows).items():
            totals[key] += value
        totals["targets"] += int(rows["loss_mask"].sum())
    seconds = time.perf_counter() - t0
    return {**totals, "rate_examples": totals["examples"] - first["examples"],
            "rate_tokens": totals["tokens"] - first["tokens"], "seconds": seconds}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--median", type=float, default=300.0, help="median example length in tokens")
    parser.add_argument("--sigma", type=float, default=1.0, help="sigma of the log length")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="rows per batch")
    parser.add_argument("--batches", type=int, default=64, help="batches read per setting")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    lengths = token_lengths(rng, args.records, args.median, args.sigma, args.max_length)
    shape = {"records": args.records, "median": args.median, "sigma": args.sigma, "max_length": args.max_length,
             "batch": args.batch, "rows": args.batch * args.batches}
    emit("example_length_mean", float(lengths.mean()), "tokens", p50=int(np.median(lengths)),
         p90=int(np.percentile(lengths, 90)), p99=int(np.percentile(lengths, 99)),
         clipped=int((lengths == args.max_length).sum()), **shape)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "chat_like.jsonl")
        write_records(path, lengths, rng)
        for packing in (True, False):
            section = DataSection(train=[path], tokenizer="bytes", max_length=args.max_length, packing=packing)
            t = measure(path, section, args.batch, args.batches)
            details = {"packing": packing, **shape}
            emit("fill", t["tokens"] / t["slots"], "fraction of slots", **details)
            emit("loss_targets_per_slot", t["targets"] / t["slots"], "fraction of slots", **details)
            emit("examples_per_row", t["examples"] / t["rows"], "examples/row", **details)
            emit("pipeline_examples_per_s", t["rate_examples"] / t["seconds"], "examples/s",
                 tokens_per_s=round(t["rate_tokens"] / t["seconds"]), threads=section.num_threads,
                 timing="after the first batch", load_avg_1m=round(os.getloadavg()[0], 2), **details)


if __name__ == "__main__":
    main()
