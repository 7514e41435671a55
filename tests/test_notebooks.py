"""Every notebook in colab/ runs top to bottom (with its tiny default) in a real Jupyter kernel; a notebook listed in
CHECKS also has what it prints checked."""

import ast
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "colab").glob("*.ipynb"))


def _line(text: str, prefix: str) -> str:
    """The rest of the first printed line starting with `prefix`."""
    match = re.search(rf"^{re.escape(prefix)}(.*)$", text, re.MULTILINE)
    assert match, f"no line starting with {prefix!r} in the notebook's output"
    return match.group(1)


def _check_quickstart(text: str) -> None:
    assert "packed == alone: True" in text and "orbax round trip exact: True" in text
    assert float(re.search(r"max \|polm - transformers\| = (\S+)", text).group(1)) < 1e-4


def _check_sft_lora(text: str) -> None:
    assert _line(text, "loss fell: ") == "True"
    assert re.fullmatch(r"\d+", _line(text, "sample: ")), "the trained tiny model answers in digits"
    hf_files = ast.literal_eval(_line(text, "hf files: "))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(hf_files)
    assert {"params", "polm_model.json", "tokenizer"} <= set(ast.literal_eval(_line(text, "polm files: ")))
    assert _line(text, "transformers sample: ").endswith("| same: True")


def _check_dpo(text: str) -> None:
    assert float(_line(text, "final held-out reward accuracy: ")) >= 0.9


def _check_grpo_gsm8k(text: str) -> None:
    run, total = map(int, _line(text, "steps run: ").split(" of "))
    assert run == total > 0
    first, last = map(float, _line(text, "reward mean first/last: ").split())
    assert 0.0 <= first <= 1.0 and 0.0 <= last <= 1.0
    informative, groups = map(int, _line(text, "informative groups: ").split(" of "))
    assert 0 < informative <= groups, "some groups had mixed rewards, so the policy got a gradient"
    assert _line(text, "metrics finite: ") == "True"
    before, after = map(float, _line(text, "held-out accuracy before/after: ").split())
    assert 0.0 < before <= 1.0 and 0.0 <= after <= 1.0, "the stand-in base answers some held-out questions right"
    assert {"params", "polm_model.json", "tokenizer"} <= set(ast.literal_eval(_line(text, "exported: ")))


CHECKS = {"quickstart.ipynb": _check_quickstart, "sft_lora.ipynb": _check_sft_lora, "dpo.ipynb": _check_dpo,
          "grpo_gsm8k.ipynb": _check_grpo_gsm8k}  # notebook -> its output check


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    notebook = nbformat.read(path, as_version=4)
    assert not [c for c in notebook.cells if c.get("outputs")], f"{path.name}: store the notebook without outputs"
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = "".join(o["text"] for cell in notebook.cells for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")  # progress bars are stderr
    if path.name in CHECKS:
        CHECKS[path.name](text)


def test_colab_has_notebooks():
    assert NOTEBOOKS, "colab/ holds no notebooks"
    assert set(CHECKS) <= {p.name for p in NOTEBOOKS}, "CHECKS names a notebook that colab/ does not hold"
