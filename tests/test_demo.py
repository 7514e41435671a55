"""`polm demo`: the worked-arithmetic task it generates, and the whole SFT -> DPO -> GRPO run in its --quick setting."""

import json
import re

from polm_jax.cli import main
from polm_jax.eval.answers import extract_answer
from polm_jax.recipes.demo import column_arithmetic

PROBLEM = re.compile(r"What is (\d\d) ([+-]) (\d\d)\?")
STEP = re.compile(r"(\d+)([+-])(\d+)(?:([+-])1)?=(\d+)")


def test_worked_problems_are_right_step_by_step_and_held_out_ones_are_excluded():
    heldout = column_arithmetic(50, seed=1)
    records = column_arithmetic(2000, seed=0, exclude=frozenset(r["prompt"] for r in heldout))
    assert len(records) == 2000 and not {r["prompt"] for r in records} & {r["prompt"] for r in heldout}
    assert {PROBLEM.fullmatch(r["prompt"])[2] for r in records} == {"+", "-"}
    for r in records:
        a, op, b = PROBLEM.fullmatch(r["prompt"]).groups()
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        *steps, final = r["completion"].split(", ")
        assert final == r["answer"] == extract_answer(r["completion"])
        for step in steps:  # each column's sum or difference is right, the carry or borrow included
            x, sign, y, extra, result = STEP.fullmatch(step).groups()
            value = int(x) + int(y) if sign == "+" else int(x) - int(y)
            assert int(result) == value + {None: 0, "+": 1, "-": -1}[extra]
    assert column_arithmetic(20, seed=0) == column_arithmetic(20, seed=0) != column_arithmetic(20, seed=1)


def test_quick_demo_runs_the_three_stages_and_writes_table_summary_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out), "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    for stage in ("sft", "dpo", "grpo"):
        assert f"[demo] {stage}: start" in printed and f"[demo] {stage}: done in" in printed
        assert (out / stage / "final").is_dir() and (out / stage / "heldout.jsonl").is_file()
        assert re.search(rf"^{stage} +\| +\d+\.\d% \| +\d+ \| +\d+\.\d$", printed, re.MULTILINE), printed
    assert "stage  | held-out accuracy | steps | seconds" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["accuracy"]) == {"sft", "dpo", "grpo"}
    assert all(0.0 <= a <= 1.0 for a in summary["accuracy"].values())
    assert summary["stages"]["dpo"]["pairs"] > 0
    pairs = [json.loads(line) for line in (out / "data" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == summary["stages"]["dpo"]["pairs"] and all(p["chosen"] != p["rejected"] for p in pairs)
    grpo = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in grpo] == list(range(1, summary["stages"]["grpo"]["steps"] + 1))
    assert all("reward/mean" in m for m in grpo) and "eval_accuracy" in grpo[-1]

    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_demo_refuses_an_output_directory_in_use(tmp_path, capsys):
    (tmp_path / "earlier.txt").write_text("a previous run")
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.txt"]
