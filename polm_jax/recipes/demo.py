"""`polm demo`: the whole post-training story on this machine, with no download (the embedded default).

The tiny Llama-style preset with the built-in byte tokenizer learns two-digit addition and subtraction worked
column by column, generated on the spot and checked by the `math` reward:

    What is 47 + 38?  ->  7+8=15, 4+3+1=8, 85          What is 72 - 38?  ->  12-8=4, 7-3-1=3, 34

SFT on worked examples until the model answers about a third of a validation set right (so the later stages have
room), then DPO on pairs of right and wrong answers sampled from the SFT model, then GRPO. After each stage,
greedy exact-match accuracy on held-out problems (none of them trained on) goes to a table, summary.json and
curves.png in the output folder, with GRPO's reward and accuracy per step.

    summary = run_demo("runs/demo")                       # a few minutes on 2 CPU cores
    summary = run_demo("runs/demo_quick", scale=QUICK)    # the same path with few steps (tests, CI)
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass

from matplotlib.figure import Figure  # draws with Agg: no display, no pyplot state

from polm_jax import parallel
from polm_jax.config import Config, load_config
from polm_jax.errors import ConfigError, TrainingError
from polm_jax.eval.answers import answers_match, extract_answer
from polm_jax.eval.run import run_eval
from polm_jax.recipes.dpo import run_dpo
from polm_jax.recipes.rl import run_rl
from polm_jax.recipes.sft import run_sft
from polm_jax.sampling.params import SamplingParams
from polm_jax.sampling.text import generate_text
from polm_jax.train.session import configured_model

QUICK = 0.01  # `polm demo --quick`: step counts and set sizes below times this, each at least its minimum
RECORDS = {"train": 20_000, "validation": 128, "heldout": 256}  # problems per split; no prompt in two splits
SPLIT_SEEDS = {"heldout": 1_000_003, "validation": 2_000_003, "train": 0}  # added to the run's seed
MAX_PROMPT_TOKENS = 17  # "What is 99 - 10?" (16 bytes) + BOS
MAX_COMPLETION_TOKENS = 22  # "9+9=18, 9+9+1=19, 199" (21 bytes) + EOS
BASE = ["model.preset=tiny-llama", "model.path=null", "data.tokenizer=bytes", "train.save_every=0",
        "train.keep=1", "train.tensorboard=false"]
# SFT runs `first` steps, then `every` more (resuming) until validation accuracy reaches `target` or `last` steps.
# The model learns to copy the digits into the columns suddenly, at a step that varies with the seed (600 for
# seeds 0-2; 500 is too early), and is soon right on most problems. A constant rate: the same wherever it stops.
SFT = {"first": 400, "every": 100, "last": 1500, "target": 0.3, "overrides": [
    "data.max_length=128", "train.batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=50",
    "optim.schedule=constant"]}
PAIRS = {"prompts": 512, "samples": 8, "temperature": 1.0, "batch": 64}  # DPO pairs drawn from the SFT model
# DPO plus the chosen answers' NLL (as Iterative RPO): plain DPO pushes down every token of a wrong worked answer
# after its first mistake, the right copying of the wrong step included, and so unlearns copying.
DPO = {"steps": 60, "overrides": [
    "data.max_length=128", "train.batch_size=8", "preference.loss_type=[sigmoid, sft]",
    "preference.loss_weights=[0.2, 1.0]", "preference.beta=0.1", "optim.lr=1e-4", "optim.warmup_steps=5",
    "optim.schedule=cosine"]}
# GRPO near greedy (temperature 0.3), on informative groups (dynamic sampling), two passes over each rollout.
GRPO = {"steps": 100, "evals": 5, "overrides": [
    "rl.rewards=[math]", "rl.num_generations=8", "train.batch_size=32", "sampling.temperature=0.3",
    "rl.dynamic_sampling=true", "rl.max_refills=1", "rl.num_iterations=2", "optim.lr=2e-4",
    "optim.warmup_steps=20", "optim.schedule=constant", "optim.weight_decay=0.0",
    f"rl.max_prompt_length={MAX_PROMPT_TOKENS}", f"rl.max_completion_length={MAX_COMPLETION_TOKENS}",
    "rl.eval_limit=null"]}


# ----------------------------------------------------------------------------------------------- the task


def column_problem(rng: random.Random) -> dict:
    """One problem A op B (op + or -, A and B in [10, 99], A >= B for -) with its worked completion and answer."""
    op = rng.choice("+-")
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if op == "-" and a < b:
        a, b = b, a
    (a_tens, a_units), (b_tens, b_units) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        carry = int(a_units + b_units >= 10)
        tens = f"{a_tens}+{b_tens}+1={a_tens + b_tens + 1}" if carry else f"{a_tens}+{b_tens}={a_tens + b_tens}"
        steps, result = [f"{a_units}+{b_units}={a_units + b_units}", tens], a + b
    else:
        borrow = int(a_units < b_units)
        tens = f"{a_tens}-{b_tens}-1={a_tens - b_tens - 1}" if borrow else f"{a_tens}-{b_tens}={a_tens - b_tens}"
        steps, result = [f"{a_units + 10 * borrow}-{b_units}={a_units + 10 * borrow - b_units}", tens], a - b
    return {"prompt": f"What is {a} {op} {b}?", "completion": ", ".join([*steps, str(result)]),
            "answer": str(result)}


def column_arithmetic(n: int, seed: int, *, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """`n` problems (column_problem) drawn with `seed`, none whose prompt is in `exclude`."""
    rng, records = random.Random(seed), []
    while len(records) < n:
        record = column_problem(rng)
        if record["prompt"] not in exclude:
            records.append(record)
    return records


def write_jsonl(path: str, records: list[dict]) -> str:
    """Writes `records` one JSON object per line; returns `path`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def make_splits(folder: str, seed: int, scale: float) -> dict[str, list[dict]]:
    """Held-out, validation and train problems (RECORDS, times `scale`), disjoint, written to folder/<split>.jsonl."""
    splits, seen = {}, frozenset()
    for name in ("heldout", "validation", "train"):
        count = max(512 if name == "train" else 32, round(RECORDS[name] * scale))
        splits[name] = column_arithmetic(count, seed + SPLIT_SEEDS[name], exclude=seen)
        seen |= {r["prompt"] for r in splits[name]}
        write_jsonl(os.path.join(folder, f"{name}.jsonl"), splits[name])
    return splits


