"""What every training run sets up the same way, whatever the loss: mesh, model, LoRA split, optimizer, sharded
state, checkpoints with resume, metrics, the loop, and the final export.

    session = Session.create(cfg)                       # mesh, model, trainable/frozen params, optimizer
    loss_fn = sft_loss(session.model.config, session.model_params)
    result = session.train(loss_fn, dataset, eval_fn=...)  # resumes, runs the loop, exports output_dir/final
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from polm_jax import api, parallel
from polm_jax.config import Config, dump_yaml
from polm_jax.data.tokenizer import Tokenizer, byte_tokenizer, load_tokenizer
from polm_jax.errors import CheckpointError, ConfigError
from polm_jax.models import lora
from polm_jax.models.config import ModelConfig
from polm_jax.models.transformer import param_shapes
from polm_jax.train import step as step_lib
from polm_jax.train.checkpoint import Checkpointer
from polm_jax.train.loop import LoopOptions, LoopResult, fit
from polm_jax.train.metrics import MetricsWriter, flops_per_token, peak_flops
from polm_jax.train.optim import make_optimizer
from polm_jax.train.state import abstract_state, init_state, state_shardings


def configured_tokenizer(cfg: Config, model: api.Model) -> Tokenizer:
    """data.tokenizer ("bytes", a folder) or the model's own; it must fit the model's vocabulary."""
    name = cfg.data.tokenizer
    tokenizer = byte_tokenizer() if name == "bytes" else load_tokenizer(name) if name else model.tokenizer
    if tokenizer is None:
        raise ConfigError("data.tokenizer: the model has no tokenizer; set data.tokenizer to a tokenizer folder or "
                          "'bytes' (the built-in byte-level one)")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"data.tokenizer: its vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                          f"({model.config.vocab_size})")
    return tokenizer


def configured_model(cfg: Config, mesh) -> api.Model:
    """The configured model on `mesh` with the configured tokenizer (data.tokenizer, else the model's own), its
    config speaking that tokenizer's special tokens."""
    model = api.from_section(cfg.model, seed=cfg.seed, mesh=mesh, rules=cfg.mesh.rules)
    tokenizer = configured_tokenizer(cfg, model)
    if tokenizer is not model.tokenizer:
        model.config = model.config.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                            pad_token_id=tokenizer.pad_id)
        model.tokenizer = tokenizer
    return model


@dataclass
class ParamLayout:
    """Which params train and which stay fixed, as shapes (jax.ShapeDtypeStruct) and shardings."""

    trainable_shapes: dict
    trainable_shardings: dict
    frozen_shapes: dict  # LoRA: the base model; full fine-tuning: {} (or the reference's copy)
    frozen_shardings: dict
    lora_scale: float | None  # alpha / rank when LoRA is on


VALUE_HEAD = "value_head"  # PPO's critic: a vector [D] on the policy's final hidden states, trained with it


def param_layout(cfg: Config, config: ModelConfig, mesh, *, reference: bool = False,
                 value_head: bool = False) -> ParamLayout:
    """The trainable/frozen split of `config`'s params on `mesh` under cfg.lora and cfg.mesh.rules; `reference`
    keeps a frozen copy of the full params in full fine-tuning; `value_head` adds a trainable VALUE_HEAD [D]."""
    layout = _model_layout(cfg, config, mesh, reference)
    if value_head:
        head = jax.ShapeDtypeStruct((config.hidden_size,), jnp.float32)
        layout.trainable_shapes = {**layout.trainable_shapes, VALUE_HEAD: head}
        layout.trainable_shardings = {**layout.trainable_shardings,
                                      VALUE_HEAD: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}
    return layout


def _model_layout(cfg: Config, config: ModelConfig, mesh, reference: bool) -> ParamLayout:
    rules = cfg.mesh.rules
    shapes, shardings = param_shapes(config), api.param_shardings(config, mesh, rules)
    if not cfg.lora.rank:
        return ParamLayout(shapes, shardings, *((shapes, shardings) if reference else ({}, {})), None)
    r, targets = cfg.lora.rank, tuple(cfg.lora.targets)
    adapter_shapes = lora.adapter_shapes(config, r, targets)
    adapter_shardings = parallel.shardings(lora.adapter_logical_axes(config, r, targets), adapter_shapes, mesh, rules)
    for key in lora.trained_in_full(config):
        adapter_shapes[key], adapter_shardings[key] = shapes[key], shardings[key]
    return ParamLayout(adapter_shapes, adapter_shardings, shapes, shardings, cfg.lora.alpha / r)


def combine_params(lora_scale: float | None, trainable: dict, frozen: dict) -> dict:
    """The params the model reads: adapters applied to the frozen base with LoRA, else the trainable params (a
    value head, not part of the model, left out)."""
    trainable = model_part(trainable)
    return trainable if lora_scale is None else lora.apply(frozen, trainable, lora_scale)


def model_part(trainable: dict) -> dict:
    """The trainable params without the value head."""
    return {k: v for k, v in trainable.items() if k != VALUE_HEAD}


