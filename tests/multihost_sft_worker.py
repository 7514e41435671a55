"""One process of a 2-process SFT run on this machine (4 CPU devices each, one 8-device mesh): `run_sft` on the
config that test_multihost_sft.py passes, then what this process saw, as JSON, for the test. Started by
test_multihost_sft.py as `multihost_sft_worker.py PROCESS_ID PORT REPORT_FILE OVERRIDE...`."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from polm_jax.config import Config, load_config
from polm_jax.recipes.sft import run_sft

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sft_tiny.yaml")


def main(process_id: int, port: int, report: str, overrides: list[str]):
    cfg = load_config(Config, TINY, [*overrides, "mesh.multihost=true", f"mesh.coordinator_address=127.0.0.1:{port}",
                                     "mesh.num_processes=2", f"mesh.process_id={process_id}"])
    result = run_sft(cfg)
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    seen = {"process_index": jax.process_index(), "status": result.status, "step": result.step,
            "last": result.last}  # the last step's metrics, with this process's own data/* counters
    with open(report, "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
