"""GRPO step time split (rollout / scoring / update) and rollout tokens/s, from `run_rl` itself on random-init presets.

    python benchmarks/grpo_step.py [--presets tiny-llama qwen2.5-0.5b] [--layers 2] [--steps 4] [--prompts 4]
                                   [--generations 8] [--completion 32] [--dtype float32]
    python benchmarks/grpo_step.py --presets gemma3-1b --layers 0 --dtype bfloat16 --prompts 16 --completion 256  # GPU

Each preset runs `run_rl` (full fine-tuning, AdamW, the grpo loss, the math reward) on the synthetic arithmetic task
with the byte tokenizer, for --steps rounds of --prompts prompts x --generations completions of up to --completion
tokens; the figures are medians over the rounds after the first (which compiles), read from the run's metrics.jsonl.
A random model rarely samples EOS, so nearly every completion runs to the limit. Every preset but the tiny ones runs
with --layers of its layers (model.overrides num_layers; 0 keeps them all): its vocabulary and width stay, so the lm
head, the rollout's per-token cost and the update's log-prob pass are the real model's, over fewer blocks. --dtype is
the compute dtype; params stay float32.
"""

import argparse
import json
import os
import statistics
import tempfile

from common import emit

from polm_jax.config import Config, load_config
from polm_jax.recipes.rl import run_rl

FIGURES = {  # metric in metrics.jsonl -> (figure, unit)
    "time/rollout": ("grpo_rollout_s", "s"),
    "time/scoring": ("grpo_scoring_s", "s"),
    "time/update": ("grpo_update_s", "s"),
    "rollout_tokens_per_s": ("grpo_rollout_tokens_per_s", "tokens/s"),
}


def run_config(preset: str, layers: int | None, args, output_dir: str) -> Config:
    """The run_rl config of one benchmark run: `preset` (with `layers` blocks if given), random init, byte tokenizer."""
    overrides = [
        f"model.preset={preset}", f"model.dtype={args.dtype}", "data.tokenizer=bytes",
        "data.train=[synthetic:arithmetic:2000:7]",
        f"rl.num_generations={args.generations}", "rl.max_prompt_length=32",
        f"rl.max_completion_length={args.completion}", "rl.rewards=[math]", "optim.schedule=constant",
        f"train.steps={args.steps}", f"train.batch_size={args.prompts}", f"train.output_dir={output_dir}",
        "train.log_every=1", "train.progress=false", "train.tensorboard=false", "train.export=none",
        "train.resume=false",
    ]
    if layers is not None:
        overrides.append(f"model.overrides={{num_layers: {layers}}}")
    return load_config(Config, None, overrides)


def measure(preset: str, layers: int | None, args) -> None:
    load = os.getloadavg()[0]  # at the start: the host may be shared
    with tempfile.TemporaryDirectory(prefix="grpo_step_") as out:
        run_rl(run_config(preset, layers, args, out))
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rounds = [json.loads(line) for line in f][1:]  # the first round compiles
    if not rounds:
        raise SystemExit(f"--steps {args.steps}: needs at least 2 rounds (the first compiles and is not counted)")
    details = {"preset": preset, "num_layers": layers, "prompts": args.prompts, "generations": args.generations,
               "max_completion": args.completion, "rounds_timed": len(rounds),
               "completion_tokens": statistics.median(r["completion_tokens"] for r in rounds),
               "dtype": args.dtype, "load_avg_1m": round(load, 2)}
    for metric, (figure, unit) in FIGURES.items():
        emit(figure, statistics.median(r[metric] for r in rounds), unit, **details)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["tiny-llama", "qwen2.5-0.5b"])
    parser.add_argument("--layers", type=int, default=2, help="blocks kept of each non-tiny preset (0: all)")
    parser.add_argument("--steps", type=int, default=4, help="rounds per preset; the first is not timed")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per round (train.batch_size)")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion", type=int, default=32, help="rl.max_completion_length")
    parser.add_argument("--dtype", default="float32", help="compute dtype (model.dtype)")
    args = parser.parse_args()
    for preset in args.presets:
        measure(preset, None if preset.startswith("tiny-") or args.layers == 0 else args.layers, args)


if __name__ == "__main__":
    main()
