"""`scfm-jax train`: the one train loop, for any model, on one CPU, a GPU host or a TPU pod.

  scfm-jax train --config configs/scfoundation_tiny.py --workdir runs/tiny \
      --config.data.store=runs/store --config.train.steps=1000

Setup (store, mesh, sharded state or the latest checkpoint) → loop (step-pure batches, jitted
step, metrics, evaluation, checkpoints, preemption) → final checkpoint. A workdir that has
checkpoints resumes from the latest; batches are a pure function of (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would.
"""
import math
import signal
import threading
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from scfm_jax.data.pipeline import Pipeline, split_cells
from scfm_jax.data.store import CellStore
from scfm_jax.train import config_checks, partitioning
from scfm_jax.train import workdir as workdir_lib
from scfm_jax.train.checkpointing import Checkpoints
from scfm_jax.train.metrics import MetricsWriter, device_peak_flops
from scfm_jax.train.state import Trainer, cached_trainer
from scfm_jax.train.tasks import get_task

HOST_ONLY_FIELDS = ("cell_index",)  # pipeline fields that stay on the host (int64 bookkeeping)


class TrainingDiverged(FloatingPointError):
    pass


def resolve_config(config: ml_collections.ConfigDict, store: CellStore) -> ml_collections.ConfigDict:
    """A copy of the config with the fields that depend on the store filled in and checked
    (scFoundation: the number of genes; scMulan: the token set and its tables)."""
    return get_task(config.model.name).resolve_config(config, store)


def _host_to_device(local_batch: dict, mesh) -> dict:
    device_fields = {k: v for k, v in local_batch.items() if k not in HOST_ONLY_FIELDS}
    return partitioning.global_batch(device_fields, mesh)


