"""The command-line options that `scfm-jax embed` and `scfm-jax annotate` share for a cell store:
what to read (`--store`, `--cells`, `--obs-filter`), the resumable output, and joining the other
processes of a multi-host run (the flags `launch/local_processes.sh`, SLURM and TPU pods pass)."""
from __future__ import annotations

import argparse
import sys

from scfm_jax.errors import UsageError
from scfm_jax.output_safety import OVERWRITE_HELP


def _int_at_least(minimum: int, expected: str):
    """An argparse type: an integer of at least `minimum`, else a usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


# A count flag (--batch-size, --chunk-cells): 0 or less is a usage error.
positive_int = _int_at_least(1, "a positive integer")
# A checkpoint step (--step): below 0 is a usage error.
non_negative_int = _int_at_least(0, "a step (0 or more)")


def fraction(text: str) -> float:
    """argparse type of --min-coverage: a fraction in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("a whole cell store, on every device of every process")
    group.add_argument("--store", default=None,
                       help="cell store (folder, gs:// or s3:// URL) to run instead of --input; "
                            "--output is then a resumable zarr output (rerun to resume)")
    group.add_argument("--cells", default=None, metavar="START:STOP",
                       help="only the store's cells START..STOP-1")
    group.add_argument("--obs-filter", default=None, metavar="COLUMN=VALUE",
                       help="only the store's cells whose obs COLUMN is VALUE")
    group.add_argument("--chunk-cells", type=positive_int, default=4096,
                       help="cells per output chunk: the unit of writing and of resuming")
    group.add_argument("--overwrite", action="store_true",
                       help=OVERWRITE_HELP + "; with --store, an output of another checkpoint, "
                       "store or options")
    group.add_argument("--coordinator-address", "--coordinator_address", default=None,
                       help="host:port of process 0 of a multi-process run")
    group.add_argument("--num-processes", "--num_processes", type=int, default=None)
    group.add_argument("--process-id", "--process_id", type=int, default=None)
    group.add_argument("--auto-distributed", "--auto_distributed", action="store_true",
                       help="jax.distributed.initialize() with no arguments (TPU pods, SLURM)")
    group.add_argument("--num-cpu-devices", "--num_cpu_devices", type=int, default=None,
                       help="simulated CPU devices in this process")


def check_source(args) -> None:
    if (args.input is None) == (args.store is None):
        raise UsageError("give exactly one of --input (a file) and --store (a cell store)")
    if args.store is None and (args.cells or args.obs_filter):
        raise UsageError("--cells and --obs-filter apply to --store runs")
    if args.store is not None:   # a wrong --cells is said before a model loads
        from scfm_jax.analysis.store_inference import Selection
        args.selection = Selection.parse(args.cells, args.obs_filter)


def check_output(args, command: str) -> None:
    """Refuse the --output before anything loads (`output_safety`; with --store, what
    `store_inference` checks again before it writes)."""
    if args.store:
        from scfm_jax.analysis import store_inference
        store_inference.check_output(args.output, command, args.store)
    else:
        from scfm_jax import output_safety
        output_safety.check_output(args.output, command=command, inputs=[args.input],
                                   overwrite=args.overwrite)


def join_processes(args) -> None:
    """Set the CPU device count and join a multi-process run, before JAX touches a device."""
    from scfm_jax.train.partitioning import join_processes as join

    join(args)


def report(output, summary: dict) -> None:
    import jax

    if jax.process_index() == 0:
        rate = summary["computed"] / max(summary["seconds"], 1e-9)
        print(f"wrote {output}: {summary['cells']} cells in {summary['chunks']} chunks "
              f"({summary['skipped_chunks']} already done); {summary['computed']} computed on mesh "
              f"{summary['mesh']} at {rate:.1f} cells/s", file=sys.stderr)
