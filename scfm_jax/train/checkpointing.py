"""Orbax checkpoints of a training run: state, config, data position and vocabulary.

One checkpoint step holds four items:
  state       the TrainState (params, buffers, optimiser state, step, RNG key), sharded arrays
  config      the resolved experiment config (JSON)
  data        the data position: the step number and seed (batches are a pure function of them)
  vocabulary  the gene list and its content hash, so a mismatch is caught when the store changes
  checksums   a checksum of every array of the state (computed on the devices, independent of the
              sharding) and the SHA-256 of the JSON items, checked at every restore: a damaged
              file is an error naming the step, never NaN or wrong weights
Saves are asynchronous and atomic (Orbax writes a temporary folder and renames it). The last K
checkpoints are kept, plus the best by evaluation loss. Restoring takes an abstract target with
shardings, so a checkpoint written on one mesh restores onto any other. They live in
`<workdir>/checkpoints`, or where `train.checkpoint_dir` says: another folder or a gs:// bucket
(Orbax 0.12 writes OCDBT checkpoints to gs:// only; s3:// is refused: docs/data.md, "Stores on
object storage").
"""
import contextlib
import functools
import hashlib
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from scfm_jax.errors import NAMED_ERRNOS, CheckpointError, MissingDependency

ITEMS = ("state", "config", "data", "vocabulary", "checksums")
JSON_ITEMS = ("config", "data", "vocabulary")


class CheckpointDamaged(CheckpointError):
    """A checkpoint's files do not hold what was saved; the message names the step and item."""


def _path_name(path) -> str:
    """'params/encoder/kernel' for a tree path, whatever containers (dict, dataclass) hold it."""
    names = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                names.append(str(getattr(key, attribute)))
                break
        else:
            names.append(str(key))
    return "/".join(names)


@functools.partial(jax.jit)
def _checksums(leaves: list) -> list:
    """uint32 per array: sum over its bytes b_i of (b_i + 1) * w_i with odd position weights w_i
    (mod 2**32). Integer sums do not depend on the reduction order, so the value is the same on
    any mesh; any single changed byte changes it."""
    sums = []
    for leaf in leaves:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if leaf.dtype == jnp.bool_:
            leaf = leaf.astype(jnp.uint8)
        data = jax.lax.bitcast_convert_type(leaf.ravel(), jnp.uint8).ravel().astype(jnp.uint32)
        index = jnp.arange(data.size, dtype=jnp.uint32)
        weights = (index * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9)) | jnp.uint32(1)
        sums.append(jnp.sum((data + 1) * weights, dtype=jnp.uint32))
    return sums


def tree_checksums(tree) -> dict[str, int]:
    """{path name: checksum} of the arrays of a pytree (see `_checksums`)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    values = _checksums([leaf for _, leaf in flat])
    return {_path_name(path): int(np.asarray(v)) for (path, _), v in zip(flat, values)}


def _ignore_reads_after_a_failed_restore() -> None:
    """After a failed restore, Orbax has closed its event loop while TensorStore reads are still in
    flight; each read that finishes later hands its result to the closed loop, and Python reports
    the RuntimeError as unraisable (a traceback on stderr, after the one-line error). Drop exactly
    those reports (installed once, before the first restore); every other unraisable exception
    goes to the previous hook."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "scfm_ignores_closed_loop", False):
        return

    def hook(report):
        if not (isinstance(report.exc_value, RuntimeError)
                and str(report.exc_value) == "Event loop is closed"):
            previous(report)

    hook.scfm_ignores_closed_loop = True
    sys.unraisablehook = hook


def _write_errno(error: BaseException) -> int | None:
    """The errno of a failed write named in `NAMED_ERRNOS` (TensorStore reports it in the message as
    os_error_code='28'), looking through the causes; None for other failures."""
    while error is not None:
        code = error.errno if isinstance(error, OSError) else None
        found = re.search(r"os_error_code='(\d+)'", str(error))
        code = int(found.group(1)) if found else code
        if code in NAMED_ERRNOS:
            return code
        error = error.__cause__ or error.__context__
    return None


def _json_digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _preservation(keep: int):
    return checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=lambda metrics: metrics["eval_loss"],
                                  reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])


def is_url(path) -> bool:
    return "://" in str(path)


def checkpoint_directory(workdir: str | Path | None, configured: str | None = None):
    """Where a run's checkpoints are: `train.checkpoint_dir` when set (a folder, or a bucket URL
    such as gs://bucket/run/checkpoints, which Orbax writes through TensorStore's gcs driver and
    etils.epath), else `<workdir>/checkpoints`."""
    if configured and is_url(configured):
        import importlib.util
        if configured.startswith("gs://") and importlib.util.find_spec("gcsfs") is None:
            raise MissingDependency(f"checkpoints on {configured} need gcsfs: "
                                    'pip install -e ".[gcs]"')
        return epath.Path(configured)
    if configured:
        return Path(configured).expanduser().absolute()
    if workdir is None:
        raise ValueError("name a workdir or a checkpoint directory")
    return Path(workdir).absolute() / "checkpoints"


