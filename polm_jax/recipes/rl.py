"""`polm rl`: policy-gradient RL with verifiable rewards (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++, GSPO).

One loop step is a round: B prompts (train.batch_size) -> the KV-cache sampler draws G completions each with the
current params, on device -> the reward functions score the decoded text on the host -> group advantages -> mu
passes (rl.num_iterations) of rl.num_minibatches optimizer steps over the B * G completions. The sampler reads
the trained params straight from the device (with LoRA, the adapters applied to the shared base: no merged copy).
The round's randomness comes from the state's RNG and step, and the prompt order from the checkpointed data
iterator, so a resumed run continues exactly.
"""

from __future__ import annotations

import time
from functools import partial

import grain
import jax
import jax.numpy as jnp
import numpy as np

from polm_jax.algorithms.rl import rewards as rewards_lib
from polm_jax.algorithms.rl.advantages import (
    gae,
    group_advantages,
    group_is_informative,
    whiten,
)
from polm_jax.algorithms.rl.rollout import completion_outputs, rl_loss, train_rows
from polm_jax.config import Config
from polm_jax.data.sources import open_sources
from polm_jax.errors import ConfigError, DataError
from polm_jax.eval.run import prompt_text
from polm_jax.sampling.engine import Rollout, make_rollout
from polm_jax.sampling.generate import max_prompt_length
from polm_jax.sampling.params import SamplingParams
from polm_jax.sampling.text import encode_prompts, text_sampling
from polm_jax.train.loop import LoopResult
from polm_jax.train.session import VALUE_HEAD, Session

EVAL_BATCH = 32  # held-out prompts per greedy rollout


def build_rewards(cfg: Config) -> rewards_lib.RewardSet:
    """The configured reward functions with their weights and timeout."""
    o = cfg.rl
    options = {"max_completion_length": o.max_completion_length, "overlong_cache_length": o.overlong_cache_length,
               "reward_model": o.reward_model}
    if o.format_pattern:
        options["format_pattern"] = o.format_pattern
    weights = o.reward_weights or [1.0] * len(o.rewards)
    functions = [(spec, rewards_lib.resolve_reward(spec, **options), w) for spec, w in zip(o.rewards, weights)]
    return rewards_lib.RewardSet(functions, timeout_s=o.reward_timeout_s)


def prompt_batches(size: int, batch_size: int, *, seed: int, shuffle: bool, epochs: int | None) -> grain.IterDataset:
    """Batches {"record": [batch_size] indices} of a source of `size` records: a new order each epoch, checkpointable."""
    ds = grain.MapDataset.range(size)
    if shuffle:
        ds = ds.shuffle(seed=seed % 2**32)
    ds = ds.repeat(epochs).batch(batch_size, drop_remainder=True)
    return ds.map(lambda idx: {"record": np.asarray(idx, np.int64)}).to_iter_dataset()