# ----------------------------------------------------------------------------------------------- one run


@dataclass
class DemoRun:
    """A demo's folder, seed, step scale and data (data/<split>.jsonl), and the helpers its stages share."""

    output_dir: str
    seed: int
    scale: float
    progress: bool
    splits: dict[str, list[dict]]

    def path(self, *parts: str) -> str:
        return os.path.join(self.output_dir, *parts)

    def data(self, split: str) -> str:
        return self.path("data", f"{split}.jsonl")

    def steps(self, n: int, least: int = 4) -> int:
        """`n` steps (or records) times the run's scale, at least `least`."""
        return max(least, round(n * self.scale))

    def log(self, text: str) -> None:
        if self.progress:
            print(text, flush=True)

    def config(self, stage: str, overrides: list[str]) -> Config:
        """The stage's Config: the demo's base settings, output in output_dir/<stage>, then `overrides`."""
        return load_config(Config, None, [*BASE, f"seed={self.seed}", f"train.output_dir={self.path(stage)}",
                                          f"train.progress={str(self.progress).lower()}", *overrides])

    def accuracy(self, stage: str, split: str = "heldout", output: str | None = None) -> float:
        """Greedy exact-match accuracy of the stage's final model on a split; each answer in <stage>/<output>."""
        cfg = self.config(stage, [
            f"model.path={self.path(stage, 'final')}", f"data.eval=[{self.data(split)}]", "sampling.temperature=0.0",
            f"sampling.max_new_tokens={MAX_COMPLETION_TOKENS}", f"sampling.max_prompt_length={MAX_PROMPT_TOKENS}",
            "eval.metric=exact_match", "eval.batch_size=64", f"eval.output={self.path(stage, output or split + '.jsonl')}",
            f"eval.progress={str(self.progress).lower()}"])
        return float(run_eval(cfg)["exact_match"])


# ----------------------------------------------------------------------------------------------- the stages


