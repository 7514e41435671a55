"""Preference training end to end: data, one-forward scoring, learning, the reference (copy, LoRA base,
precomputed), bad input and the CLI."""

import glob
import json
import os
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polm_jax import cli
from polm_jax.algorithms.preference import preference_loss, sequence_logps
from polm_jax.config import Config, DataSection, load_config
from polm_jax.data.pipeline import encode_example
from polm_jax.data.preference import preference_dataset
from polm_jax.data.sources import open_sources
from polm_jax.data.tokenizer import byte_tokenizer
from polm_jax.errors import DataError
from polm_jax.models.transformer import forward
from polm_jax.recipes.dpo import run_dpo
from polm_jax.recipes.ref_logps import load_or_compute, ref_logps_path
from polm_jax.train.session import Session


def parity(n: int, seed: int, paired: bool = True) -> list[dict]:
    """Prefer the right parity of a number (its last digit is given) to the wrong one; held-out numbers differ."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x = rng.randint(0, 9999)
        right, wrong = ("even", "odd") if x % 2 == 0 else ("odd", "even")
        prompt = f"Is {x} even or odd? Its last digit is {x % 10}: "
        if paired:
            out.append({"prompt": prompt, "chosen": right, "rejected": wrong})
        else:
            good = rng.random() < 0.5
            out.append({"prompt": prompt, "completion": right if good else wrong, "label": good})
    return out


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def config(tmp_path, *overrides, paired: bool = True) -> Config:
    train = write_jsonl(tmp_path / "train.jsonl", parity(3000, 0, paired))
    held_out = write_jsonl(tmp_path / "eval.jsonl", parity(128, 1, paired))
    return load_config(Config, None, [
        "model.preset=tiny-llama", "mesh.fsdp=-1", f"data.train=[{train}]", f"data.eval=[{held_out}]",
        "data.tokenizer=bytes", "data.max_length=128", "optim.lr=3e-3", "optim.schedule=constant",
        "train.steps=150", "train.batch_size=8", "train.eval_every=150", "train.progress=false",
        "train.tensorboard=false", "train.export=none", f"train.output_dir={tmp_path / 'run'}", *overrides])


def eval_lines(tmp_path) -> list[dict]:
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        return [m for m in map(json.loads, f) if "eval_loss" in m]


@pytest.mark.parametrize("loss", [["preference.loss_type=sigmoid", "preference.beta=0.5"],
                                  ["preference.loss_type=simpo", "preference.beta=2.0"],
                                  ["preference.loss_type=orpo", "preference.beta=2.0"]])
def test_preference_training_learns_the_held_out_preference(tmp_path, loss):
    result = run_dpo(config(tmp_path, *loss))
    assert result.status == "done"
    assert eval_lines(tmp_path)[-1]["eval_rewards/accuracies"] >= 0.9


def test_kto_runs_and_improves(tmp_path):
    cfg = config(tmp_path, "preference.loss_type=kto", "preference.beta=0.5", "train.eval_every=30",
                 "train.steps=90", paired=False)
    run_dpo(cfg)
    evals = eval_lines(tmp_path)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05
    assert evals[-1]["eval_rewards/chosen"] > evals[-1]["eval_rewards/rejected"]


def test_one_packed_forward_scores_each_response_like_its_own_forward(tmp_path):
    tok, section = byte_tokenizer(), DataSection(max_length=256, packing=True)
    records = parity(12, 3)
    ds, _ = preference_dataset(records, section, tok, kind="paired", batch_size=2, seed=0)
    batch = next(iter(ds))
    assert (batch["segment_ids"].max(axis=1) >= 4).all()  # several units per row
    cfg = config(tmp_path)
    session = Session.create(cfg)
    (first, second), (first_len, second_len) = sequence_logps(session.model.config, session.trainable,
                                                              jax.tree.map(jnp.asarray, batch))
    for row in range(2):
        for unit in range(int(batch["segment_ids"][row].max()) // 2):
            record = records[int(batch["record"][row][batch["segment_ids"][row] == 2 * unit + 1][0]) - 1]
            for side, got, got_len in (("chosen", first, first_len), ("rejected", second, second_len)):
                ids, mask = encode_example({"prompt": record["prompt"], "completion": record[side]}, tok, section)
                logits = forward(session.model.config, session.trainable, ids[None])[0, :-1]
                want = (jax.nn.log_softmax(logits)[np.arange(len(ids) - 1), ids[1:]] * mask[1:]).sum()
                assert float(got[row, unit]) == pytest.approx(float(want), rel=1e-5)
                assert float(got_len[row, unit]) == mask[1:].sum()


def test_precomputed_reference_gives_the_same_losses_and_is_reloaded(tmp_path):
    cfg = config(tmp_path, "preference.beta=0.5")
    session = Session.create(cfg, reference=True)
    source = open_sources(cfg.data.eval, cfg.data)
    ref = load_or_compute(session, source, cfg.data.eval, kind="paired", reference=session.frozen)
    path = ref_logps_path(cfg, cfg.data.eval, "paired")
    assert path.startswith(cfg.data.eval[0]) and os.path.exists(path)  # stored beside the data
    assert np.isfinite(ref).all() and ref.shape == (128, 2)
    stamp = os.path.getmtime(path)
    again = load_or_compute(session, source, cfg.data.eval, kind="paired", reference=None)
    np.testing.assert_array_equal(again, ref)
    assert os.path.getmtime(path) == stamp

    leaves, tree = jax.tree.flatten(session.trainable)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    policy = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    loss_fn = preference_loss(session.model.config, session.model_params, cfg.preference)
    common = {"kind": "paired", "batch_size": 8, "seed": 0, "train": False}
    plain = next(iter(preference_dataset(source, cfg.data, session.tokenizer, **common)[0]))
    stored = next(iter(preference_dataset(source, cfg.data, session.tokenizer, ref_logps=ref, **common)[0]))
    on_the_fly = loss_fn(policy, session.frozen, jax.tree.map(jnp.asarray, plain), None)
    precomputed = loss_fn(policy, {}, jax.tree.map(jnp.asarray, stored), None)
    assert float(on_the_fly[0]) > 0.1
    np.testing.assert_allclose(float(precomputed[0]), float(on_the_fly[0]), rtol=1e-5)
    for name, (total, weight) in on_the_fly[2].items():
        np.testing.assert_allclose(float(precomputed[2][name][0]), float(total), rtol=1e-4, atol=1e-5, err_msg=name)


def _copies_of_the_embedding(session: Session) -> int:
    shape = session.model.params["embed"].shape
    return sum(1 for a in jax.live_arrays() if a.shape == shape and not a.is_deleted())


def test_lora_reference_holds_no_second_copy_of_the_weights(tmp_path):
    lora = Session.create(config(tmp_path, "lora.rank=4"))  # what run_dpo builds for LoRA with a reference
    assert lora.frozen is lora.model.params
    assert _copies_of_the_embedding(lora) == 1
    del lora
    full = Session.create(config(tmp_path), reference=True)  # full fine-tuning does need the copy
    assert _copies_of_the_embedding(full) == 2


def test_lora_dpo_trains_adapters_against_the_base(tmp_path):
    cfg = config(tmp_path, "lora.rank=8", "lora.alpha=16", "optim.lr=1e-2", "train.steps=20", "train.eval_every=20",
                 "preference.beta=0.5")
    result = run_dpo(cfg)
    names = {jax.tree_util.keystr(path[-1:]) for path, _ in jax.tree_util.tree_leaves_with_path(result.state.params)}
    assert result.status == "done" and names == {"['lora_a']", "['lora_b']"}  # only adapters train
    assert eval_lines(tmp_path)[-1]["eval_rewards/margins"] != 0.0


BAD = [({"prompt": "p", "chosen": "a"}, "no 'rejected' field"),
       ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
       ({"prompt": "p", "chosen": "", "rejected": "b"}, "'completion' is empty"),
       ({"chosen": "a", "rejected": "b"}, "no 'prompt'"),
       ({"prompt": "x" * 200, "chosen": "a", "rejected": "b"}, "more than data.max_length=64")]


@pytest.mark.parametrize("record,message", BAD)
def test_bad_records_are_named_errors(record, message):
    records = [{**record, "_where": "prefs.jsonl:7"}]
    ds, _ = preference_dataset(records, DataSection(max_length=64), byte_tokenizer(), kind="paired", batch_size=1,
                               seed=0)
    with pytest.raises(DataError, match=f"prefs.jsonl:7.*{message}"):
        next(iter(ds))


def test_bad_records_are_counted_and_skipped_or_dropped():
    good = parity(6, 0)
    records = [*good[:3], *(r for r, _ in BAD[:4]), {"prompt": "x" * 200, "chosen": "a", "rejected": "b"}, *good[3:]]
    section = DataSection(max_length=128, on_error="skip", truncation="drop", packing=False)
    ds, stats = preference_dataset(records, section, byte_tokenizer(), kind="paired", batch_size=6, seed=0,
                                   train=False)
    kept = {int(r) for batch in ds for r in batch["record"][:, 0]} - {0}
    assert stats.examples == 6 and stats.skipped == 4 and stats.dropped == 1
    assert sorted(kept) == [1, 2, 3, 9, 10, 11]
    truncated, truncated_stats = preference_dataset(records[-4:-3], DataSection(
        max_length=64, truncation="truncate_left"), byte_tokenizer(), kind="paired", batch_size=1, seed=0, train=False)
    row = next(iter(truncated))
    assert truncated_stats.truncated == 1 and row["segment_ids"].max() == 2


def test_conversational_pairs_share_their_prompt_turns():
    tok = byte_tokenizer()
    user = {"role": "user", "content": "Is 4 even or odd?"}
    record = {"chosen": [user, {"role": "assistant", "content": "even"}],
              "rejected": [user, {"role": "assistant", "content": "odd"}]}
    ds, _ = preference_dataset([record], DataSection(max_length=128), tok, kind="paired", batch_size=1, seed=0)
    row = next(iter(ds))
    for segment, answer in ((1, "even"), (2, "odd")):
        targets = row["tokens"][0][(row["segment_ids"][0] == segment) & (row["loss_mask"][0] > 0)]
        assert tok.decode(targets).startswith(answer) and "Is 4" not in tok.decode(targets)


def test_cli_dpo_with_precomputed_reference(tmp_path, capsys):
    cfg_path = tmp_path / "dpo.yaml"
    cfg_path.write_text(Path("configs/dpo_tiny.yaml").read_text())
    out = tmp_path / "cli"
    rc = cli.main(["dpo", "--config", str(cfg_path), "--precompute-ref", "model.path=null", "model.preset=tiny-llama",
                   "data.train=[synthetic:arithmetic_pairs:64]", "data.eval=[synthetic:arithmetic_pairs:16:1]",
                   "train.steps=4", "train.eval_every=4", "train.progress=false", f"train.output_dir={out}"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "done" and "eval_rewards/accuracies" in summary
    assert len(glob.glob(str(out / "ref_logps" / "*.npy"))) == 2  # train and eval, not beside synthetic data
    assert os.path.isdir(out / "final")
