"""Orbax checkpoints of a training run: state, config, data position and vocabulary.

One checkpoint step holds four items:
  state       the TrainState (params, buffers, optimiser state, step, RNG key), sharded arrays
  config      the resolved experiment config (JSON)
  data        the data position: the step number and seed (batches are a pure function of them)
  vocabulary  the gene list and its content hash, so a mismatch is caught when the store changes
Saves are asynchronous and atomic (Orbax writes a temporary folder and renames it). The last K
checkpoints are kept, plus the best by evaluation loss. Restoring takes an abstract target with
shardings, so a checkpoint written on one mesh restores onto any other.
"""
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

ITEMS = ("state", "config", "data", "vocabulary")


def _preservation(keep: int):
    return checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=lambda metrics: metrics["eval_loss"],
                                  reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])


class Checkpoints:
    """The checkpoints of one workdir (`<workdir>/checkpoints/<step>/...`)."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, asynchronous: bool = True,
                 read_only: bool = False):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_preservation(keep), enable_async_checkpointing=asynchronous,
            create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, *, config: ml_collections.ConfigDict, seed: int,
             vocabulary: dict, eval_loss: float | None = None) -> None:
        metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config.to_dict()),
            data=ocp.args.JsonSave({"step": int(step), "seed": int(seed)}),
            vocabulary=ocp.args.JsonSave(vocabulary),
        ), metrics=metrics, force=True)

    def restore_metadata(self, step: int | None = None) -> dict:
        """The JSON items (config, data position, vocabulary) of a checkpoint, no arrays."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), data=ocp.args.JsonRestore(),
            vocabulary=ocp.args.JsonRestore()))
        return {"step": step, "config": restored["config"], "data": restored["data"],
                "vocabulary": restored["vocabulary"]}

    def restore_state(self, abstract_state, step: int | None = None):
        """The TrainState at `step`, placed as the shardings of `abstract_state` say."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def reached_preemption(self, step: int) -> bool:
        """True on every process once a preemption notice (SIGTERM) reached any of them.

        Multi-process runs use the JAX distributed runtime's preemption sync point, so all
        processes agree on the step; a single process has no such service and relies on the
        loop's own SIGTERM flag.
        """
        return jax.process_count() > 1 and self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