def sft_stage(run: DemoRun) -> dict:
    """SFT on the train split's worked solutions, in chunks that resume, until validation accuracy reaches
    SFT["target"] (or SFT["last"] steps); held-out accuracy, steps and the last validation accuracy."""
    first, every, last = (run.steps(SFT[k], least=10) for k in ("first", "every", "last"))
    steps = first
    while True:
        run_sft(run.config("sft", [f"data.train=[{run.data('train')}]", f"train.steps={steps}", *SFT["overrides"]]))
        validation = run.accuracy("sft", "validation", f"validation_{steps}.jsonl")
        run.log(f"[demo] sft: {steps} steps, validation accuracy {validation:.1%}")
        if validation >= SFT["target"] or steps + every > last:
            return {"accuracy": run.accuracy("sft"), "steps": steps, "validation_accuracy": validation}
        steps += every


def preference_pairs(run: DemoRun, model_stage: str, records: list[dict]) -> tuple[list[dict], str]:
    """DPO pairs {"prompt", "chosen", "rejected"} from PAIRS["samples"] completions of each record's prompt by the
    stage's final model: where they hold a right and a wrong final answer, chosen a right one and rejected a wrong
    one. If no prompt has both (a model that never answers right, e.g. after --quick's few SFT steps), chosen is
    the record's worked solution instead. Returns (pairs, "sampled" or "worked solutions")."""
    cfg = run.config(model_stage, [f"model.path={run.path(model_stage, 'final')}"])
    mesh = parallel.mesh_from_config(cfg.mesh)
    model = configured_model(cfg, mesh)
    sampling = SamplingParams(max_new_tokens=MAX_COMPLETION_TOKENS, temperature=PAIRS["temperature"],
                              n=PAIRS["samples"], max_prompt_length=MAX_PROMPT_TOKENS)
    rng, sampled, solved = random.Random(run.seed), [], []
    for start in range(0, len(records), PAIRS["batch"]):
        batch = records[start:start + PAIRS["batch"]]
        completions = generate_text(model, [r["prompt"] for r in batch], sampling.replace(seed=run.seed + start),
                                    mesh=mesh, rules=cfg.mesh.rules)
        for i, record in enumerate(batch):
            texts = [c.text for c in completions[i * sampling.n:(i + 1) * sampling.n]]
            right = [t for t in texts if answers_match(extract_answer(t), record["answer"])]
            wrong = [t for t in texts if t and t not in right]  # an empty completion has nothing to push down
            if not wrong:
                continue
            pair = {"prompt": record["prompt"], "rejected": rng.choice(wrong)}
            if right:
                sampled.append({**pair, "chosen": rng.choice(right)})
            else:
                solved.append({**pair, "chosen": record["completion"]})
    return (sampled, "sampled") if sampled else (solved, "worked solutions")


def dpo_stage(run: DemoRun) -> dict:
    """DPO from the SFT model on pairs of its own right and wrong answers to train prompts (data/pairs.jsonl)."""
    prompts = run.splits["train"][:run.steps(PAIRS["prompts"], least=PAIRS["batch"])]
    pairs, chosen = preference_pairs(run, "sft", prompts)
    run.log(f"[demo] dpo: {len(pairs)} pairs from {len(prompts)} prompts, chosen answers {chosen}")
    if not pairs:
        raise TrainingError(f"demo: all {PAIRS['samples']} samples of each of {len(prompts)} prompts by the SFT "
                            f"model were right: nothing to prefer; lower SFT['target'] in {__file__}")
    steps = run.steps(DPO["steps"])
    run_dpo(run.config("dpo", [f"model.path={run.path('sft', 'final')}",
                               f"data.train=[{write_jsonl(run.data('pairs'), pairs)}]", f"train.steps={steps}",
                               *DPO["overrides"]]))
    return {"accuracy": run.accuracy("dpo"), "steps": steps, "pairs": len(pairs), "chosen": chosen}


def grpo_stage(run: DemoRun) -> dict:
    """GRPO from the DPO model with the math reward on train prompts, held-out accuracy every steps / GRPO["evals"]."""
    steps = run.steps(GRPO["steps"])
    run_rl(run.config("grpo", [f"model.path={run.path('dpo', 'final')}", f"data.train=[{run.data('train')}]",
                               f"data.eval=[{run.data('heldout')}]", f"train.steps={steps}",
                               f"train.eval_every={steps // GRPO['evals'] or steps}", *GRPO["overrides"]]))
    return {"accuracy": run.accuracy("grpo"), "steps": steps}


