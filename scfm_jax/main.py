"""The `scfm-jax` command: one entry point, one subcommand per job of the flow.

Each subcommand lives in the module that does the work and exposes `main(argv)`; this file only
dispatches, so `scfm-jax --help` stays cheap (nothing heavy is imported until a command runs).
"""
import importlib
import sys

COMMANDS = {
    "convert": ("scfm_jax.data.convert", "AnnData / 10x files -> sharded zarr cell store"),
    "verify": ("scfm_jax.data.verify", "check every byte of a cell store, name damaged shards"),
    "train": ("scfm_jax.train.loop", "pretrain a model from an experiment config"),
    "demo": ("scfm_jax.train.demo", "convert pbmc68k_reduced, pretrain scfoundation_tiny, report"),
    "embed": ("scfm_jax.analysis.embed_cli", "scFoundation cell / gene embeddings (get_embedding.py)"),
    "annotate": ("scfm_jax.analysis.annotate_cli", "scMulan cell-type annotation and embedding"),
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
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