class Prompts:
    """Records -> prompt texts, fixed-shape left-padded token rows [B, P] and the reward functions' columns."""

    def __init__(self, cfg: Config, session: Session, source):
        self.cfg, self.source, self.tokenizer = cfg, source, session.tokenizer
        self.config = session.model.config
        self.pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0

    def encode(self, indices, sampling: SamplingParams):
        """(texts, records, tokens [B, P] int32, lengths [B] int32) of the records at `indices`; P is fixed."""
        records = [self.source[int(i)] for i in indices]
        texts = [prompt_text(r, self.cfg.rl.prompt_format) for r in records]
        width = max_prompt_length(self.config, sampling)
        tokens = np.full((len(records), width), self.pad, np.int32)
        lengths = np.zeros(len(records), np.int32)
        for i, ids in enumerate(encode_prompts(self.tokenizer, texts, chat=self.cfg.rl.chat)):
            if len(ids) > width:
                if sampling.prompt_truncation != "left":
                    raise DataError(f"{records[i]['_where']}: the prompt has {len(ids)} tokens, more than "
                                    f"rl.max_prompt_length={width}; raise it or set sampling.prompt_truncation=left")
                ids = ids[-width:]
            tokens[i, width - len(ids):], lengths[i] = ids, len(ids)
        return texts, records, tokens, lengths

    def columns(self, records: list[dict], group_size: int) -> dict[str, list]:
        """Every record field but the prompt, one entry per completion (each record's repeated G times)."""
        keys = sorted({k for r in records for k in r} - {"prompt", "_where"})
        return {k: [r.get(k) for r in records for _ in range(group_size)] for k in keys}

    def decode(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[list[list[int]], list[str]]:
        """Completion ids (up to each length) and their text without the stopping special tokens."""
        stops = set(self.tokenizer.stop_ids)
        ids = [row[:n].tolist() for row, n in zip(tokens, lengths)]
        texts = [self.tokenizer.decode(i[:-1] if i and i[-1] in stops else i) for i in ids]
        return ids, texts


class Round:
    """The loop step of RL (see the module doc): `round(state, frozen, {"record": indices}) -> (state, metrics)`."""

    def __init__(self, cfg: Config, session: Session, prompts: Prompts, batches, example: dict, train_step):
        self.cfg, self.o, self.session, self.prompts, self.batches = cfg, cfg.rl, session, prompts, batches
        self.train_step = train_step
        self.rewards = build_rewards(cfg)
        self.sampling = rollout_sampling(cfg, session)
        self.rollout = make_rollout(session.model.config, self.sampling, mesh=session.mesh, rules=cfg.mesh.rules)
        self.policy = jax.jit(session.model_params)
        self.width = max_prompt_length(session.model.config, self.sampling)
        temperature = max(self.sampling.temperature, 1e-6)

        def before_update(trainable, frozen, batch):  # log-probs and values before this round's updates
            logp, _, values = completion_outputs(session.model.config, session.model_params(trainable, frozen),
                                                 batch, self.width, temperature, None, trainable.get(VALUE_HEAD))
            return logp, values

        self.before_update = jax.jit(before_update)
        self.step_sharding = session.state_shardings().step
        self.batch_shardings = session.batch_shardings(example, len(example["tokens"]))

    def __call__(self, state, frozen, host_batch: dict):
        clock, o = time.perf_counter(), self.o
        step = int(state.step)
        params = self.policy(state.params, frozen)
        key = jax.random.fold_in(state.rng, step)
        groups, tries = self._sample(params, host_batch["record"], key)
        timing = {"time/rollout": groups.pop("rollout_s"), "time/scoring": groups.pop("scoring_s")}
        batch, metrics = self._train_batch(groups, tries)
        if o.num_iterations > 1 or o.advantage == "gae":
            batch["old_logprobs"], values = self.before_update(state.params, frozen, batch)
            if o.advantage == "gae":
                batch.update(ppo_targets(batch, values, o))
                metrics["values/mean"] = float(jnp.sum(values * batch["completion_mask"]) /
                                               jnp.maximum(batch["completion_mask"].sum(), 1))
        update_clock = time.perf_counter()
        state, update_metrics = self._update(state, frozen, batch, key)
        jax.block_until_ready(state.params)
        timing["time/update"] = time.perf_counter() - update_clock
        state = state.replace(step=jax.device_put(jnp.asarray(step + 1, jnp.int32), self.step_sharding))
        generated = metrics["completion_tokens"]
        metrics.update(**update_metrics, **timing, tokens=generated,
                       rollout_tokens_per_s=generated / max(timing["time/rollout"], 1e-9),
                       step_seconds=time.perf_counter() - clock)
        return state, metrics

    # ------------------------------------------------------------------------------------------- sampling

    def _sample(self, params, indices, key) -> tuple[dict, int]:
        """Rollouts of the prompts at `indices` (and, with dynamic sampling, of further batches until B groups
        have varied rewards, at most rl.max_refills more); the chosen B groups' host arrays."""
        o, group, wanted = self.o, self.o.num_generations, len(indices)
        parts, rollout_s, scoring_s, tries = [], 0.0, 0.0, 0
        while True:
            t0 = time.perf_counter()
            texts, records, tokens, lengths = self.prompts.encode(indices, self.sampling)
            out = self.rollout(params, tokens, lengths, jax.random.fold_in(key, tries))
            out = Rollout(*jax.device_get(out))
            t1 = time.perf_counter()
            ids, completions = self.prompts.decode(out.tokens, out.lengths)
            columns = self.prompts.columns(records, group)
            scores = self.rewards.score([t for t in texts for _ in range(group)], completions,
                                        completion_ids=ids, truncated=out.truncated.tolist(), **columns)
            scoring_s += time.perf_counter() - t1
            rollout_s += t1 - t0
            parts.append({"prompts": tokens, "prompt_lengths": lengths, "rollout": out, "scores": scores,
                          "informative": group_is_informative(scores.total, group)})
            kept = sum(int(p["informative"].sum()) for p in parts)
            if not o.dynamic_sampling or kept >= wanted or tries >= o.max_refills:
                break
            tries += 1
            indices = next(self.batches)["record"]
        return {**_choose_groups(parts, wanted, group, o.dynamic_sampling), "rollout_s": rollout_s,
                "scoring_s": scoring_s}, tries

    # ------------------------------------------------------------------------------------------- batch

    def _train_batch(self, g: dict, tries: int) -> tuple[dict, dict]:
        o, group = self.o, self.o.num_generations
        out, scores = g["rollout"], g["scores"]
        lengths, truncated = out.lengths, out.truncated
        mask = np.arange(out.tokens.shape[1])[None] < lengths[:, None]
        if o.mask_truncated_completions:
            mask &= ~truncated[:, None]
        batch = train_rows(jnp.asarray(g["prompts"]), jnp.asarray(g["prompt_lengths"]), out, group, jnp.asarray(mask))
        if o.advantage == "gae":  # per-token advantages come from the value head (ppo_targets)
            batch["rewards"] = jnp.asarray(scores.total, jnp.float32)
        else:
            batch["advantages"] = group_advantages(jnp.asarray(scores.total), group, o.advantage,
                                                   scale_rewards=o.scale_rewards, ddof=o.std_ddof).astype(jnp.float32)
        metrics = {**rewards_lib.metrics(scores), "completion_tokens": int(lengths.sum()),
                   "completion_length/mean": float(lengths.mean()), "completion_length/max": int(lengths.max()),
                   "completion_length/clipped_fraction": float(truncated.mean()),
                   "dynamic_sampling/informative_groups": float(g["informative"].mean()),
                   "dynamic_sampling/refills": tries}
        if "math" in scores.per_function:
            metrics["accuracy"] = float(np.nan_to_num(scores.per_function["math"]).mean())
        return batch, metrics

    def _update(self, state, frozen, batch: dict, key):
        """rl.num_iterations passes of rl.num_minibatches optimizer steps; the metrics averaged over them."""
        o, rows = self.o, batch["tokens"].shape[0]
        size, collected = rows // o.num_minibatches, []
        for iteration in range(o.num_iterations):
            order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1_000 + iteration), rows)) \
                if o.num_minibatches > 1 else np.arange(rows)
            for m in range(o.num_minibatches):
                part = {k: v[order[m * size:(m + 1) * size]] for k, v in batch.items()}
                state, metrics = self.train_step(state, frozen, jax.device_put(part, self.batch_shardings))
                collected.append(metrics)
        means = jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *collected)
        return state, {k: float(v) for k, v in jax.device_get(means).items() if k != "tokens"}