# ----------------------------------------------------------------------------------------------- reporting


def format_table(stages: dict[str, dict]) -> str:
    """The stage | held-out accuracy | steps | seconds table, one line per stage (seconds: the stage's wall time,
    its sampling and evaluations included)."""
    lines = [f"{'stage':<6} | {'held-out accuracy':>17} | {'steps':>5} | {'seconds':>7}",
             f"{'-' * 6}-+-{'-' * 17}-+-{'-' * 5}-+-{'-' * 7}"]
    lines += [f"{name:<6} | {s['accuracy']:>16.1%} | {s['steps']:>5} | {s['seconds']:>7.1f}" for name, s in stages.items()]
    return "\n".join(lines)


def read_metrics(path: str) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(path: str, grpo_metrics: list[dict], stages: dict[str, dict]) -> str:
    """curves.png: per GRPO step the reward mean and accuracy of the groups trained on and the held-out accuracy
    (at step 0 the DPO model's), left; the held-out accuracy after each stage, right."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[2, 1])
    rows = [m for m in grpo_metrics if "reward/mean" in m]
    steps = [m["step"] for m in rows]
    left.plot(steps, [m["reward/mean"] for m in rows], lw=1, label="reward mean (groups trained on)")
    left.plot(steps, [m.get("accuracy") for m in rows], "--", lw=1, label="accuracy (groups trained on)")
    evals = [(0, stages["dpo"]["accuracy"])] + [(m["step"], m["eval_accuracy"]) for m in rows
                                                if m.get("eval_accuracy") is not None]
    left.plot(*zip(*evals), "o-", color="C2", lw=2, label="held-out accuracy (greedy)")
    left.set(xlabel="GRPO step", ylim=(0, 1.05), title="GRPO")
    left.legend(loc="lower right")
    names = list(stages)
    bars = right.bar(names, [stages[n]["accuracy"] for n in names], color=[f"C{i}" for i in range(len(names))])
    right.bar_label(bars, labels=[f"{stages[n]['accuracy']:.1%}" for n in names])
    right.set(ylim=(0, 1.15), title="held-out accuracy after each stage")
    figure.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------------------------- the demo


def run_demo(output_dir: str = "runs/demo", seed: int = 0, scale: float = 1.0, progress: bool = True) -> dict:
    """SFT -> DPO (pairs sampled from the SFT model) -> GRPO on worked arithmetic, in `output_dir` (which must be
    new or empty), step counts times `scale`; prints the table. Returns the summary (also in summary.json)."""
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ConfigError(f"demo: the output folder {output_dir!r} is not empty (a previous demo?); pass another "
                          "--output-dir or delete it")
    clock = time.perf_counter()
    run = DemoRun(output_dir, seed, scale, progress, make_splits(os.path.join(output_dir, "data"), seed, scale))
    stages = {}
    for name, stage in (("sft", sft_stage), ("dpo", dpo_stage), ("grpo", grpo_stage)):
        run.log(f"[demo] {name}: start")
        start = time.perf_counter()
        stages[name] = {**stage(run), "seconds": round(time.perf_counter() - start, 1)}
        run.log(f"[demo] {name}: done in {stages[name]['seconds']:.0f}s, held-out accuracy "
                f"{stages[name]['accuracy']:.1%}")
    table = format_table(stages)
    print(table, flush=True)
    curves = plot_curves(run.path("curves.png"), read_metrics(run.path("grpo", "metrics.jsonl")), stages)
    summary = {"seed": seed, "scale": scale, "task": "two-digit + and -, worked column by column",
               "records": {name: len(records) for name, records in run.splits.items()}, "stages": stages,
               "accuracy": {name: s["accuracy"] for name, s in stages.items()},
               "grpo_minus_sft": round(stages["grpo"]["accuracy"] - stages["sft"]["accuracy"], 4),
               "seconds": round(time.perf_counter() - clock, 1), "table": table, "curves": curves}
    with open(run.path("summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    run.log(f"[demo] done in {summary['seconds']:.0f}s: summary.json and curves.png in {output_dir}")
    return summary
