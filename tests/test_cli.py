"""The `polm` command as a user runs it: info on the embedded default, convert both ways, clear errors."""

import os
import subprocess

from hf_models import assert_same_tensors, build_hf_model

from polm_jax.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_runs_the_embedded_default_as_a_console_script():
    out = subprocess.run(["polm", "info", "--config", os.path.join(REPO, "configs", "tiny.yaml"),
                          "mesh.fsdp=4", "mesh.tensor=2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "0.14M in float32" in out.stdout
    assert "{'data': 1, 'fsdp': 4, 'tensor': 2} on 8 cpu device(s)" in out.stdout
    assert "tokens/s" in out.stdout


def test_convert_hf_to_polm_and_back_is_exact(tmp_path, capsys):
    build_hf_model("gemma3", tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "polm")]) == 0
    assert '"format": "polm checkpoint"' in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "polm"), str(tmp_path / "back")]) == 0
    assert_same_tensors(tmp_path / "hf", tmp_path / "back")


def test_unknown_config_key_names_the_nearest(capsys):
    code = main(["info", "--config", os.path.join(REPO, "configs", "tiny.yaml"), "mesh.fsdq=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown key 'mesh.fsdq'" in err and "did you mean 'mesh.fsdp'" in err


def test_convert_of_a_missing_folder_fails_cleanly(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_info_for_a_real_preset(capsys):
    """A real-size preset builds (randomly, sharded over 8 devices) and reports its size and per-device share."""
    assert main(["info", "--preset", "gemma3-270m", "--batch", "0", "model.param_dtype=bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "268.10M in bfloat16" in out and "511.4 MiB total" in out
