"""The `polm` command: `demo`, `sft`, `dpo`, `rm`, `rl`, `generate`, `eval`, `plan`, `info` and `convert`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from polm_jax import api, parallel
from polm_jax.config import Config, load_config
from polm_jax.errors import PolmError
from polm_jax.models import polm_checkpoint
from polm_jax.models.transformer import forward


def _add_config_args(p: argparse.ArgumentParser):
    p.add_argument("--config", help="a YAML config (see configs/)")
    p.add_argument("--model", help="shorthand for model.path=...: a Hugging Face folder or a polm checkpoint")
    p.add_argument("--preset", help="shorthand for model.preset=... (e.g. tiny-llama, qwen3-0.6b)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. mesh.fsdp=4")


def _config(args) -> Config:
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.preset:
        overrides += [f"model.preset={args.preset}", "model.path=null"]
    return load_config(Config, args.config, overrides)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def cmd_info(args) -> None:
    """Builds the configured model on the mesh, prints its architecture and sharding, and times a forward pass."""
    cfg = _config(args)
    mesh = parallel.mesh_from_config(cfg.mesh)
    t0 = time.perf_counter()
    model = api.from_section(cfg.model, seed=cfg.seed, mesh=mesh, rules=cfg.mesh.rules)
    jax.block_until_ready(model.params)
    mc = model.config
    leaves = jax.tree.leaves(model.params)
    total = sum(x.size for x in leaves)
    per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    print(f"model      {cfg.model.path or cfg.model.preset} ({mc.family}), built in {time.perf_counter() - t0:.1f}s")
    print(f"layers     {mc.num_layers} x (hidden {mc.hidden_size}, heads {mc.num_heads}/{mc.num_kv_heads} x "
          f"{mc.head_dim}, mlp {mc.intermediate_size}), vocab {mc.vocab_size}, max positions "
          f"{mc.max_position_embeddings}")
    print(f"params     {total / 1e6:.2f}M in {mc.param_dtype}, compute {mc.dtype}, remat {mc.remat}; "
          f"{_bytes(sum(x.nbytes for x in leaves))} total, {_bytes(per_device)} on device 0")
    print(f"mesh       {dict(mesh.shape)} on {len(mesh.devices.flat)} {jax.devices()[0].platform} device(s)")
    print(f"tokenizer  {type(model.tokenizer).__name__ if model.tokenizer else 'none'}")
    if args.batch and args.seq_len:
        _time_forward(model, mesh, cfg, args.batch, min(args.seq_len, mc.max_position_embeddings))


def _time_forward(model: api.Model, mesh, cfg: Config, batch: int, length: int, repeats: int = 3) -> None:
    tokens = np.random.default_rng(cfg.seed).integers(0, model.config.vocab_size, (batch, length), np.int32)
    tokens = jax.device_put(tokens, parallel.batch_sharding(tokens.shape, mesh, cfg.mesh.rules))
    with parallel.activation_sharding(mesh, cfg.mesh.rules):
        t0 = time.perf_counter()
        logits = jax.block_until_ready(forward(model.config, model.params, tokens))
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            logits = jax.block_until_ready(forward(model.config, model.params, tokens))
    step = (time.perf_counter() - t0) / repeats
    print(f"forward    [{batch}, {length}] -> {tuple(logits.shape)}: first call {compile_s:.2f}s, then "
          f"{step * 1e3:.1f} ms ({batch * length / step:,.0f} tokens/s)")


def cmd_convert(args) -> None:
    """HF folder -> polm (orbax) checkpoint, or polm checkpoint -> HF folder; the direction follows the source."""
    changes = {"param_dtype": args.dtype} if args.dtype else {}
    t0 = time.perf_counter()
    model = api.load(args.src, **changes)
    if polm_checkpoint.is_polm_checkpoint(args.src):
        api.save_hf(model, args.dst)
        kind = "Hugging Face folder"
    else:
        api.save(model, args.dst)
        kind = "polm checkpoint"
    n = sum(x.size for x in jax.tree.leaves(model.params))
    print(json.dumps({"converted": args.src, "to": args.dst, "format": kind, "params": int(n),
                      "param_dtype": model.config.param_dtype, "seconds": round(time.perf_counter() - t0, 2)}))


def _train_and_report(run, cfg: Config, keys: tuple[str, ...]) -> None:
    """Runs a training recipe and prints its outcome and the last values of `keys` as one JSON line."""
    result = run(cfg)
    last = {k: result.last[k] for k in keys if k in result.last}
    print(json.dumps({"status": result.status, "step": result.step, **last, "output_dir": cfg.train.output_dir}))


def cmd_sft(args) -> None:
    """Supervised fine-tuning (full or LoRA) as configured; resumes from output_dir's latest checkpoint."""
    from polm_jax.recipes.sft import run_sft

    _train_and_report(run_sft, _config(args), ("loss", "eval_loss", "tokens_per_s"))


