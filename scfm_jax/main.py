"""The `scfm-jax` command: one entry point, one subcommand per job of the flow.

Each subcommand lives in the module that does the work and exposes `main(argv)`; this file only
dispatches, so `scfm-jax --help` stays cheap (nothing heavy is imported until a command runs), and
is the one place where errors become one line (see `errors.py`).
"""
import importlib
import os
import sys

from scfm_jax.errors import UsageError, one_line

# What a user's input, file or config can raise; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, LookupError, OSError, ImportError, RuntimeError)

COMMANDS = {
    "convert": ("scfm_jax.data.convert", "AnnData / 10x / TileDB-SOMA -> sharded zarr cell store"),
    "verify": ("scfm_jax.data.verify", "check every byte of a cell store, name damaged shards"),
    "train": ("scfm_jax.train.loop", "pretrain a model from an experiment config"),
    "demo": ("scfm_jax.demo", "convert pbmc68k_reduced, pretrain the tiny demo model, report"),
    "embed": ("scfm_jax.analysis.embed_cli", "scFoundation cell / gene embeddings (get_embedding.py)"),
    "annotate": ("scfm_jax.analysis.annotate_cli", "scMulan cell-type annotation and embedding"),
    "plan": ("scfm_jax.train.plan", "compile a config for a TPU slice (no TPU needed): memory, FLOPs"),
}


def _usage() -> str:
    lines = ["usage: scfm-jax COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "scfm-jax COMMAND --help shows the options of a command."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"scfm-jax: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return module.main(rest) or 0
    except KeyboardInterrupt:
        print(f"scfm-jax {name}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if os.environ.get("SCFM_TRACEBACK"):
            raise
        print(f"scfm-jax {name}: error: {one_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
