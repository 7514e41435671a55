"""`polm generate` and `polm eval` as a user runs them: streamed text, every sample written, metrics, clear errors."""

import json
import os

import numpy as np
import pytest
from hf_models import build_hf_model

import polm_jax as pj
from polm_jax.cli import main
from polm_jax.config import Config, load_config
from polm_jax.data.synthetic import arithmetic
from polm_jax.data.tokenizer import byte_tokenizer
from polm_jax.eval.answers import answers_match, extract_answer
from polm_jax.eval.metrics import majority_vote
from polm_jax.sampling.params import SamplingParams
from polm_jax.sampling.text import generate_text

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.fixture(scope="module")
def byte_model_folder(tmp_path_factory):
    """A tiny random Llama (vocabulary 512) saved by transformers, with the byte tokenizer (263 ids) beside it."""
    folder = tmp_path_factory.mktemp("byte_llama")
    build_hf_model("llama", folder, seed=3)
    byte_tokenizer().save(folder)
    return str(folder)


def test_generate_streams_what_one_shot_generation_returns(byte_model_folder, capsys):
    """The CLI streams chunk by chunk on an 8-device mesh; the text equals one generate_text call on 1 device."""
    argv = ["generate", "--model", byte_model_folder, "--prompt", "What is 2 + 3?", "--chat", "--max-new-tokens",
            "20", "--temperature", "0"]
    assert main(argv) == 0
    streamed = capsys.readouterr().out
    completion = generate_text(pj.load(byte_model_folder), ["What is 2 + 3?"],
                               SamplingParams(max_new_tokens=20, temperature=0.0), chat=True)[0]
    assert completion.text and streamed == completion.text + "\n"
    assert max(completion.tokens) < 263  # only the tokenizer's ids are sampled


def test_eval_on_the_tiny_config_writes_every_sample_and_its_metrics(tmp_path, capsys):
    output = tmp_path / "samples.jsonl"
    assert main(["eval", "--config", os.path.join(CONFIGS, "eval_tiny.yaml"), "--output", str(output)]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out.strip().splitlines()[-1])
    assert "32/32" in captured.err  # the progress bar
    samples = [json.loads(line) for line in output.read_text().splitlines()]
    records = arithmetic(32, 1)
    assert len(samples) == 32 * 4
    assert [(s["index"], s["sample"]) for s in samples] == [(i, j) for i in range(32) for j in range(4)]
    for s in samples:
        assert s["prompt"] == records[s["index"]]["prompt"] and s["gold"] == records[s["index"]]["answer"]
        assert s["answer"] == extract_answer(s["completion"])
        assert s["correct"] == answers_match(s["answer"], s["gold"])
    by_prompt = [samples[4 * i: 4 * i + 4] for i in range(32)]
    expected = {"exact_match": np.mean([s["correct"] for s in samples]),
                "pass@4": np.mean([any(s["correct"] for s in group) for group in by_prompt]),
                "maj@4": np.mean([answers_match(majority_vote([s["answer"] for s in group]), group[0]["gold"])
                                  for group in by_prompt])}
    assert metrics["metric"] == "pass@4" and metrics["value"] == metrics["pass@4"]
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert metrics["prompts"] == 32 and metrics["samples_per_prompt"] == 4


def test_eval_names_a_record_without_a_prompt(tmp_path, capsys):
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    assert main(["eval", "--preset", "tiny-llama", "--data", str(data), "data.tokenizer=bytes",
                 f"eval.output={tmp_path / 'out.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:1: no 'prompt' field (found ['answer', 'question'])" in err
    assert "data.columns, e.g. {question: prompt}" in err


def test_the_gsm8k_config_reads_and_maps_its_columns():
    cfg = load_config(Config, os.path.join(CONFIGS, "eval_qwen2.5-0.5b_gsm8k.yaml"))
    assert cfg.data.eval == ["tfds:gsm8k:test"] and cfg.data.columns == {"question": "prompt"}
    assert cfg.eval.chat and cfg.sampling.temperature == 0.0 and cfg.eval.metric == "exact_match"


def test_bad_eval_options_are_refused(capsys):
    assert main(["eval", "--preset", "tiny-llama", "--metric", "pass@0"]) == 2
    assert "eval.metric: expected exact_match, pass@K or maj@K" in capsys.readouterr().err
    assert main(["generate", "--preset", "tiny-llama", "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "sampling.top_p: must be in (0, 1]" in capsys.readouterr().err
