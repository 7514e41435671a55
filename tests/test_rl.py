"""Reasoning RL end to end: the train batch matches the sampler, GRPO raises the reward, exact resume, dynamic
sampling, failing reward functions, LoRA with the base as reference, and `polm rl`."""

import json
import random
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polm_jax import api, cli
from polm_jax.algorithms.rl.rollout import completion_outputs, train_rows
from polm_jax.config import Config, load_config
from polm_jax.data.tokenizer import byte_tokenizer
from polm_jax.recipes.rl import run_rl
from polm_jax.recipes.sft import run_sft
from polm_jax.sampling.engine import make_rollout
from polm_jax.sampling.params import SamplingParams

REWARDS = '''
import time

def says_even(prompts, completions, **_):
    return [float(c.strip() == "even") for c in completions]

def right_parity(prompts, completions, answer, **_):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def half_constant(prompts, completions, answer, **_):
    """Equal rewards for every completion of an odd-digit prompt: those groups carry no signal."""
    return [0.5 if a == "odd" else float(c.strip() == a) for c, a in zip(completions, answer)]

def broken(prompts, completions, **_):
    raise RuntimeError("this reward function is broken")

def hangs(prompts, completions, **_):
    time.sleep(30)
'''


def parity(n: int, seed: int, noisy: bool) -> list[dict]:
    """Parity questions; the SFT target is a coin flip when `noisy` (the policy starts near 50% right)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x = rng.randint(0, 9999)
        right = "even" if x % 2 == 0 else "odd"
        out.append({"prompt": f"Is {x} even or odd? Its last digit is {x % 10}: ",
                    "completion": rng.choice(["even", "odd"]) if noisy else right, "answer": right})
    return out


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


COMMON = ["data.tokenizer=bytes", "train.progress=false", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny model SFT-ed to answer "even" or "odd" (at random), the prompts, and a module of reward functions."""
    root = tmp_path_factory.mktemp("rl")
    (root / "rl_test_rewards.py").write_text(REWARDS)
    sys.path.insert(0, str(root))
    train = _jsonl(root / "train.jsonl", parity(2000, 0, noisy=True))
    held_out = _jsonl(root / "eval.jsonl", parity(32, 1, noisy=False))
    run_sft(load_config(Config, None, [*COMMON, "model.preset=tiny-llama", f"data.train=[{train}]",
                                       "data.max_length=64", "train.steps=80", "train.batch_size=8", "optim.lr=3e-3",
                                       f"train.output_dir={root / 'sft'}"]))
    yield {"root": root, "train": train, "eval": held_out, "model": str(root / "sft" / "final")}
    sys.path.remove(str(root))


def rl_config(task, out, *overrides) -> Config:
    return load_config(Config, None, [
        *COMMON, f"model.path={task['model']}", "model.preset=null", f"data.train=[{task['train']}]",
        "rl.max_prompt_length=48", "rl.max_completion_length=6", "rl.num_generations=8",
        "rl.rewards=[rl_test_rewards:says_even]", "train.batch_size=8", "optim.lr=1e-3", "optim.schedule=constant",
        "optim.weight_decay=0", "train.export=none", f"train.output_dir={out}", *overrides])


