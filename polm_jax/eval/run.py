"""`polm eval`: sample completions for every record of data.eval, extract and score the answers, write every sample.

    metrics = run_eval(load_config(Config, "configs/eval_tiny.yaml"))
    # {"metric": "pass@4", "value": ..., "exact_match": ..., "pass@4": ..., "maj@4": ..., "prompts": ..., ...}

Each record needs a prompt field (`prompt`, after data.columns renames) and a gold answer field (eval.answer_field);
each prompt gets max(sampling.n, K) samples for pass@K / maj@K. Batch b is seeded with seed + its first record's
index, so a run is reproducible for a given batch size.
"""

from __future__ import annotations

import json
import os

import jax
from tqdm.auto import tqdm

from polm_jax import parallel
from polm_jax.config import Config
from polm_jax.data.sources import open_sources
from polm_jax.errors import DataError
from polm_jax.eval.answers import answers_match, extract_answer, gold_answer
from polm_jax.eval.metrics import mean_metrics, parse_metric, prompt_metrics
from polm_jax.sampling.params import SamplingParams
from polm_jax.sampling.text import generate_text
from polm_jax.train.session import configured_model


def _field(record: dict, name: str, hint: str):
    if name not in record:
        fields = sorted(k for k in record if k != "_where")
        raise DataError(f"{record.get('_where', 'record')}: no {name!r} field (found {fields}); {hint}")
    return record[name]


def prompt_text(record: dict, prompt_format: str) -> str:
    """The record's `prompt` string placed into `prompt_format` ({prompt}); DataError naming the record otherwise."""
    prompt = _field(record, "prompt", "rename the question field with data.columns, e.g. {question: prompt}")
    if not isinstance(prompt, str):
        raise DataError(f"{record['_where']}: 'prompt' must be a string, got {type(prompt).__name__}")
    return prompt_format.replace("{prompt}", prompt)


def run_eval(cfg: Config) -> dict:
    """Evaluates cfg.model on cfg.data.eval as cfg.eval and cfg.sampling say; writes cfg.eval.output (JSONL, one
    line per sample) and returns the metrics (means over prompts)."""
    mesh = parallel.mesh_from_config(cfg.mesh)
    model = configured_model(cfg, mesh)
    source = open_sources(cfg.data.eval, cfg.data, key="data.eval")
    count = len(source) if cfg.eval.limit is None else min(cfg.eval.limit, len(source))
    name, k = parse_metric(cfg.eval.metric)
    sampling = SamplingParams.from_section(cfg.sampling, cfg.seed)
    sampling = sampling.replace(n=max(sampling.n, k))
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.eval.output)), exist_ok=True)
    per_prompt, truncated = [], 0
    with (open(cfg.eval.output, "w", encoding="utf-8") if writer else open(os.devnull, "w")) as out, \
            tqdm(total=count, desc="eval", unit="prompt", dynamic_ncols=True,
                 disable=not (cfg.eval.progress and writer)) as bar:
        for start in range(0, count, cfg.eval.batch_size):
            records = [source[i] for i in range(start, min(start + cfg.eval.batch_size, count))]
            prompts = [prompt_text(r, cfg.eval.prompt_format) for r in records]
            golds = [gold_answer(str(_field(r, cfg.eval.answer_field, "set eval.answer_field"))) for r in records]
            completions = generate_text(model, prompts, sampling.replace(seed=sampling.seed + start), chat=cfg.eval.chat,
                                        stop=cfg.sampling.stop, mesh=mesh, rules=cfg.mesh.rules)
            for i, record in enumerate(records):
                samples = completions[i * sampling.n:(i + 1) * sampling.n]
                answers = [extract_answer(c.text, last_number=cfg.eval.last_number) for c in samples]
                for j, (c, answer) in enumerate(zip(samples, answers)):
                    out.write(json.dumps({"index": start + i, "sample": j, "where": record["_where"], "prompt": prompts[i],
                                          "completion": c.text, "answer": answer, "gold": golds[i],
                                          "correct": answers_match(answer, golds[i]), "truncated": c.truncated,
                                          "num_tokens": len(c.tokens)}, ensure_ascii=False) + "\n")
                    truncated += c.truncated
                per_prompt.append(prompt_metrics(answers, golds[i], k))
            bar.update(len(records))
    figures = mean_metrics(per_prompt)
    chosen = "exact_match" if name == "exact_match" else f"{name}@{k}"
    return {"metric": chosen, "value": figures.get(chosen), **figures, "prompts": count, "samples_per_prompt": sampling.n,
            "truncated": truncated / max(count * sampling.n, 1), "output": cfg.eval.output}