class Checkpoints:
    """The checkpoints of one run (`<directory>/<step>/...`; by default `<workdir>/checkpoints`)."""

    def __init__(self, workdir: str | Path | None, *, directory: str | None = None,
                 keep: int = 3, asynchronous: bool = True, read_only: bool = False):
        self.directory = checkpoint_directory(workdir, directory)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_preservation(keep), enable_async_checkpointing=asynchronous,
            create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)
        self.resuming = False   # a training run resuming (no --step to choose another step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, *, config: ml_collections.ConfigDict, seed: int,
             vocabulary: dict, eval_loss: float | None = None) -> None:
        metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
        items = {"config": config.to_dict(), "data": {"step": int(step), "seed": int(seed)},
                 "vocabulary": vocabulary}
        checksums = {"state": tree_checksums(state),
                     "json": {name: _json_digest(value) for name, value in items.items()}}
        _ignore_reads_after_a_failed_restore()   # a failed write closes Orbax's loop too
        with self._writing(f"checkpoint step {step}"):
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                checksums=ocp.args.JsonSave(checksums),
                **{name: ocp.args.JsonSave(value) for name, value in items.items()},
            ), metrics=metrics, force=True)

    @contextlib.contextmanager
    def _writing(self, what: str):
        """A save that fails for lack of space (or a size limit, quota, read-only media) is one
        CheckpointError naming the folder and the fix; other failures pass through."""
        try:
            yield
        except Exception as error:
            code = _write_errno(error)
            if code is None:
                raise
            latest = self.latest_step()
            resume = (f"the run resumes from step {latest}" if latest is not None else
                      "the run starts again")
            raise CheckpointError(
                f"{what} could not be written to {self.directory}: {NAMED_ERRNOS[code]}; free "
                f"some space (or set --config.train.checkpoint_dir to another disk) and run the "
                f"same command again ({resume})") from None

    def _restore(self, step: int, **items):
        _ignore_reads_after_a_failed_restore()   # before: the loop closes before `except` runs
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:   # Orbax / TensorStore / JSON errors on damaged files
            raise self.damaged(step, ", ".join(items), f"cannot be read ({type(error).__name__}: "
                               f"{str(error).splitlines()[0][:300] if str(error) else ''})") from None

    def damaged(self, step: int, item: str, problem: str) -> CheckpointDamaged:
        older = [s for s in self.all_steps() if s < step]
        if not self.resuming:
            advice = f"Use an older step (--step; steps: {sorted(self.all_steps())}) or train again"
        elif older:
            advice = (f"To resume from step {max(older)}, move the folder {self.directory / str(step)} "
                      f"out of {self.directory}, then run the same command again")
        else:
            advice = "It is the run's only checkpoint: train again in a fresh --workdir"
        return CheckpointDamaged(
            f"checkpoint step {step} in {self.directory} is damaged: {item} {problem}. {advice}")

    def _saved_checksums(self, step: int) -> dict:
        return self._restore(step, checksums=ocp.args.JsonRestore())["checksums"]

    def verify(self, step: int, restored, item: str = "state") -> None:
        """Compare the arrays of a (possibly partial) restored state with the saved checksums."""
        saved = self._saved_checksums(step)["state"]
        for name, value in tree_checksums(restored).items():
            if saved.get(name) != value:
                raise self.damaged(step, f"{item} array {name}",
                                   "does not hold what was saved (checksum mismatch)")

    def restore_partial(self, step: int, target):
        """Some arrays of the state (a pytree shaped like part of it), checked against the saved
        checksums; e.g. {"params": ..., "buffers": ...} for inference."""
        restored = self._restore(step, state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))["state"]
        self.verify(step, restored)
        return restored

    def restore_metadata(self, step: int | None = None) -> dict:
        """The JSON items (config, data position, vocabulary) of a checkpoint, no arrays."""
        step = self.latest_step() if step is None else step
        restored = self._restore(step, **{name: ocp.args.JsonRestore() for name in JSON_ITEMS})
        digests = self._saved_checksums(step)["json"]
        for name in JSON_ITEMS:
            if _json_digest(restored[name]) != digests.get(name):
                raise self.damaged(step, f"item {name!r}", "does not hold what was saved "
                                   "(SHA-256 mismatch)")
        return {"step": step, "config": restored["config"], "data": restored["data"],
                "vocabulary": restored["vocabulary"]}

    def restore_state(self, abstract_state, step: int | None = None):
        """The TrainState at `step`, placed as the shardings of `abstract_state` say."""
        step = self.latest_step() if step is None else step
        restored = self._restore(step, state=ocp.args.StandardRestore(abstract_state))["state"]
        self.verify(step, restored)
        return restored

    def reached_preemption(self, step: int) -> bool:
        """True on every process once a preemption notice (SIGTERM) reached any of them.

        Multi-process runs use the JAX distributed runtime's preemption sync point, so all
        processes agree on the step; a single process has no such service and relies on the
        loop's own SIGTERM flag.
        """
        return jax.process_count() > 1 and self.manager.reached_preemption(step)

    def close(self) -> None:
        with self._writing("a checkpoint"):
            self.manager.wait_until_finished()
        self.manager.close()