def metric_lines(out) -> list[dict]:
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_train_batch_scores_the_sampled_tokens_as_the_sampler_did():
    tok = byte_tokenizer()
    model = api.init("tiny-llama", 0)
    config = model.config.replace(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    width, group = 16, 4
    prompts = [tok.encode("Is 12 even?"), tok.encode("hi")]
    tokens = np.full((2, width), tok.pad_id, np.int32)
    lengths = np.array([len(p) for p in prompts], np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
    out = make_rollout(config, SamplingParams(max_new_tokens=6, n=group, seed=0))(model.params, tokens, lengths,
                                                                                 jax.random.key(1))
    mask = jnp.arange(6)[None] < out.lengths[:, None]
    batch = train_rows(jnp.asarray(tokens), jnp.asarray(lengths), out, group, mask)
    assert batch["tokens"].shape == (8, width + 6)
    logp, _, _ = completion_outputs(config, model.params, batch, width, 1.0)
    np.testing.assert_allclose(np.where(mask, logp, 0), np.where(mask, out.model_logprobs, 0), atol=1e-4)


def test_grpo_raises_the_mean_reward_and_logs_every_figure(task, tmp_path):
    result = run_rl(rl_config(task, tmp_path, "train.steps=16"))
    assert result.status == "done" and result.step == 16
    lines = metric_lines(tmp_path)
    rewards = [m["reward/mean"] for m in lines]
    assert np.mean(rewards[-4:]) >= np.mean(rewards[:4]) + 0.2
    for key in ("rewards/rl_test_rewards:says_even/mean", "completion_length/mean", "completion_length/max",
                "completion_length/clipped_fraction", "clip_fraction", "entropy", "rollout_tokens_per_s",
                "time/rollout", "time/scoring", "time/update", "grad_norm"):
        assert np.isfinite(lines[-1][key]), key
    assert lines[-1]["ratio_mean"] == pytest.approx(1.0) and lines[-1]["clip_fraction"] == 0.0  # mu = 1


def test_resume_mid_run_is_exact(task, tmp_path):
    straight = run_rl(rl_config(task, tmp_path / "a", "train.steps=4", "rl.num_iterations=2", "rl.num_minibatches=2"))
    first = run_rl(rl_config(task, tmp_path / "b", "train.steps=4", "train.stop_at=2", "rl.num_iterations=2",
                             "rl.num_minibatches=2"))
    assert first.status == "stopped" and first.step == 2
    resumed = run_rl(rl_config(task, tmp_path / "b", "train.steps=4", "rl.num_iterations=2", "rl.num_minibatches=2"))
    assert resumed.step == 4
    for a, b in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [m["reward/mean"] for m in metric_lines(tmp_path / "a")][2:] == \
        [m["reward/mean"] for m in metric_lines(tmp_path / "b")][2:]


def test_dynamic_sampling_drops_groups_without_signal_and_fills_the_batch(task, tmp_path):
    reward = "rl.rewards=[rl_test_rewards:half_constant]"
    run_rl(rl_config(task, tmp_path / "off", "train.steps=2", reward))
    run_rl(rl_config(task, tmp_path / "on", "train.steps=2", reward, "rl.dynamic_sampling=true"))
    off, on = metric_lines(tmp_path / "off"), metric_lines(tmp_path / "on")
    assert all(m["dynamic_sampling/informative_groups"] < 0.9 for m in off)  # about half the prompts are odd
    assert all(m["dynamic_sampling/informative_groups"] == 1.0 for m in on)
    assert all(m["dynamic_sampling/refills"] >= 1 for m in on)


def test_failing_reward_functions_score_zero_are_counted_and_the_run_goes_on(task, tmp_path):
    result = run_rl(rl_config(task, tmp_path, "train.steps=2", "rl.reward_timeout_s=0.5",
                              "rl.rewards=[rl_test_rewards:says_even,rl_test_rewards:broken,rl_test_rewards:hangs]"))
    assert result.status == "done"
    last = metric_lines(tmp_path)[-1]
    assert last["reward_failures/rl_test_rewards:broken"] == 1.0
    assert last["reward_failures/rl_test_rewards:hangs"] == 1.0
    assert last["reward/mean"] == pytest.approx(last["rewards/rl_test_rewards:says_even/mean"])


def test_lora_rl_with_a_kl_penalty_uses_the_base_as_reference(task, tmp_path):
    result = run_rl(rl_config(task, tmp_path, "train.steps=2", "lora.rank=4", "rl.beta=0.04",
                              f"data.eval=[{task['eval']}]", "train.eval_every=2",
                              "rl.rewards=[rl_test_rewards:right_parity]"))
    lines = metric_lines(tmp_path)
    assert result.status == "done"
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first round's policy is the base
    assert lines[-1]["kl"] > 0.0 and 0.0 <= lines[-1]["eval_reward"] <= 1.0
    leaves = jax.tree.leaves(result.state.params)
    base = api.load(task["model"])
    assert sum(x.size for x in leaves) < sum(x.size for x in jax.tree.leaves(base.params)) / 5  # adapters only


def test_polm_rl_cli(task, tmp_path, capsys):
    code = cli.main(["rl", "--model", task["model"], *COMMON, f"data.train=[{task['train']}]",
                     "rl.rewards=[rl_test_rewards:says_even]", "rl.max_prompt_length=48",
                     "rl.max_completion_length=6", "rl.num_generations=4", "train.steps=2", "train.batch_size=4",
                     f"train.output_dir={tmp_path}"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "done" and out["step"] == 2 and 0.0 <= out["reward/mean"] <= 1.0
    assert api.load(str(tmp_path / "final")).config.num_layers == 2


def test_ppo_with_a_value_head_raises_the_reward_and_exports_the_policy_alone(task, tmp_path):
    result = run_rl(rl_config(task, tmp_path, "train.steps=16", "rl.advantage=gae", "rl.loss_type=dapo",
                              "rl.num_iterations=2", "rl.vf_coef=0.5", "train.export=polm"))
    lines = metric_lines(tmp_path)
    rewards = [m["reward/mean"] for m in lines]
    assert np.mean(rewards[-4:]) >= np.mean(rewards[:4]) + 0.2
    assert lines[0]["values/mean"] == 0.0 and lines[-1]["values/mean"] > 0.1  # the critic learns the reward
    assert np.isfinite(lines[-1]["value_loss"]) and 0.0 <= lines[-1]["value_clip_fraction"] <= 1.0
    assert result.state.params["value_head"].shape == (64,)
    assert "value_head" not in api.load(str(tmp_path / "final")).params