def _choose_groups(parts: list[dict], wanted: int, group: int, dynamic: bool) -> dict:
    """The first `wanted` groups over the sampled parts: informative ones first with dynamic sampling (then, if
    the refills ran out, uninformative ones: their advantages are 0, they add no gradient)."""
    informative = np.concatenate([p["informative"] for p in parts])
    order = np.argsort(~informative, kind="stable") if dynamic else np.arange(len(informative))
    chosen = np.sort(order[:wanted])
    rows = (chosen[:, None] * group + np.arange(group)[None]).reshape(-1)
    scores = rewards_lib.RewardScores(
        total=np.concatenate([p["scores"].total for p in parts])[rows],
        per_function={k: np.concatenate([p["scores"].per_function[k] for p in parts])[rows]
                      for k in parts[0]["scores"].per_function},
        failures={k: v for p in parts for k, v in p["scores"].failures.items()})
    picked = Rollout(**{f: np.concatenate([getattr(p["rollout"], f) for p in parts])[rows]
                        for f in Rollout._fields if f != "steps"}, steps=max(int(p["rollout"].steps) for p in parts))
    return {"prompts": np.concatenate([p["prompts"] for p in parts])[chosen],
            "prompt_lengths": np.concatenate([p["prompt_lengths"] for p in parts])[chosen],
            "rollout": picked, "scores": scores, "informative": informative[chosen]}


def ppo_targets(batch: dict, values, o) -> dict:
    """PPO's per-token targets: each completion's reward at its last token (0 before), GAE advantages with
    rl.gamma and rl.lam (whitened over the completion tokens), returns = advantages + values, and the old values."""
    mask = batch["completion_mask"]
    last = (jnp.cumsum(mask, axis=1) == mask.sum(axis=1, keepdims=True)) & (mask > 0)
    rewards = jnp.where(last, batch.pop("rewards")[:, None], 0.0)
    advantages, returns = gae(rewards, values, mask, o.gamma, o.lam)
    return {"advantages": whiten(advantages, mask), "returns": returns, "old_values": values}


def rollout_sampling(cfg: Config, session: Session) -> SamplingParams:
    """sampling: with rl's group size, completion and prompt lengths, stopping at the tokenizer's stop ids."""
    sampling = SamplingParams.from_section(cfg.sampling, cfg.seed).replace(
        n=cfg.rl.num_generations, max_new_tokens=cfg.rl.max_completion_length,
        max_prompt_length=cfg.rl.max_prompt_length)
    return text_sampling(session.tokenizer, sampling, cfg.sampling.stop)