def model_config(cfg: Config) -> ModelConfig:
    """The configured architecture with the run's LoRA dropout (no weights)."""
    config = api.config_from_section(cfg.model)
    return config.replace(lora_dropout=cfg.lora.dropout) if cfg.lora.rank else config


@dataclass
class Session:
    """A configured run: the model on its mesh, split into trainable and frozen params, and the optimizer."""

    cfg: Config
    mesh: jax.sharding.Mesh
    model: api.Model  # params: the full model (with LoRA: the frozen base)
    tokenizer: Tokenizer
    layout: ParamLayout
    trainable: dict  # initial trainable params (LoRA: adapters)
    frozen: dict  # held fixed (LoRA: the base model; full fine-tuning: {}, or the reference's copy)
    optimizer: optax.GradientTransformation

    @classmethod
    def create(cls, cfg: Config, *, reference: bool = False, value_head: bool = False) -> Session:
        """Sets up the run; `reference`: keep the initial weights as frozen params (a copy in full fine-tuning; with
        LoRA the frozen base already is the model with adapters off); `value_head`: train a VALUE_HEAD [D] (zeros
        at the start) with the model (PPO)."""
        mesh = parallel.mesh_from_config(cfg.mesh)
        model = configured_model(cfg, mesh)
        if cfg.lora.rank:
            model.config = model.config.replace(lora_dropout=cfg.lora.dropout)
        layout = param_layout(cfg, model.config, mesh, reference=reference, value_head=value_head)
        if cfg.lora.rank:
            full = lora.trained_in_full(model.config)
            adapter_shardings = {k: v for k, v in layout.trainable_shardings.items() if k not in full}
            init = jax.jit(lora.init_adapters, static_argnums=(0, 1, 2), out_shardings=adapter_shardings)
            trainable = init(model.config, cfg.lora.rank, tuple(cfg.lora.targets), jax.random.PRNGKey(cfg.seed + 1))
            trainable.update({k: model.params[k] for k in full})
            frozen = model.params
        else:
            trainable, frozen = model.params, {}
            if reference:  # a copy: the trainable params are donated to the step
                copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=layout.frozen_shardings)
                frozen = copy(model.params)
        if value_head:
            zeros = jax.jit(lambda: jnp.zeros((model.config.hidden_size,), jnp.float32),
                            out_shardings=layout.trainable_shardings[VALUE_HEAD])
            trainable = {**trainable, VALUE_HEAD: zeros()}
        optimizer = make_optimizer(cfg.optim, cfg.train.steps)
        return cls(cfg, mesh, model, model.tokenizer, layout, trainable, frozen, optimizer)

    @property
    def trainable_shardings(self) -> dict:
        return self.layout.trainable_shardings

    @property
    def frozen_shardings(self) -> dict:
        return self.layout.frozen_shardings

    def model_params(self, trainable: dict, frozen: dict) -> dict:
        """The params the model reads: adapters applied to the base with LoRA, else the trainable params."""
        return combine_params(self.layout.lora_scale, trainable, frozen)

    def final_params(self, trainable: dict) -> dict:
        """Full model params for export: adapters merged into the base with LoRA (a value head left out)."""
        if self.layout.lora_scale is None:
            return model_part(trainable)
        return lora.merge(self.frozen, model_part(trainable), self.layout.lora_scale)

    # -------------------------------------------------------------------------------------------- batches

    @property
    def local_batch_size(self) -> int:
        n, size = jax.process_count(), self.cfg.train.batch_size
        if size % n:
            raise ConfigError(f"train.batch_size: {size} rows cannot be split evenly over {n} processes")
        return size // n

    def batch_shardings(self, batch: dict, rows: int | None = None) -> dict:
        """Shardings of a global batch of `rows` (default train.batch_size): leading axis over the batch axes."""
        rows = rows or self.cfg.train.batch_size
        return {k: parallel.batch_sharding((rows, *np.shape(v)[1:]), self.mesh, self.cfg.mesh.rules)
                for k, v in batch.items()}

    def put_batch(self, batch: dict) -> dict:
        """This process's rows -> global arrays on the mesh."""
        shardings = self.batch_shardings(batch)
        rows = self.cfg.train.batch_size
        return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v), (rows, *np.shape(v)[1:]))
                for k, v in batch.items()}

    # -------------------------------------------------------------------------------------------- training

    def state_shardings(self):
        return state_shardings(self.optimizer, self.layout.trainable_shapes, self.trainable_shardings, self.mesh)

    def train(self, loss_fn: step_lib.LossFn, dataset, *, example_batch: dict,
              eval_fn: Callable | None = None, data_stats: Callable[[], dict] | None = None,
              round_fn: Callable[[Callable], Callable] | None = None) -> LoopResult:
        """Runs (or resumes) training on batches from the grain `dataset`, then exports output_dir/final.

        `example_batch` fixes the train step's batch keys and shapes (one host batch); `eval_fn(state) -> metrics`.
        `round_fn(train_step) -> step(state, frozen, host_batch) -> (state, metrics)`: a host-side loop step
        built on the jitted train step (RL: rollouts, rewards, then updates); it gets the dataset's batches as
        they are, not placed on the mesh.
        """
        cfg, out = self.cfg, self.cfg.train.output_dir
        shardings = self.state_shardings()
        rows = int(np.shape(example_batch["tokens"])[0]) * jax.process_count()
        batch_shardings = self.batch_shardings(example_batch, rows)
        micro_shardings = self.batch_shardings(example_batch, rows // cfg.train.microbatches)
        train_step = step_lib.make_train_step(loss_fn, self.optimizer, state_shardings=shardings,
                                              frozen_shardings=self.frozen_shardings or None,
                                              batch_shardings=batch_shardings, microbatch_shardings=micro_shardings,
                                              microbatches=cfg.train.microbatches)
        step, put_batch = (train_step, self.put_batch) if round_fn is None else (round_fn(train_step), dict)
        iterator = iter(dataset)
        checkpointer = Checkpointer(os.path.join(out, "checkpoints"), keep=cfg.train.keep,
                                    async_save=cfg.train.async_save)
        state = self._start_state(checkpointer, shardings, iterator)
        if jax.process_index() == 0:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "config.yaml"), "w") as f:
                f.write(dump_yaml(cfg))
        writer = MetricsWriter(out, tensorboard=cfg.train.tensorboard)
        seq_len = int(np.shape(example_batch["tokens"])[1])
        options = LoopOptions(total_steps=cfg.train.steps, log_every=cfg.train.log_every,
                              eval_every=cfg.train.eval_every, save_every=cfg.train.save_every,
                              on_nan=cfg.train.on_nan, stop_at=cfg.train.stop_at, progress=cfg.train.progress,
                              flops_per_token=flops_per_token(self.model.config, seq_len, weight_grads=not cfg.lora.rank),
                              peak_flops=cfg.train.peak_flops or peak_flops())
        try:
            with parallel.activation_sharding(self.mesh, cfg.mesh.rules):  # activations constrained to the mesh
                result = fit(state, self.frozen, step, iterator, put_batch=put_batch, options=options,
                             writer=writer, checkpointer=checkpointer, data_iterator=iterator, eval_fn=eval_fn,
                             data_stats=data_stats)
        finally:
            writer.close()
            checkpointer.close()
        if result.status in ("done", "data_exhausted") and cfg.train.export != "none":
            self.export(result.state.params, os.path.join(out, "final"))
        return result

    def _start_state(self, checkpointer: Checkpointer, shardings, iterator):
        """A fresh state, or the latest complete checkpoint's (with the data iterator moved to its position)."""
        latest = checkpointer.latest_step() if self.cfg.train.resume else None
        if latest is None:
            return init_state(self.trainable, self.optimizer, self.cfg.seed, shardings)
        abstract = abstract_state(self.optimizer, self.layout.trainable_shapes, shardings)
        try:
            return checkpointer.restore(latest, abstract, iterator)
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            where = os.path.join(self.cfg.train.output_dir, "checkpoints", str(latest))
            raise CheckpointError(f"{where}: cannot resume from this checkpoint; it does not match this run's "
                                  f"model/LoRA/optimizer ({type(e).__name__}: {str(e)[:300]}). Use a new "
                                  f"train.output_dir, or train.resume=false to start over") from None

    def export(self, trainable: dict, folder: str) -> None:
        """Writes the trained model (LoRA merged) as a polm checkpoint or HF folder, per train.export."""
        model = api.Model(self.model.config.replace(lora_dropout=0.0), self.final_params(trainable), self.tokenizer)
        (api.save_hf if self.cfg.train.export == "hf" else api.save)(model, folder)

    def evaluator(self, loss_fn: step_lib.LossFn, dataset, example_batch: dict,
                  num_batches: int | None = None) -> Callable:
        """`eval_fn(state) -> {"eval_loss", "eval_<metric>", ...}`: the loss's (and its metrics') weighted means
        over a fresh pass of `dataset`
        (its first `num_batches` batches, or all). Every process's `dataset` must yield the same number of
        batches (the SFT pipeline's eval mode pads its shards to make it so)."""
        eval_step = step_lib.make_eval_step(loss_fn, params_shardings=self.trainable_shardings,
                                            frozen_shardings=self.frozen_shardings or None,
                                            batch_shardings=self.batch_shardings(example_batch))

        def eval_fn(state) -> dict:
            sums = None
            for batch in itertools.islice(dataset, num_batches):
                out = jax.device_get(eval_step(state.params, self.frozen, self.put_batch(batch)))
                sums = out if sums is None else jax.tree.map(np.add, sums, out)
            if sums is None:
                return {}
            count = float(sums["count"])
            metrics = {f"eval_{name}": float(s) / max(float(w), 1.0) for name, (s, w) in sums["metrics"].items()}
            return {"eval_loss": float(sums["sum"]) / max(count, 1.0), "eval_count": count, **metrics}

        return eval_fn
