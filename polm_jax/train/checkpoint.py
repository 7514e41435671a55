"""Checkpoints of a run: orbax CheckpointManager with async saves and keep-N, holding the train state and each
process's data-iterator state, so a resumed run continues exactly (same params, optimizer, step, RNG, data order).

orbax writes a step into a temporary folder and renames it when complete, so a run killed mid-save leaves only
an unfinished temporary folder, which `latest_step` never picks.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from polm_jax.errors import CheckpointError
from polm_jax.train.state import TrainState


class Checkpointer:
    """Saves and restores (TrainState, data iterator) under `directory`/<step>/{state,data}."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        if "://" not in directory:  # orbax wants absolute local paths; gs:// and the like pass through
            directory = os.path.abspath(directory)
        self.directory = directory
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            directory, options=options, item_names=("state", "data"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, data_iterator) -> None:
        """Starts saving at `state.step` unless saved already (returns once device arrays are copied; writing
        continues in the background)."""
        step = int(state.step)
        if step in self.manager.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract: TrainState, data_iterator) -> TrainState:
        """The state saved at `step`, placed by the shardings in `abstract`; `data_iterator` is set to its state."""
        self._check_process_count(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                  data=grain.checkpoint.CheckpointRestore(data_iterator))
        return self.manager.restore(step, args=args)["state"]

    def _check_process_count(self, step: int) -> None:
        """The data position is stored per process: a run must resume with the process count that saved it."""
        data = epath.Path(self.directory) / str(step) / "data"
        mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if data.exists() and not (data / mine).exists():
            found = sorted(p.name for p in data.iterdir() if p.name.startswith("process_"))
            raise CheckpointError(f"{data.parent}: written by a run with another number of processes ({', '.join(found)}"
                                  f"), this run has {jax.process_count()}; the data position is stored per process, so "
                                  f"resume with the same number, or use a new train.output_dir / train.resume=false")

    def wait(self) -> None:
        """Blocks until background saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