def train_example(cfg: Config, width: int) -> dict:
    """Zeros shaped like one optimizer step's batch: B * G / num_minibatches rows of prompt + completion."""
    o = cfg.rl
    rows = cfg.train.batch_size * o.num_generations
    if rows % o.num_minibatches:
        raise ConfigError(f"rl.num_minibatches: {o.num_minibatches} does not divide the {rows} completions per step "
                          f"(train.batch_size x rl.num_generations)")
    rows //= o.num_minibatches
    if rows % cfg.train.microbatches:
        raise ConfigError(f"train.microbatches: {cfg.train.microbatches} does not divide the {rows} completions per "
                          "optimizer step")
    n = o.max_completion_length
    example = {k: np.zeros((rows, width + n), np.int32) for k in ("tokens", "positions", "segment_ids")}
    example["completion_mask"] = np.zeros((rows, n), np.int32)
    if o.advantage == "gae":
        example.update({k: np.zeros((rows, n), np.float32) for k in ("advantages", "returns", "old_values")})
    else:
        example["advantages"] = np.zeros(rows, np.float32)
    if o.num_iterations > 1 or o.advantage == "gae":
        example["old_logprobs"] = np.zeros((rows, n), np.float32)
    return example


def greedy_eval(cfg: Config, session: Session, prompts: Prompts, source) -> callable:
    """eval_fn(state) -> {"eval_reward", "eval_accuracy" (with the math reward), "eval_truncated"}: the reward
    functions' scores of greedy completions of the first rl.eval_limit records of data.eval."""
    sampling = rollout_sampling(cfg, session).replace(n=1, temperature=0.0)
    rollout = make_rollout(session.model.config, sampling, mesh=session.mesh, rules=cfg.mesh.rules)
    policy, rewards = jax.jit(session.model_params), build_rewards(cfg)
    count = len(source) if cfg.rl.eval_limit is None else min(cfg.rl.eval_limit, len(source))

    def eval_fn(state) -> dict:
        params, totals, accuracy, truncated = policy(state.params, session.frozen), [], [], []
        for start in range(0, count, EVAL_BATCH):
            n = min(EVAL_BATCH, count - start)
            indices = np.resize(np.arange(start, start + n), EVAL_BATCH)  # a fixed shape: compiled once
            texts, records, tokens, lengths = prompts.encode(indices, sampling)
            out = jax.device_get(rollout(params, tokens, lengths, jax.random.key(0)))
            ids, completions = prompts.decode(out.tokens[:n], out.lengths[:n])
            scores = rewards.score(texts[:n], completions, completion_ids=ids, truncated=out.truncated[:n].tolist(),
                                   **prompts.columns(records[:n], 1))
            totals.append(scores.total)
            accuracy.append(np.nan_to_num(scores.per_function.get("math", np.zeros(n))))
            truncated.append(out.truncated[:n])
        metrics = {"eval_reward": float(np.concatenate(totals).mean()),
                   "eval_truncated": float(np.concatenate(truncated).mean())}
        if "math" in cfg.rl.rewards:
            metrics["eval_accuracy"] = float(np.concatenate(accuracy).mean())
        return metrics

    return eval_fn


def run_rl(cfg: Config) -> LoopResult:
    """Trains cfg.model with RL on the prompts of cfg.data.train (records with `prompt` and the reward functions'
    columns, e.g. `answer`), as cfg.rl says; checkpoints, metrics and the final model go to train.output_dir."""
    if jax.process_count() > 1:
        raise ConfigError("polm rl runs on one process (all its local devices) for now; multi-host RL is not supported")
    o = cfg.rl
    session = Session.create(cfg, reference=o.beta > 0 and not cfg.lora.rank, value_head=o.advantage == "gae")
    source = open_sources(cfg.data.train, cfg.data, key="data.train")
    if len(source) < cfg.train.batch_size:
        raise DataError(f"data.train has {len(source)} records, fewer than train.batch_size={cfg.train.batch_size} "
                        "prompts per step")
    batches = iter(prompt_batches(len(source), cfg.train.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle,
                                  epochs=cfg.data.epochs))
    prompts = Prompts(cfg, session, source)
    width = max_prompt_length(session.model.config, rollout_sampling(cfg, session))
    temperature = max(cfg.sampling.temperature, 1e-6)
    loss_fn = rl_loss(session.model.config, session.model_params, o, prompt_width=width, temperature=temperature)
    eval_fn = None
    if cfg.data.eval:
        eval_source = open_sources(cfg.data.eval, cfg.data, key="data.eval")
        eval_fn = greedy_eval(cfg, session, Prompts(cfg, session, eval_source), eval_source)
    example = train_example(cfg, width)
    return session.train(loss_fn, batches, example_batch=example, eval_fn=eval_fn,
                         round_fn=partial(Round, cfg, session, prompts, batches, example))
