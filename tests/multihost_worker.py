"""One process of a 2-process run on this machine (4 CPU devices each): load an HF folder onto the global mesh,
run a sharded forward, save a polm checkpoint and an HF export. Started by test_multihost.py."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
import numpy as np
from jax.experimental import multihost_utils

import polm_jax as pj
from polm_jax import parallel
from polm_jax.config import DEFAULT_RULES, MeshConfig


def main(process_id: int, port: int, hf_folder: str, out: str):
    mesh = parallel.mesh_from_config(MeshConfig(multihost=True, coordinator_address=f"127.0.0.1:{port}",
                                                num_processes=2, process_id=process_id, data=2, fsdp=2, tensor=2))
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    model = pj.load(hf_folder, mesh=mesh)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 16), dtype=np.int32)
    batch = parallel.batch_sharding(tokens.shape, mesh, DEFAULT_RULES)
    logits = pj.forward(model.config, model.params, jax.make_array_from_callback(tokens.shape, batch,
                                                                                 lambda idx: tokens[idx]))
    logits = multihost_utils.process_allgather(logits, tiled=True)
    pj.save_hf(model, os.path.join(out, "hf"))
    pj.save(model, os.path.join(out, "polm"))
    if process_id == 0:
        np.save(os.path.join(out, "logits.npy"), np.asarray(logits))
        np.save(os.path.join(out, "tokens.npy"), tokens)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
