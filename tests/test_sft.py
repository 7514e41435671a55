"""SFT end to end through `run_sft` and `polm sft`: learning, exact resume, crashes mid-save, preemption, NaN
losses, bad data, LoRA checkpoints and merged exports, and `polm plan`."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from hf_models import build_hf_model

import polm_jax as pj
from polm_jax.config import Config, load_config
from polm_jax.errors import CheckpointError, DataError, TrainingError
from polm_jax.models import lora
from polm_jax.recipes.sft import run_sft
from polm_jax.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "sft_tiny.yaml")
FAST = ["model.overrides={num_layers: 2}", "data.max_length=64", "train.progress=false", "train.batch_size=4",
        "data.eval=[]", "optim.warmup_steps=2"]


def _cfg(out, *overrides) -> Config:
    return load_config(Config, TINY, [f"train.output_dir={out}", *FAST, *overrides])


def _metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_the_tiny_model_learns_arithmetic(tmp_path):
    out = tmp_path / "run"
    result = run_sft(_cfg(out, "train.steps=60", "optim.lr=1e-2", "data.eval=[synthetic:arithmetic:64:1]",
                          "train.eval_every=30", "train.save_every=30"))
    metrics = _metrics(out)
    first, last = metrics[0], metrics[-1]
    assert result.status == "done" and last["step"] == 60
    assert last["loss"] < 0.5 * first["loss"] and last["eval_loss"] < 0.5 * first["loss"]
    for key in ("grad_norm", "lr", "tokens_per_s", "fill", "examples_per_row", "data/examples"):
        assert key in last
    assert 0.5 < last["fill"] <= 1 and last["examples_per_row"] > 1  # packed rows
    assert [m["step"] for m in metrics if "eval_loss" in m] == [30, 60]
    assert os.listdir(out / "tensorboard") and Checkpointer(str(out / "checkpoints")).all_steps() == [30, 60]
    model = pj.load(str(out / "final"))
    assert model.tokenizer is not None and model.tokenizer.vocab_size <= model.config.vocab_size
    assert model.config.eos_token_id == model.tokenizer.eos_id  # the exported model stops where its tokenizer does
    _assert_same(model.params, result.state.params)


@pytest.mark.parametrize("extra", [[], ["lora.rank=4", "lora.dropout=0.1"]], ids=["full", "lora"])
def test_resuming_after_a_stop_is_exact(tmp_path, extra):
    straight = run_sft(_cfg(tmp_path / "a", "train.steps=6", *extra))
    stopped = run_sft(_cfg(tmp_path / "b", "train.steps=6", "train.stop_at=3", *extra))
    assert stopped.status == "stopped" and stopped.step == 3 and not os.path.exists(tmp_path / "b" / "final")
    resumed = run_sft(_cfg(tmp_path / "b", "train.steps=6", *extra))
    assert resumed.status == "done" and resumed.step == 6
    _assert_same(resumed.state.params, straight.state.params)
    _assert_same(resumed.state.opt_state, straight.state.opt_state)
    losses = {m["step"]: m["loss"] for m in _metrics(tmp_path / "a")}
    assert {m["step"]: m["loss"] for m in _metrics(tmp_path / "b")} == losses  # same batches in the same order


def _polm(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "polm_jax.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, **kwargs)


def _sft_args(out, *overrides):
    return ["sft", "--config", TINY, f"train.output_dir={out}", *FAST, *overrides]


def test_a_process_killed_mid_save_resumes_from_the_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    # A wider model makes each save take long enough to be caught in the middle.
    args = _sft_args(out, "train.steps=400", "train.save_every=1", "train.keep=2",
                     "model.overrides={num_layers: 2, hidden_size: 256, intermediate_size: 1024, num_heads: 8}")
    caught = None
    for _ in range(3):  # saves run back to back, so one is nearly always in progress
        proc = _polm(*args)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not caught:
            names = os.listdir(checkpoints) if checkpoints.exists() else []
            if any("tmp" in n for n in names) and any(n.isdigit() for n in names):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                caught = [n for n in os.listdir(checkpoints) if "tmp" in n]
            time.sleep(0.01)
        proc.kill()
        output = proc.communicate()[0]
        if caught:
            break
    assert caught, f"never caught a save in progress: {output[-2000:]}"
    manager = ocp.CheckpointManager(str(checkpoints), options=ocp.CheckpointManagerOptions(read_only=True))
    latest = manager.latest_step()
    assert latest is not None and not any(p.startswith(f"{latest}.") for p in caught)
    result = run_sft(_cfg(out, "train.steps=" + str(latest + 2), "train.save_every=1",
                          "model.overrides={num_layers: 2, hidden_size: 256, intermediate_size: 1024, num_heads: 8}"))
    assert result.status == "done" and result.step == latest + 2
    assert not [p for p in os.listdir(checkpoints) if "tmp" in p]
    resumed_steps = [m["step"] for m in _metrics(out)]
    assert resumed_steps[-2:] == [latest + 1, latest + 2]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = _polm(*_sft_args(out, "train.steps=100000"))
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.1)
    while time.time() < deadline and len(_metrics(out)) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["status"] == "preempted"
    assert Checkpointer(str(out / "checkpoints")).latest_step() == summary["step"] >= 3


def _nan_checkpoint(folder):
    model = pj.init("tiny-llama", seed=0, num_layers=2)
    model.params["final_norm"]["scale"] = model.params["final_norm"]["scale"] * np.nan
    pj.save(model, str(folder))


def test_a_nan_loss_stops_before_any_checkpoint_is_written(tmp_path):
    _nan_checkpoint(tmp_path / "nan_model")
    cfg = _cfg(tmp_path / "run", f"model.path={tmp_path / 'nan_model'}", "train.steps=4", "train.save_every=1")
    with pytest.raises(TrainingError, match=r"step 1: the loss or gradient is not finite.*train.on_nan=skip"):
        run_sft(cfg)
    assert Checkpointer(str(tmp_path / "run" / "checkpoints")).all_steps() == []

    skipped = run_sft(_cfg(tmp_path / "skip", f"model.path={tmp_path / 'nan_model'}", "train.steps=2",
                           "train.on_nan=skip"))
    assert skipped.status == "done" and all(m["skipped_nonfinite"] == 1 for m in _metrics(tmp_path / "skip"))


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_malformed_jsonl_line_is_named_or_skipped_and_counted(tmp_path):
    good = [json.dumps({"prompt": f"What is {i} + 1?", "completion": str(i + 1)}) for i in range(40)]
    data = _write_jsonl(tmp_path / "data.jsonl", good[:7] + ['{"prompt": "oops"'] + good[7:])
    proc = _polm(*_sft_args(tmp_path / "run", f"data.train=[{data}]", "train.steps=3"))
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2 and f"{data}:8" in output and "data.on_error" in output, output[-2000:]

    result = run_sft(_cfg(tmp_path / "skip", f"data.train=[{data}]", "train.steps=3", "data.on_error=skip"))
    assert result.status == "done" and result.last["data/skipped"] >= 1  # once per pass over the file
    assert all(f"{data}:8" in problem for problem in result.last["data/problems"])


def test_missing_fields_and_empty_completions_are_named(tmp_path):
    data = _write_jsonl(tmp_path / "data.jsonl", [json.dumps({"prompt": "2 + 2?", "completion": "4"}),
                                                   json.dumps({"question": "no fields we know"})])
    with pytest.raises(DataError, match=f"{data}:2"):
        run_sft(_cfg(tmp_path / "a", f"data.train=[{data}]", "train.steps=2", "data.shuffle=false"))
    data = _write_jsonl(tmp_path / "empty.jsonl", [json.dumps({"prompt": "2 + 2?", "completion": ""})])
    with pytest.raises(DataError, match=r"empty.jsonl:1.*empty"):
        run_sft(_cfg(tmp_path / "b", f"data.train=[{data}]", "train.steps=2"))


def test_lora_trains_only_adapters_and_exports_a_merged_model_transformers_loads(tmp_path):
    import transformers

    build_hf_model("llama", tmp_path / "base")
    base = pj.load(str(tmp_path / "base"))
    out = tmp_path / "run"
    result = run_sft(_cfg(out, f"model.path={tmp_path / 'base'}", "model.overrides={}", "lora.rank=4",
                          "lora.targets=[q, v, down]", "train.steps=4", "train.export=hf", "optim.lr=1e-2"))
    adapters = result.state.params
    assert {p for p in lora.target_paths(base.config, ["q", "v", "down"])} == {
        ("layers", "attn", "q_proj"), ("layers", "attn", "v_proj"), ("layers", "mlp", "down_proj")}
    leaves = jax.tree_util.tree_flatten_with_path(adapters)[0]
    assert leaves and all(str(path[-1].key) in ("lora_a", "lora_b") for path, _ in leaves)
    assert float(np.abs(adapters["layers"]["attn"]["q_proj"]["lora_b"]).max()) > 0  # trained

    saved = ocp.StandardCheckpointer().metadata(str(out / "checkpoints" / "4" / "state")).item_metadata.tree
    saved_leaves = jax.tree_util.tree_flatten_with_path(saved["params"])[0]
    assert {str(p[-1].key) for p, _ in saved_leaves} == {"lora_a", "lora_b"}  # only adapters in the checkpoint

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out / "final").eval()
    tokens = np.random.default_rng(0).integers(0, 263, (2, 12), dtype=np.int32)
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = pj.forward(base.config, lora.apply(base.params, adapters, 16.0 / 4), tokens)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)


def test_plan_sizes_an_8b_lora_run_without_allocating_it(tmp_path):
    config = os.path.join(ROOT, "configs", "sft_llama3.1-8b_lora_8chips.yaml")
    proc = _polm("plan", "--config", config, "--json")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    figures = json.loads(output.strip().splitlines()[-1])
    assert figures["devices"] == 8 and abs(figures["params"] - 8.03e9) < 0.01e9
    assert 0 < figures["trainable_params"] < 0.01 * figures["params"]
    assert 1.8 * 2**30 < figures["param_bytes_per_device"] < 2.2 * 2**30  # 16 GB of bf16 over 8 chips
    assert figures["step_peak_bytes"] > figures["param_bytes_per_device"]
    assert 28e9 < figures["flops_per_token"] < 36e9  # 4 x 7.5B frozen weights (no weight gradients) + attention


def test_resuming_a_checkpoint_of_another_model_is_refused(tmp_path):
    run_sft(_cfg(tmp_path / "run", "train.steps=1"))
    with pytest.raises(CheckpointError, match="does not match this run's model"):
        run_sft(_cfg(tmp_path / "run", "train.steps=2", "model.overrides={num_layers: 3}"))
