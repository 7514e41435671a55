"""Multi-host SFT for real: two local processes joined by jax.distributed (4 CPU devices each, one 8-device mesh
data=2 fsdp=2 tensor=2) train a few steps, each reading its own shard, and reach the losses of the same run in
one 8-device process; their checkpoint holds both processes' data positions and restores on one process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import polm_jax as pj
from polm_jax.config import Config, load_config
from polm_jax.data.pipeline import sft_dataset
from polm_jax.data.sources import open_sources
from polm_jax.data.tokenizer import byte_tokenizer
from polm_jax.errors import CheckpointError
from polm_jax.recipes.sft import run_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "sft_tiny.yaml")
WORKER = os.path.join(os.path.dirname(__file__), "multihost_sft_worker.py")
STEPS, BATCH = 4, 8
EXAMPLES = STEPS * BATCH
# No packing: a host packs only its own stream, so packed global batches would depend on the host count.
# One epoch of exactly STEPS batches: every example is read once, read-ahead included, so the counts are exact.
OVERRIDES = ["model.overrides={num_layers: 2}", "data.max_length=64", "data.packing=false", "data.eval=[]",
             f"data.train=[synthetic:arithmetic:{EXAMPLES}]", "data.epochs=1", "optim.warmup_steps=2",
             f"train.steps={STEPS}", f"train.batch_size={BATCH}", "train.progress=false", "train.tensorboard=false",
             "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(out) -> Config:
    return load_config(Config, TINY, [*OVERRIDES, f"train.output_dir={out}"])


def _metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _stream_counts(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss tokens) of each example of the one-process epoch, in stream order [EXAMPLES]."""
    ds, _ = sft_dataset(open_sources(cfg.data.train, cfg.data), cfg.data, byte_tokenizer(), batch_size=BATCH,
                        seed=cfg.seed, train=True)
    batches = list(ds)
    tokens = np.concatenate([(b["segment_ids"] > 0).sum(1) for b in batches])
    return tokens, np.concatenate([b["loss_mask"].sum(1) for b in batches])


def test_two_processes_train_like_one_and_read_their_own_shards(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    port, env = _free_port(), {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    reports = [tmp_path / f"process_{i}.json" for i in range(2)]
    workers = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), str(reports[i]), *OVERRIDES,
                                 f"train.output_dir={two}"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    try:
        single = run_sft(_cfg(one))  # the same run in this process (8 devices), while the workers run
        outputs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()  # only if still running (a failure above)
    for w, output in zip(workers, outputs):
        assert w.returncode == 0, output[-3000:]
    seen = [json.loads(r.read_text()) for r in reports]
    assert [s["process_index"] for s in seen] == [0, 1]
    assert all(s["status"] == "done" and s["step"] == STEPS for s in seen)

    # The same global batches (non-padding token counts) and, up to summation order, the same losses.
    multi, ref = _metrics(two), _metrics(one)  # process 0 writes the 2-process run's metrics
    assert [m["step"] for m in multi] == [m["step"] for m in ref] == list(range(1, STEPS + 1))
    assert [m["tokens"] for m in multi] == [m["tokens"] for m in ref]
    np.testing.assert_allclose([m["loss"] for m in multi], [m["loss"] for m in ref], rtol=1e-5)
    np.testing.assert_allclose([m["grad_norm"] for m in multi], [m["grad_norm"] for m in ref], rtol=1e-4)
    assert all(s["last"]["loss"] == multi[-1]["loss"] for s in seen)  # both processes see the global loss

    # Each process read exactly its strided half of the stream (example k on process k % 2), and nothing else.
    tokens, loss_tokens = _stream_counts(_cfg(one))
    assert single.last["data/examples"] == EXAMPLES and single.last["data/tokens"] == tokens.sum()
    for i, s in enumerate(seen):
        data = s["last"]
        assert data["data/examples"] == EXAMPLES // 2, data
        assert data["data/tokens"] == tokens[i::2].sum() and data["data/loss_tokens"] == loss_tokens[i::2].sum()
    assert tokens[0::2].sum() != tokens[1::2].sum()  # so the counts above tell the two shards apart

    # One checkpoint folder written by both processes: each one's data position, and the state, which
    # restores in one process onto the 8-device mesh and equals the 1-process run's.
    step = two / "checkpoints" / str(STEPS)
    positions = sorted(n for n in os.listdir(step / "data") if n.startswith("process_"))
    assert positions == ["process_0-of-2.json", "process_1-of-2.json"]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), single.state)
    restored = ocp.StandardCheckpointer().restore(step / "state", abstract)
    assert int(restored.step) == STEPS
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 restored.params, single.state.params)
    final = pj.load(str(two / "final"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 final.params, restored.params)

    # Resuming it with another number of processes is refused with the reason (the data position is per process).
    with pytest.raises(CheckpointError, match="another number of processes"):
        run_sft(load_config(Config, TINY, [*OVERRIDES, f"train.output_dir={two}", f"train.steps={STEPS + 1}"]))
