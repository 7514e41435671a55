"""Reward models: the Bradley-Terry loss, last-token pooling of packed pairs, learning a held-out preference,
LoRA with a trained head, the scoring function for RL, HF *ForSequenceClassification parity and the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_dpo import config, eval_lines, parity, write_jsonl

from polm_jax import api, cli
from polm_jax.algorithms.reward_model import (
    bradley_terry,
    reward_model_loss,
    sequence_scores,
    token_scores,
)
from polm_jax.algorithms.rl.rewards import resolve_reward
from polm_jax.config import DataSection, PreferenceSection
from polm_jax.data.pipeline import encode_example
from polm_jax.data.preference import preference_dataset
from polm_jax.data.tokenizer import byte_tokenizer
from polm_jax.errors import CheckpointError
from polm_jax.models.transformer import forward
from polm_jax.recipes.rm import reward_function, run_rm
from polm_jax.sampling.generate import generate
from polm_jax.sampling.params import SamplingParams


def test_bradley_terry_matches_its_formula_and_prefers_a_higher_chosen_reward():
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(size=64) * 3, rng.normal(size=64) * 3
    expected = np.log1p(np.exp(-(chosen - rejected)))  # -log sigma(x) in f64
    got = bradley_terry(jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda c: bradley_terry(c, jnp.asarray(rejected, jnp.float32)).sum())(
        jnp.asarray(chosen, jnp.float32))
    assert (grad < 0).all()  # raising the chosen reward lowers the loss


def _rm(seed=0, layers=2):
    return api.init("tiny-llama", seed, num_labels=1, num_layers=layers)


def _packed_batch(records, max_length=256):
    section = DataSection(max_length=max_length, packing=True, shuffle=False)
    ds, _ = preference_dataset(records, section, byte_tokenizer(), kind="paired", batch_size=2, seed=0)
    return next(iter(ds))


def test_packed_pairs_are_scored_at_each_sequences_last_token_as_alone():
    model = _rm()
    records = parity(6, 3)
    batch = _packed_batch(records)
    chosen, rejected, valid = sequence_scores(model.config, model.params, batch)
    tok = byte_tokenizer()
    alone = {}
    for r in records:
        for side in ("chosen", "rejected"):
            ids, _ = encode_example({"prompt": r["prompt"], "completion": r[side]}, tok, DataSection())
            alone[(r["prompt"], side)] = float(forward(model.config, model.params, ids[None])[0, -1, 0])
    units = np.argwhere(np.asarray(valid))
    assert len(units) >= 4  # several units per packed row
    for row, u in units:
        first = np.asarray(batch["segment_ids"][row]) == 2 * u + 1
        record = records[int(batch["record"][row][np.argmax(first)]) - 1]
        assert chosen[row, u] == pytest.approx(alone[(record["prompt"], "chosen")], abs=1e-4)
        assert rejected[row, u] == pytest.approx(alone[(record["prompt"], "rejected")], abs=1e-4)


def test_loss_is_the_bradley_terry_sum_with_centering_and_accuracy_counts_pairs():
    model = _rm()
    batch = _packed_batch(parity(6, 4))
    chosen, rejected, valid = (np.asarray(x) for x in sequence_scores(model.config, model.params, batch))
    c, r = chosen[valid].astype(np.float64), rejected[valid].astype(np.float64)
    options = PreferenceSection(center_rewards_coefficient=0.3)
    total, count, metrics = reward_model_loss(model.config, lambda p, f: p, options)(model.params, {}, batch, None)
    expected = np.sum(np.log1p(np.exp(-(c - r))) + 0.3 * (c + r) ** 2)
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert float(count) == valid.sum() >= 4
    assert float(metrics["accuracy"][0]) == np.sum(c > r)


def test_reward_model_learns_the_held_out_preference_and_scores_completions_for_rl(tmp_path):
    cfg = config(tmp_path, "train.export=polm")
    result = run_rm(cfg)
    assert result.status == "done"
    assert eval_lines(tmp_path)[-1]["eval_accuracy"] >= 0.9
    score = reward_function(str(tmp_path / "run" / "final"), batch_size=8)
    held_out = parity(40, 7)
    prompts = [r["prompt"] for r in held_out] * 2
    rewards = np.array(score(prompts, [r["chosen"] for r in held_out] + [r["rejected"] for r in held_out]))
    assert rewards.shape == (80,)
    assert np.mean(rewards[:40] > rewards[40:]) >= 0.9
    as_rl_reward = resolve_reward("reward_model", reward_model=str(tmp_path / "run" / "final"))
    np.testing.assert_allclose(as_rl_reward(prompts[:3], ["even", "odd", "even"]),
                               score(prompts[:3], ["even", "odd", "even"]), rtol=1e-5)


def test_lora_reward_model_trains_adapters_and_the_head_and_exports_merged(tmp_path):
    cfg = config(tmp_path, "lora.rank=4", "train.steps=4", "train.export=polm", "optim.lr=1e-2")
    run_rm(cfg)
    trained = api.load(str(tmp_path / "run" / "final"))
    start = api.init("tiny-llama", cfg.seed, num_labels=1)
    assert trained.config.num_labels == 1
    assert not np.allclose(trained.params["score"], start.params["score"])  # the head trained in full
    q = "layers", "attn", "q_proj", "kernel"
    assert not np.allclose(_get(trained.params, q), _get(start.params, q))  # adapters merged into the kernel
    np.testing.assert_array_equal(trained.params["embed"], start.params["embed"])  # the base stayed frozen


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return np.asarray(tree)


def test_scores_match_transformers_sequence_classification(tmp_path):
    model = _rm(seed=3)
    tok = byte_tokenizer()
    model.config = model.config.replace(pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model.tokenizer = tok
    api.save_hf(model, str(tmp_path / "hf"))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf"),
                                                                         dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    prompts, completions = ["Is 12 even or odd? ", "7*6="], ["even", "42, since 7*6 is 42"]
    ours = reward_function(str(tmp_path / "hf"))(prompts, completions)
    for p, c, mine in zip(prompts, completions, ours):
        ids, _ = encode_example({"prompt": p, "completion": c}, tok, DataSection())
        with torch.no_grad():
            theirs = hf(torch.tensor(ids[None].astype(np.int64))).logits[0, 0].item()
        assert mine == pytest.approx(theirs, abs=1e-4)
    assert api.load(str(tmp_path / "hf")).config.num_labels == 1


def test_a_causal_lm_checkpoint_gets_a_fresh_head_and_a_reward_model_cannot_generate(tmp_path):
    lm = api.init("tiny-llama", 0)
    api.save(lm, str(tmp_path / "lm"))
    rm = api.load(str(tmp_path / "lm"), num_labels=1, seed=5)
    assert "lm_head" not in rm.params and rm.params["score"].shape == (64, 1)
    np.testing.assert_array_equal(rm.params["embed"], lm.params["embed"])
    np.testing.assert_allclose(token_scores(rm.config, rm.params, {
        "tokens": jnp.ones((1, 3), jnp.int32), "positions": jnp.arange(3)[None], "segment_ids": jnp.ones((1, 3))}),
        np.asarray(forward(rm.config, rm.params, jnp.ones((1, 3), jnp.int32)))[..., 0])
    api.save(rm, str(tmp_path / "rm"))
    with pytest.raises(CheckpointError, match="num_labels=1"):
        api.load(str(tmp_path / "rm"), num_labels=2)
    with pytest.raises(CheckpointError, match="not a reward model"):
        reward_function(str(tmp_path / "lm"))
    with pytest.raises(ValueError, match="no language-model head"):
        generate(rm.config, rm.params, [[1, 2, 3]], SamplingParams(max_new_tokens=2, temperature=0.0))


def test_polm_rm_cli_trains_and_reports_accuracy(tmp_path, capsys):
    train = write_jsonl(tmp_path / "pairs.jsonl", parity(64, 0))
    code = cli.main(["rm", "--preset", "tiny-llama", f"data.train=[{train}]", "data.tokenizer=bytes",
                     "data.max_length=128", "train.steps=3", "train.batch_size=4", "train.progress=false",
                     "train.tensorboard=false", f"train.output_dir={tmp_path / 'run'}"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "done" and out["step"] == 3 and 0.0 <= out["accuracy"] <= 1.0
    assert api.load(str(tmp_path / "run" / "final")).config.num_labels == 1
