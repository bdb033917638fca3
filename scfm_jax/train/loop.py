"""`scfm-jax train`: the one train loop, for any model, on one CPU, a GPU host or a TPU pod.

  scfm-jax train --config configs/scfoundation_tiny.py --workdir runs/tiny \
      --config.data.store=runs/store --config.train.steps=1000

`train()` reads top to bottom: setup (store, resolved config, mesh, trainer, pipelines) → restore
or init (the latest checkpoint, or a sharded init) → loop (step-pure batches, the jitted step,
metrics kept on the device until a log or checkpoint step, evaluation, checkpoints, preemption)
→ final checkpoint. A workdir that has checkpoints resumes from the latest; batches are a pure
function of (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
"""
import argparse
import contextlib
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from scfm_jax.data.pipeline import Pipeline, device_fields, split_cells
from scfm_jax.data.store import CellStore
from scfm_jax.errors import EXIT_PREEMPTED, CheckpointError, ModelError
from scfm_jax.objectives import get_objective
from scfm_jax.train import config_checks, partitioning
from scfm_jax.train import workdir as workdir_lib
from scfm_jax.train.checkpointing import Checkpoints
from scfm_jax.train.metrics import MetricsWriter, device_peak_flops
from scfm_jax.train.trainer import Trainer


class TrainingDiverged(ModelError, FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_config(config: ml_collections.ConfigDict, store: CellStore) -> ml_collections.ConfigDict:
    """A copy of the config with the fields that depend on the store filled in and checked
    (scFoundation: the number of genes; scMulan: the token set and its tables)."""
    return get_objective(config.model.name).resolve_config(config, store)


def host_to_device(local_batch: dict, trainer: Trainer) -> dict:
    return partitioning.global_batch(device_fields(local_batch), trainer.mesh, trainer.rules)


def make_pipelines(config: ml_collections.ConfigDict, store: CellStore
                   ) -> tuple[Pipeline, Pipeline | None]:
    """The train pipeline and the held-out one (None without held-out cells), split by seed."""
    train_cells, eval_cells = split_cells(store.num_cells, config.data.eval_fraction, config.seed)
    options = pipeline_options(config)
    train_pipeline = Pipeline(store, seed=config.seed, cell_indices=train_cells, **options)
    eval_pipeline = (Pipeline(store, seed=config.seed + 1, cell_indices=eval_cells, **options)
                     if len(eval_cells) else None)
    return train_pipeline, eval_pipeline


def pipeline_options(config: ml_collections.ConfigDict) -> dict:
    data = config.data
    return dict(global_batch_size=data.global_batch_size, buckets=tuple(data.buckets),
                max_nonzero=data.max_nonzero, block_size=data.block_size,
                window_blocks=data.window_blocks, obs_keys=tuple(data.get("obs_keys", ())),
                prefetch=data.prefetch)


class _PreemptionFlag:
    """SIGTERM sets a flag (one process); the loop saves at the next step boundary and exits."""

    def __init__(self):
        self.event = threading.Event()
        self._previous = None

    def __enter__(self):
        # Several processes must stop at one step: JAX's preemption service catches their SIGTERM
        # and `Checkpoints.reached_preemption` agrees on the step. A Python handler would replace
        # the service's, and processes stopping at different steps hang in the checkpoint save.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class RateWindow:
    """Cells, genes and model FLOPs over the wall time of the steps since the last log.

    Time spent compiling a new bucket (and counting its FLOPs) is paused out of the window.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.start, self.paused_for = time.perf_counter(), 0.0
        self.steps = self.cells = self.genes = 0
        self.flops = 0.0

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_for += time.perf_counter() - start

    def add(self, cells: int, genes: int, flops: float):
        self.steps += 1
        self.cells += cells
        self.genes += genes
        self.flops += flops

    def rates(self, peak_flops: float) -> dict:
        elapsed = max(time.perf_counter() - self.start - self.paused_for, 1e-9)
        return dict(step_time=elapsed / max(self.steps, 1), cells_per_s=self.cells / elapsed,
                    genes_per_s=self.genes / elapsed, mfu=self.flops / elapsed / peak_flops)


class PendingMetrics:
    """Per-step metrics kept on the device until a log or checkpoint step fetches them, so the host
    never waits for the device between those steps."""

    def __init__(self):
        self.steps: list[int] = []
        self.metrics: list[dict] = []

    def add(self, step: int, metrics: dict):
        self.steps.append(step)
        self.metrics.append(metrics)

    def fetch(self) -> list[tuple[int, dict]]:
        """(step, host scalars) of every pending step, in order; the list is emptied."""
        fetched = jax.device_get(self.metrics)
        out = [(step, {name: float(value) for name, value in metrics.items()})
               for step, metrics in zip(self.steps, fetched)]
        self.steps, self.metrics = [], []
        return out


def evaluate(trainer: Trainer, state, pipeline: Pipeline, num_batches: int, seed: int) -> float:
    """Mean loss over fixed held-out batches with fixed keys (comparable across steps)."""
    losses = []
    for index in range(num_batches):
        batch = host_to_device(pipeline.batch(index), trainer)
        key_data = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), index))
        losses.append(trainer.eval_step(state, batch, key_data)["loss"])
    return float(np.mean(jax.device_get(losses)))


def restore_or_init(trainer: Trainer, checkpoints: Checkpoints, config, vocabulary: dict):
    """(state, start step): the latest checkpoint of the workdir, or a fresh sharded init."""
    start_step = checkpoints.latest_step()
    checkpoints.resuming = True
    if start_step is None:
        return trainer.init_state(config.seed), 0
    saved = checkpoints.restore_metadata(start_step)
    workdir_lib.check_resume(saved["config"], config.to_dict(), checkpoints.directory.parent)
    if saved["vocabulary"]["digest"] != vocabulary["digest"]:
        raise CheckpointError(
            f"{checkpoints.directory.parent} was trained on vocabulary "
            f"{saved['vocabulary']['name']} ({saved['vocabulary']['digest'][:12]}), but "
            f"{config.data.store} carries {vocabulary['name']} ({vocabulary['digest'][:12]}); "
            "use a fresh --workdir")
    return checkpoints.restore_state(trainer.abstract_sharded_state(), start_step), start_step


def _diverged(step: int, loss: float, checkpoints: Checkpoints) -> TrainingDiverged:
    return TrainingDiverged(
        f"loss is {loss} at step {step}; stopping. The last good checkpoint "
        f"(step {checkpoints.latest_step()}) is intact in {checkpoints.directory}; "
        f"lower config.train.learning_rate or check the data")


def make_trainer(config: ml_collections.ConfigDict, devices=None) -> Trainer:
    """The Trainer `train` builds for `config` (resolved against its store) over `devices`; hold
    it and pass it to several `train` calls of one experiment to reuse its compiled steps."""
    config = resolve_config(config, CellStore.open(config.data.store))
    return Trainer(config, get_objective(config.model.name),
                   partitioning.make_mesh(config.mesh, devices=devices))


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True,
          devices=None, stop_after: int | None = None, dry_run: bool = False,
          trainer: Trainer | None = None) -> dict:
    """Run (or resume) the experiment in `workdir`; returns a summary of the run.

    `devices` (default: all devices of all processes) is the set the mesh is built over.
    `stop_after` ends the run early at that step with a checkpoint, as a preemption would; the
    schedule still follows `config.train.steps`, so a later call resumes the same run.
    `dry_run` compiles the train step of every bucket, prints the plan table and returns.
    `trainer` (from `make_trainer`, same config) reuses its compiled steps instead of building
    one; its mesh replaces `devices`.
    """
    # -- setup
    workdir = Path(workdir)
    config_checks.check(config, workdir)
    store = CellStore.open(config.data.store)
    config_checks.check_store(config, store)
    config = resolve_config(config, store)
    lead = jax.process_index() == 0
    if trainer is None:
        trainer = Trainer(config, get_objective(config.model.name),
                          partitioning.make_mesh(config.mesh, devices=devices))
    elif trainer.config.to_json(sort_keys=True) != config.to_json(sort_keys=True):
        raise ValueError("train(trainer=...): the trainer was built for another config; build "
                         "it with make_trainer(config)")
    mesh = trainer.mesh
    train_config = config.train
    partitioning.check_batch_divisible(config.data.global_batch_size, mesh,
                                       train_config.grad_accum_steps, trainer.rules)
    if dry_run:
        from scfm_jax.train import plan
        rows = plan.print_trainer_plan(trainer, config.data.buckets, config.data.global_batch_size)
        return {"dry_run": True, "plan": rows}
    created_workdir = not workdir.exists()
    if lead:
        workdir_lib.acquire(workdir)
    vocabulary = {"name": store.vocabulary.name, "digest": store.vocabulary.digest,
                  "symbols": list(store.vocabulary.symbols)}
    train_pipeline, eval_pipeline = make_pipelines(config, store)
    peak_flops, peak_source = device_peak_flops(config.model.dtype)
    checkpoints = Checkpoints(workdir, directory=train_config.get("checkpoint_dir") or None,
                              keep=train_config.keep_checkpoints)
    if train_config.get("checkpoint_dir"):
        # config.json records where they are (absolute), for `load(workdir)` from anywhere
        train_config.checkpoint_dir = str(checkpoints.directory)

    # -- restore or init
    state, start_step = restore_or_init(trainer, checkpoints, config, vocabulary)
    if lead:  # only now: a rejected resume leaves the workdir's config and metrics as they were
        workdir_lib.write_config(workdir, config.to_dict())
        workdir_lib.truncate_metrics(workdir, start_step)
    writer = MetricsWriter(workdir, enabled=lead, purge_step=start_step)
    summary = {"start_step": start_step, "peak_flops_per_device": peak_flops,
               "peak_source": peak_source, "losses": {}}
    profile_steps = tuple(train_config.profile_steps or ())
    last_eval = math.nan
    step = start_step
    bar = tqdm(total=train_config.steps, initial=start_step, disable=not (progress and lead),
               desc="train", unit="step", dynamic_ncols=True)
    window, pending = RateWindow(), PendingMetrics()
    failed = False

    def flush() -> dict:
        """Fetch the pending metrics; stop at the first non-finite loss. The last step's scalars."""
        scalars = {}
        for done, scalars in pending.fetch():
            if not math.isfinite(scalars["loss"]):
                raise _diverged(done - 1, scalars["loss"], checkpoints)
            summary["losses"][done] = scalars["loss"]
        return scalars

    # -- loop
    try:
        with _PreemptionFlag() as preempted, train_pipeline.iterate(start_step) as batches:
            while step < train_config.steps:
                if profile_steps and step == profile_steps[0]:
                    jax.profiler.start_trace(str(workdir / "profile"))
                batch_step, local = next(batches)
                assert batch_step == step, (batch_step, step)
                batch = host_to_device(local, trainer)
                if not trainer.has_train_step(batch):  # a new bucket: compile outside the rates
                    with window.paused():
                        jax.block_until_ready(state)
                        trainer.compile_train_step(state, batch)
                        trainer.model_flops(batch)
                state, metrics = trainer.train_step(state, batch)
                step += 1
                pending.add(step, metrics)
                window.add(config.data.global_batch_size,
                           int(np.sum(local["num_nonzero"])) * jax.process_count(),
                           trainer.model_flops(batch))
                bar.update(1)
                if profile_steps and step == profile_steps[-1]:
                    jax.profiler.stop_trace()

                stop = (preempted.event.is_set() or checkpoints.reached_preemption(step)
                        or step == stop_after)
                log_now = step % train_config.log_every == 0 or step == train_config.steps
                evaluate_now = eval_pipeline is not None and (
                    step % train_config.eval_every == 0 or step == train_config.steps)
                save_now = (step % train_config.checkpoint_every == 0
                            or step == train_config.steps or stop)
                if log_now or save_now or evaluate_now:
                    scalars = flush()  # a checkpoint never holds the state of a diverged run
                    if log_now:
                        scalars.update(window.rates(peak_flops))
                        writer.write(step, scalars)
                        bar.set_postfix(loss=f"{scalars['loss']:.4f}",
                                        lr=f"{scalars['learning_rate']:.2e}",
                                        cells_s=f"{scalars['cells_per_s']:.0f}",
                                        mfu=f"{scalars['mfu']:.1%}")
                        window.reset()
                if evaluate_now:
                    with window.paused():
                        last_eval = evaluate(trainer, state, eval_pipeline,
                                             config.data.eval_batches, config.seed)
                    writer.write(step, {"loss": last_eval}, prefix="eval")
                    summary["eval_loss"] = last_eval
                if save_now:
                    checkpoints.save(step, state, config=config, seed=config.seed,
                                     vocabulary=vocabulary,
                                     eval_loss=last_eval if evaluate_now else None)
                if stop:
                    summary["stopped_early"] = True
                    summary["preempted"] = step != stop_after
                    break
    except BaseException:
        failed = True
        raise
    finally:
        bar.close()
        try:
            checkpoints.close()   # waits for the last save, whose failure is reported here
        except BaseException:
            failed = True
            raise
        finally:
            writer.close()
            workdir_lib.release(workdir)
            if failed and lead and created_workdir and checkpoints.latest_step() is None:
                # nothing of this run is worth keeping: the next attempt starts from a clean slate
                shutil.rmtree(workdir, ignore_errors=True)

    # the final checkpoint is the loop's save at the last step (or at the stop), finished by close()
    summary.update(final_step=step, eval_loss=summary.get("eval_loss", last_eval))
    return summary


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="scfm-jax train", description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 finished, 1 error, 2 usage error, 75 preempted (SIGTERM; rerun the "
               "same command to resume). " + config_checks.OVERRIDES_HELP)
    parser.add_argument("--workdir", required=True,
                        help="run folder: checkpoints, metrics, TensorBoard")
    parser.add_argument("--coordinator-address", help="host:port of process 0 (multi-process)")
    parser.add_argument("--num-processes", type=int, help="number of processes")
    parser.add_argument("--process-id", type=int, help="this process's index")
    parser.add_argument("--auto-distributed", action="store_true",
                        help="call jax.distributed.initialize() with no arguments (TPU pods, SLURM)")
    parser.add_argument("--num-cpu-devices", type=int, help="simulated CPU devices in this process")
    parser.add_argument("--dry-run", action="store_true",
                        help="compile the train step for the devices at hand, print the plan "
                             "(per-device memory, FLOPs, roofline; see `scfm-jax plan`), exit")
    return config_checks.parse_command(parser, argv)


def main(argv) -> int:
    args = _parse(argv)
    partitioning.join_processes(args)
    summary = train(args.config, args.workdir, dry_run=args.dry_run)
    if summary.get("dry_run"):
        return 0
    if summary.get("preempted"):
        if jax.process_index() == 0:
            print(f"preempted at step {summary['final_step']}; rerun to resume (its checkpoint "
                  "is saved)", file=sys.stderr)
        return EXIT_PREEMPTED
    if jax.process_index() == 0:
        print(f"finished at step {summary['final_step']}; held-out loss {summary['eval_loss']:.5f}")
    return 0
