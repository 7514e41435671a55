"""Every shipped config loads (every key checked) and names its own command; the preference recipes read the record
shape their header promises (UltraFeedback binarized) through the model family's chat template."""

import glob
import itertools
import json
import os

import numpy as np
import pytest
from tokenizer_folders import make_tokenizer_folder

from polm_jax.config import Config, load_config
from polm_jax.data.preference import preference_dataset
from polm_jax.data.sources import open_sources
from polm_jax.data.tokenizer import load_tokenizer
from polm_jax.recipes.dpo import data_kind

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
ALL = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.yaml")))
PREFERENCE = {"dpo_qwen2.5-0.5b-instruct_lora.yaml": "qwen2", "simpo_gemma3-1b.yaml": "gemma"}


def test_the_config_folder_is_found():
    assert set(PREFERENCE) <= set(ALL) and len(ALL) > len(PREFERENCE)


@pytest.mark.parametrize("name", ALL)
def test_config_loads_and_its_header_shows_how_to_run_it(name):
    path = os.path.join(CONFIGS, name)
    load_config(Config, path)
    with open(path) as f:
        header = "".join(itertools.takewhile(lambda line: line.startswith("#"), f))
    assert f"--config configs/{name}" in header, f"{name}: the header comment should show a polm command using it"


def ultrafeedback_record(i: int) -> dict:
    """One record as HuggingFaceH4/ultrafeedback_binarized has it (its extra fields included)."""
    prompt = f"Name a colour, please ({i})."
    user = {"role": "user", "content": prompt}
    chosen, rejected = [user, {"role": "assistant", "content": "Blue."}], [user, {"role": "assistant",
                                                                                  "content": "No."}]
    return {"prompt": prompt, "prompt_id": str(i), "chosen": chosen, "rejected": rejected,
            "messages": chosen, "score_chosen": 8.0, "score_rejected": 2.0}


@pytest.mark.parametrize("name", sorted(PREFERENCE))
def test_preference_config_trains_on_assistant_replies_of_ultrafeedback_records(name, tmp_path):
    family = PREFERENCE[name]
    data = tmp_path / "train_prefs.jsonl"
    data.write_text("".join(json.dumps(ultrafeedback_record(i)) + "\n" for i in range(4)))
    cfg = load_config(Config, os.path.join(CONFIGS, name), [f"data.train=[{data}]"])
    tokenizer = load_tokenizer(make_tokenizer_folder(tmp_path / family, family))
    source = open_sources(cfg.data.train, cfg.data, key="data.train")
    ds, _ = preference_dataset(source, cfg.data, tokenizer, kind=data_kind(cfg), batch_size=1, seed=0, train=False)
    row = {k: v[0] for k, v in next(iter(ds)).items()}  # eval mode: one pair per row
    assert set(np.unique(row["segment_ids"])) == {0, 1, 2}
    start, end = {"qwen2": ("<|im_start|>", "<|im_end|>"), "gemma": ("<start_of_turn>", "<end_of_turn>")}[family]
    for segment, reply in ((1, "Blue."), (2, "No.")):
        tokens = row["tokens"][row["segment_ids"] == segment]
        targets = row["tokens"][(row["segment_ids"] == segment) & (row["loss_mask"] > 0)]
        assert start in tokenizer.decode(tokens, skip_special_tokens=False)  # the chat template was applied
        assert tokenizer.decode(targets, skip_special_tokens=False).strip() == reply + end  # the reply alone
        assert np.all(row["positions"][row["segment_ids"] == segment] == np.arange(len(tokens)))