def _add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--max-new-tokens", type=int, help="shorthand for sampling.max_new_tokens=...")
    p.add_argument("--temperature", type=float, help="shorthand for sampling.temperature=... (0: greedy)")
    p.add_argument("--top-p", type=float, help="shorthand for sampling.top_p=...")
    p.add_argument("--top-k", type=int, help="shorthand for sampling.top_k=...")
    p.add_argument("--seed", type=int, help="shorthand for sampling.seed=...")


def _with_flags(args, flags: dict) -> argparse.Namespace:
    """`args` with `flags` (dotted key -> value, None: not given) appended to its overrides."""
    given = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    return argparse.Namespace(**{**vars(args), "overrides": [*args.overrides, *given]})


def _sampling_flags(args) -> dict:
    return {f"sampling.{name}": getattr(args, name) for name in ("max_new_tokens", "temperature", "top_p", "top_k",
                                                                 "seed")}


def cmd_generate(args) -> None:
    """Streams the model's completion of one prompt to the terminal, sampled as sampling: and the flags say."""
    from polm_jax.sampling.params import SamplingParams
    from polm_jax.sampling.text import stream_text
    from polm_jax.train.session import configured_model

    cfg = _config(_with_flags(args, _sampling_flags(args)))
    mesh = parallel.mesh_from_config(cfg.mesh)
    model = configured_model(cfg, mesh)
    sampling = SamplingParams.from_section(cfg.sampling, cfg.seed)
    for piece in stream_text(model, args.prompt, sampling, chat=args.chat, stop=cfg.sampling.stop, mesh=mesh,
                             rules=cfg.mesh.rules):
        print(piece, end="", flush=True)
    print(flush=True)


def cmd_eval(args) -> None:
    """Scores the model on data.eval (exact_match, pass@k, maj@k); every sample to eval.output, metrics as JSON."""
    from polm_jax.eval.run import run_eval

    flags = {"data.eval": args.data, "eval.metric": args.metric, "eval.output": args.output, **_sampling_flags(args)}
    print(json.dumps(run_eval(_config(_with_flags(args, flags)))))


def cmd_dpo(args) -> None:
    """Preference optimisation (the DPO family, KTO) as configured; resumes from output_dir's latest checkpoint."""
    from polm_jax.recipes.dpo import run_dpo

    cfg = _config(args)
    if args.precompute_ref:
        cfg.preference.precompute_ref = True
    _train_and_report(run_dpo, cfg, ("loss", "rewards/accuracies", "rewards/margins", "eval_loss",
                                     "eval_rewards/accuracies"))


def cmd_rm(args) -> None:
    """A reward model (scalar head, Bradley-Terry loss) trained on preference pairs; resumes automatically."""
    from polm_jax.recipes.rm import run_rm

    _train_and_report(run_rm, _config(args), ("loss", "accuracy", "rewards/margins", "eval_loss", "eval_accuracy"))


def cmd_rl(args) -> None:
    """Policy-gradient RL (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++, GSPO) with reward functions; resumes."""
    from polm_jax.recipes.rl import run_rl

    _train_and_report(run_rl, _config(args), ("reward/mean", "accuracy", "loss", "kl", "eval_reward", "eval_accuracy"))


def cmd_demo(args) -> None:
    """The embedded default: SFT -> DPO -> GRPO of a tiny model on arithmetic made on the spot; prints a table."""
    from polm_jax.recipes.demo import QUICK, run_demo

    run_demo(args.output_dir, seed=args.seed, scale=QUICK if args.quick else 1.0)


def _simulate_devices(count: int) -> None:
    """Plans on `count` fake CPU devices (set before JAX starts its backend)."""
    flag = f"--xla_force_host_platform_device_count={count}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, flag])
    jax.config.update("jax_platforms", "cpu")


