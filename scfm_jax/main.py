"""The `scfm-jax` command: one entry point, one subcommand per job of the flow.

Each subcommand lives in the module that does the work and exposes `main(argv)`; this file only
dispatches, so `scfm-jax --help` stays cheap (nothing heavy is imported until a command runs), and
is the one place where errors become one line (see `errors.py` for which, and the exit codes).
"""
import contextlib
import glob
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import traceback
import warnings

from scfm_jax import __version__
from scfm_jax.errors import (EXIT_BUG, EXIT_INTERRUPTED, EXIT_USAGE, exit_code, is_user_error,
                             one_line)

COMMANDS = {
    "convert": ("scfm_jax.data.convert", "AnnData / 10x / TileDB-SOMA -> sharded zarr cell store"),
    "verify": ("scfm_jax.data.verify", "check every byte of a cell store, name damaged shards"),
    "train": ("scfm_jax.train.loop", "pretrain a model from an experiment config"),
    "demo": ("scfm_jax.demo", "convert pbmc68k_reduced, pretrain the tiny demo model, report"),
    "embed": ("scfm_jax.analysis.embed_cli", "scFoundation cell / gene embeddings (get_embedding.py)"),
    "annotate": ("scfm_jax.analysis.annotate_cli", "scMulan cell-type annotation and embedding"),
    "perturb": ("scfm_jax.tasks.perturb_cli", "perturbation response: GEARS-style head vs baselines"),
    "plan": ("scfm_jax.train.plan", "compile a config for a TPU slice (no TPU needed): memory, FLOPs"),
    "genes": ("scfm_jax.tasks.genes", "gene embeddings, modules, TF networks vs a reference"),
    "evaluate": ("scfm_jax.tasks.integration", "batch integration (scib-metrics) vs PCA, Harmony"),
}


def _usage() -> str:
    lines = ["usage: scfm-jax COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "scfm-jax COMMAND --help shows the options of a command; scfm-jax --version the "
              "version."]
    return "\n".join(lines)


@contextlib.contextmanager
def _reported_as(name: str):
    """While a command runs: library bookkeeping logged through absl and asyncio (Orbax's notes,
    and the per-thread and per-task tracebacks of a failed save that the command reports in its
    own line) is not shown, and a Python warning is one `scfm-jax NAME: warning: ...` line, not a
    source line. SCFM_TRACEBACK=1 shows both as they are."""
    if os.environ.get("SCFM_TRACEBACK"):
        yield
        return
    absl_logger, asyncio_logger = logging.getLogger("absl"), logging.getLogger("asyncio")
    level, asyncio_level, show = absl_logger.level, asyncio_logger.level, warnings.showwarning

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"scfm-jax {name}: warning: {' '.join(str(message).split())}",
              file=file or sys.stderr)

    absl_logger.setLevel(logging.CRITICAL)
    asyncio_logger.setLevel(logging.CRITICAL)
    warnings.showwarning = one_line_warning
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        absl_logger.setLevel(level)
        warnings.showwarning = show
        # A failed command's unfinished writes (each array of an Orbax save on a full disk) log
        # "Task exception was never retrieved" with a traceback when collected at exit, after the
        # command's one line has said what failed: asyncio stays quiet then.
        if not failed:
            asyncio_logger.setLevel(asyncio_level)


def _tpu_attached() -> bool:
    """Whether a TPU chip is attached, by what JAX itself looks for: a device node, or a PCI
    device of Google's vendor id."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with contextlib.suppress(OSError), open(vendor) as f:
            if f.read().strip() == "0x1ae0":
                return True
    return False


def _skip_an_absent_tpu() -> None:
    """libtpu (the `[tpu]` extra, installed for `plan`'s deviceless compiles) starts with JAX on
    any machine and, where no TPU chip is attached, prints five lines of C++ start-up errors before
    falling back to the CPU. Where nobody chose the platforms (`JAX_PLATFORMS` unset), no chip is
    attached and no GPU plugin is installed, JAX is told to use the CPU, which it would use anyway."""
    if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules:
        return
    if importlib.util.find_spec("libtpu") is None or _tpu_attached():
        return
    if any((dist.metadata["Name"] or "").lower().startswith(("jax-cuda", "jax-rocm"))
           for dist in importlib.metadata.distributions()):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(_usage(), file=sys.stderr)
        return EXIT_USAGE
    if argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"scfm-jax {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"scfm-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    _skip_an_absent_tpu()
    try:
        with _reported_as(name):
            module = importlib.import_module(COMMANDS[name][0])
            return module.main(rest) or 0
    except KeyboardInterrupt:
        print(f"scfm-jax {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 -- the one place that reports every failure
        if not is_user_error(error):
            traceback.print_exc()
            print(f"scfm-jax {name}: internal error ({type(error).__name__}: {one_line(error)}). "
                  "This is a bug in scfm-jax: please report it with the command line and the "
                  "traceback above", file=sys.stderr)
            return EXIT_BUG
        if os.environ.get("SCFM_TRACEBACK"):
            traceback.print_exc()
        print(f"scfm-jax {name}: error: {one_line(error)}", file=sys.stderr)
        return exit_code(error)


if __name__ == "__main__":
    sys.exit(main())
