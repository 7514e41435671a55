"""Two local processes form one 8-device mesh (jax.distributed on this machine): loading, forward and saving
give what a single process gives."""

import os
import socket
import subprocess
import sys

import numpy as np
from hf_models import assert_same_tensors, build_hf_model

import polm_jax as pj

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_one_mesh(tmp_path):
    build_hf_model("qwen2", tmp_path / "src")
    port, env = _free_port(), {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    workers = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), str(tmp_path / "src"), str(tmp_path)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    for w in workers:
        output = w.communicate(timeout=300)[0]
        assert w.returncode == 0, output[-3000:]

    model = pj.load(str(tmp_path / "src"))
    expected = pj.forward(model.config, model.params, np.load(tmp_path / "tokens.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-4, rtol=0)
    assert_same_tensors(tmp_path / "src", tmp_path / "hf")
    restored = pj.load(str(tmp_path / "polm"))
    np.testing.assert_array_equal(np.asarray(restored.params["embed"]), np.asarray(model.params["embed"]))