def cmd_plan(args) -> None:
    """Params, bytes per device, FLOPs per token and the compiled memory of one train step; nothing allocated."""
    from polm_jax.train.plan import devices_needed, plan

    cfg = _config(args)
    if not args.on_device:
        _simulate_devices(args.devices or devices_needed(cfg) or 8)
    figures = plan(cfg)
    if args.json:
        print(json.dumps(figures))
        return
    gib = {k: _bytes(v) for k, v in figures.items() if k.endswith(("_bytes", "_per_device"))}
    print(f"model            {figures['model']}: {figures['params'] / 1e6:,.1f}M params, "
          f"{figures['trainable_params'] / 1e6:,.2f}M trainable")
    print(f"mesh             {figures['mesh']} ({figures['devices']} {figures['platform']} devices)")
    print(f"per device       params {gib['param_bytes_per_device']}, optimizer {gib['optimizer_bytes_per_device']}")
    print(f"step             {figures['tokens_per_step']:,} tokens, {figures['flops_per_token'] / 1e9:.2f} GFLOP/token "
          f"(fwd+bwd), compiled in {figures['compile_seconds']}s")
    if "step_peak_bytes" in figures:
        print(f"compiled memory  peak {gib['step_peak_bytes']} per device (arguments {gib['step_argument_bytes']}, "
              f"temporaries {gib['step_temp_bytes']}, outputs {gib['step_output_bytes']})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polm", description="polm-jax: post-training for LLMs in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="build a model on the mesh, show its size and sharding, time a forward")
    _add_config_args(info)
    info.add_argument("--batch", type=int, default=8, help="batch of the timed forward (0 to skip)")
    info.add_argument("--seq-len", type=int, default=128, help="sequence length of the timed forward")
    info.set_defaults(func=cmd_info)
    sft = sub.add_parser("sft", help="supervised fine-tuning (full or LoRA); resumes automatically")
    _add_config_args(sft)
    sft.set_defaults(func=cmd_sft)
    dpo = sub.add_parser("dpo", help="preference optimisation: DPO, IPO, hinge, robust, SimPO, ORPO, KTO")
    _add_config_args(dpo)
    dpo.add_argument("--precompute-ref", action="store_true",
                     help="compute reference log-probs once, store them beside the data and reuse them")
    dpo.set_defaults(func=cmd_dpo)
    rm = sub.add_parser("rm", help="reward model: a scalar head trained on preference pairs (Bradley-Terry)")
    _add_config_args(rm)
    rm.set_defaults(func=cmd_rm)
    rl = sub.add_parser("rl", help="reasoning RL: GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++, GSPO with reward functions")
    _add_config_args(rl)
    rl.set_defaults(func=cmd_rl)
    demo = sub.add_parser("demo", help="the embedded default: SFT -> DPO -> GRPO of a tiny model on synthetic arithmetic")
    demo.add_argument("--output-dir", default="runs/demo", help="where the stages, summary.json and curves.png go")
    demo.add_argument("--seed", type=int, default=0, help="the run's seed (data, init, sampling)")
    demo.add_argument("--quick", action="store_true", help="a few steps per stage (tests, CI): the same code path")
    demo.set_defaults(func=cmd_demo)
    plan = sub.add_parser("plan", help="params, memory per device and FLOPs of a configured train step (no allocation)")
    _add_config_args(plan)
    plan.add_argument("--devices", type=int, help="fake CPU devices to plan on (default: the mesh's size, else 8)")
    plan.add_argument("--on-device", action="store_true", help="plan on this machine's real devices instead")
    plan.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    plan.set_defaults(func=cmd_plan)
    generate = sub.add_parser("generate", help="stream a model's completion of a prompt (KV-cache sampler)")
    _add_config_args(generate)
    generate.add_argument("--prompt", required=True, help="the prompt text")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user turn of the chat template")
    _add_sampling_args(generate)
    generate.set_defaults(func=cmd_generate)
    evaluate = sub.add_parser("eval", help="exact match / pass@k / maj@k of sampled final answers on a dataset")
    _add_config_args(evaluate)
    evaluate.add_argument("--data", action="append", help="shorthand for data.eval=[...] (repeat for several)")
    evaluate.add_argument("--metric", help="shorthand for eval.metric=...: exact_match, pass@K or maj@K")
    evaluate.add_argument("--output", help="shorthand for eval.output=...: the JSONL file of every sample")
    _add_sampling_args(evaluate)
    evaluate.set_defaults(func=cmd_eval)
    convert = sub.add_parser("convert", help="HF folder <-> polm (orbax) checkpoint")
    convert.add_argument("src", help="a Hugging Face folder, or a polm checkpoint (then the output is HF)")
    convert.add_argument("dst", help="the output folder")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="param dtype to store")
    convert.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PolmError as e:
        print(f"polm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
