"""The errors `scfm-jax` reports in one line, and how (`main.py` is the one handler).

A user mistake or damaged input ends in `scfm-jax COMMAND: error: <what is wrong and what to do>`,
no traceback: exit status 2 for usage errors (command line, config), 1 for everything else (inputs,
stores, checkpoints, a busy workdir). `SCFM_TRACEBACK=1` shows the traceback too, for bug reports.
"""


class UsageError(ValueError):
    """The command line or the config is wrong (exit status 2)."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (KeyError's quotes dropped)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    text = " ".join(str(text).split())
    return text or type(error).__name__