class _PreemptionFlag:
    """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self):
        self.event = threading.Event()
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def evaluate(trainer: Trainer, state, pipeline: Pipeline, num_batches: int, seed: int) -> float:
    """Mean loss over fixed held-out batches with fixed keys (comparable across steps)."""
    losses = []
    for index in range(num_batches):
        batch = _host_to_device(pipeline.batch(index), trainer.mesh)
        key_data = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), index))
        metrics = trainer.compiled_eval_step(state, batch, key_data)(state, batch, key_data)
        losses.append(float(metrics["loss"]))
    return float(np.mean(losses))


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True,
          devices=None, stop_after: int | None = None) -> dict:
    """Run (or resume) the experiment in `workdir`; returns a summary of the run.

    `devices` (default: all devices of all processes) is the set the mesh is built over.
    `stop_after` ends the run early at that step with a checkpoint, as a preemption would; the
    schedule still follows `config.train.steps`, so a later call resumes the same run.
    """
    workdir = Path(workdir)
    config_checks.check(config, workdir)
    store = CellStore.open(config.data.store)
    config = resolve_config(config, store)
    lead = jax.process_index() == 0
    if lead:
        workdir_lib.acquire(workdir)

    task = get_task(config.model.name)
    mesh = partitioning.make_mesh(config.mesh, devices=devices)
    train_config = config.train
    partitioning.check_batch_divisible(config.data.global_batch_size, mesh,
                                       train_config.grad_accum_steps)
    trainer = cached_trainer(config, task, mesh)
    vocabulary = {"name": store.vocabulary.name, "digest": store.vocabulary.digest,
                  "symbols": list(store.vocabulary.symbols)}

    checkpoints = Checkpoints(workdir, keep=train_config.keep_checkpoints)
    start_step = checkpoints.latest_step()
    if start_step is None:
        state = trainer.init_state(config.seed)
        start_step = 0
    else:
        saved = checkpoints.restore_metadata(start_step)
        workdir_lib.check_resume(saved["config"], config.to_dict(), workdir)
        if saved["vocabulary"]["digest"] != vocabulary["digest"]:
            raise ValueError(
                f"{workdir} was trained on vocabulary {saved['vocabulary']['name']} "
                f"({saved['vocabulary']['digest'][:12]}), but {config.data.store} carries "
                f"{vocabulary['name']} ({vocabulary['digest'][:12]}); use a fresh --workdir")
        state = checkpoints.restore_state(trainer.abstract_sharded_state(), start_step)
    if lead:
        workdir_lib.write_config(workdir, config.to_dict())
        workdir_lib.truncate_metrics(workdir, start_step)

    obs_keys = tuple(config.data.get("obs_keys", ()))
    train_cells, eval_cells = split_cells(store.num_cells, config.data.eval_fraction, config.seed)
    pipeline_options = dict(
        global_batch_size=config.data.global_batch_size, buckets=tuple(config.data.buckets),
        max_nonzero=config.data.max_nonzero, block_size=config.data.block_size,
        window_blocks=config.data.window_blocks, obs_keys=obs_keys,
        prefetch=config.data.prefetch)
    train_pipeline = Pipeline(store, seed=config.seed, cell_indices=train_cells, **pipeline_options)
    eval_pipeline = (Pipeline(store, seed=config.seed + 1, cell_indices=eval_cells,
                              **pipeline_options) if len(eval_cells) else None)

    peak_flops, peak_source = device_peak_flops(config.model.dtype)
    writer = MetricsWriter(workdir, enabled=lead, purge_step=start_step)
    profile_steps = tuple(train_config.profile_steps or ())
    summary = {"start_step": start_step, "peak_flops_per_device": peak_flops,
               "peak_source": peak_source, "losses": {}}
    last_eval = math.nan
    step = start_step
    bar = tqdm(total=train_config.steps, initial=start_step, disable=not (progress and lead),
               desc="train", unit="step", dynamic_ncols=True)
    try:
        with _PreemptionFlag() as preempted, train_pipeline.iterate(start_step) as batches:
            window_start, window_cells, window_genes, window_steps = time.perf_counter(), 0, 0, 0
            flops = 0.0
            while step < train_config.steps:
                if profile_steps and step == profile_steps[0]:
                    jax.profiler.start_trace(str(workdir / "profile"))
                batch_step, local = next(batches)
                assert batch_step == step, (batch_step, step)
                batch = _host_to_device(local, mesh)
                compiled = trainer.compiled_train_step(state, batch)
                if not window_steps:  # compilation (once per bucket) stays out of the rates
                    window_start = time.perf_counter()
                flops = trainer.model_flops(batch)
                state, metrics = compiled(state, batch)
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss} at step {step}; stopping. The last good checkpoint "
                        f"(step {checkpoints.latest_step()}) is intact in {checkpoints.directory}; "
                        f"lower config.train.learning_rate or check the data")
                step += 1
                summary["losses"][step] = loss
                window_steps += 1
                window_cells += config.data.global_batch_size
                window_genes += int(np.sum(local["num_nonzero"])) * jax.process_count()
                bar.update(1)
                if profile_steps and step == profile_steps[-1]:
                    jax.profiler.stop_trace()

                if step % train_config.log_every == 0 or step == train_config.steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    step_time = elapsed / window_steps
                    scalars = {name: float(value) for name, value in metrics.items()}
                    scalars.update(step_time=step_time, cells_per_s=window_cells / elapsed,
                                   genes_per_s=window_genes / elapsed,
                                   mfu=flops / step_time / peak_flops)
                    writer.write(step, scalars)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scalars['learning_rate']:.2e}",
                                    cells_s=f"{scalars['cells_per_s']:.0f}",
                                    mfu=f"{scalars['mfu']:.1%}")
                    window_start, window_cells, window_genes, window_steps = (
                        time.perf_counter(), 0, 0, 0)

                evaluate_now = eval_pipeline is not None and (
                    step % train_config.eval_every == 0 or step == train_config.steps)
                if evaluate_now:
                    last_eval = evaluate(trainer, state, eval_pipeline, config.data.eval_batches,
                                         config.seed)
                    writer.write(step, {"loss": last_eval}, prefix="eval")
                    summary["eval_loss"] = last_eval
                stop = (preempted.event.is_set() or checkpoints.reached_preemption(step)
                        or step == stop_after)
                if step % train_config.checkpoint_every == 0 or step == train_config.steps or stop:
                    checkpoints.save(step, state, config=config, seed=config.seed,
                                     vocabulary=vocabulary,
                                     eval_loss=last_eval if evaluate_now else None)
                if stop:
                    summary["stopped_early"] = True
                    break
    finally:
        bar.close()
        checkpoints.close()
        writer.close()
        workdir_lib.release(workdir)
    summary.update(final_step=step, eval_loss=summary.get("eval_loss", last_eval))
    return summary


def _parse(argv):
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, TensorBoard",
                        flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 for multi-process runs", flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "number of processes", flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "this process's index", flag_values=flag_values)
    flags.DEFINE_bool("auto_distributed", False,
                      "call jax.distributed.initialize() with no arguments (TPU pods, SLURM)",
                      flag_values=flag_values)
    flags.DEFINE_integer("num_cpu_devices", None, "simulated CPU devices in this process",
                         flag_values=flag_values)
    # ml_collections finds the --config.a.b=... overrides in the argv it is given (default sys.argv,
    # which is not ours when `main` is called from Python).
    config_flags.DEFINE_config_file("config", None, "experiment config file (path[:arg])",
                                    flag_values=flag_values, lock_config=True,
                                    sys_argv=["scfm-jax train", *argv])
    config_checks.parse_flags(flag_values, argv, __doc__)
    if flag_values.config is None or flag_values.workdir is None:
        raise SystemExit("scfm-jax train: --config and --workdir are required\n"
                         "  e.g. scfm-jax train --config configs/scfoundation_tiny.py "
                         "--workdir runs/tiny --config.data.store=runs/store")
    return flag_values


def main(argv) -> int:
    flag_values = _parse(argv)
    if flag_values.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", flag_values.num_cpu_devices)
    if flag_values.coordinator_address:
        jax.distributed.initialize(flag_values.coordinator_address, flag_values.num_processes,
                                   flag_values.process_id)
    elif flag_values.auto_distributed:
        jax.distributed.initialize()
    summary = train(flag_values.config, flag_values.workdir)
    if jax.process_index() == 0:
        print(f"finished at step {summary['final_step']}; held-out loss {summary['eval_loss']:.5f}")
    return 0
