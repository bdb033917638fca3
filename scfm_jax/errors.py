"""The errors `scfm-jax` reports in one line, its exit codes, and how (`main.py` is the one handler).

A user mistake or damaged input raises one of the project's errors below (all `ScfmError`); the
command ends in `scfm-jax COMMAND: error: <what is wrong and what to do>`, no traceback. The I/O
errors in `NAMED_OS_ERRORS` (a missing file, no permission, a full disk) are reported the same way.
Anything else is a bug: it keeps its traceback and asks for a bug report. `SCFM_TRACEBACK=1` shows
the traceback of a one-line error too.

Each error keeps the built-in class it used to be (ValueError, RuntimeError, ...) as a second base,
so code that catches those still does.
"""
import errno

# Exit codes of every command (docs/reliability.md lists them).
EXIT_OK = 0
EXIT_ERROR = 1          # bad or damaged input, store, checkpoint; a busy workdir; a full disk
EXIT_USAGE = 2          # a wrong command line or config
EXIT_BUG = 70           # EX_SOFTWARE: an unexpected error; the traceback is printed
EXIT_PREEMPTED = 75     # EX_TEMPFAIL: stopped by SIGTERM with a checkpoint; rerun to resume
EXIT_INTERRUPTED = 130  # Ctrl-C


class ScfmError(Exception):
    """A failure the user can fix; its message says what is wrong and what to do."""
    exit_code = EXIT_ERROR


class UsageError(ScfmError, ValueError):
    """The command line or the config is wrong (exit status 2)."""
    exit_code = EXIT_USAGE


class InputError(ScfmError, ValueError):
    """An input file or folder cannot be used as given (missing, damaged, unsupported values)."""


class OutputError(ScfmError, ValueError):
    """The output cannot be written where asked without losing something of the user's."""


class StoreError(ScfmError, ValueError):
    """A path or URL is not a usable cell store (not one, a damaged manifest, another format)."""


class CheckpointError(ScfmError, ValueError):
    """A checkpoint cannot be read as asked (missing, damaged, of another model)."""


class WorkdirError(ScfmError, RuntimeError):
    """A training workdir cannot be used (held by another run, holds another run)."""


class ModelError(ScfmError, ValueError):
    """A model produced unusable values (a diverged run, NaN outputs)."""


# The same errors for the places that raised a built-in lookup error before (callers catch those).
class MissingInput(InputError, FileNotFoundError):
    """A file or folder named as an input does not exist (or cannot be fetched)."""


class UnknownName(InputError, KeyError):
    """A named gene, column, layer, token or key is not in the input."""


class MissingCheckpoint(CheckpointError, FileNotFoundError):
    """No checkpoint where one was named."""


class UnknownCheckpointKey(CheckpointError, KeyError):
    """A checkpoint lacks the named weight set or item."""


class MissingDependency(ScfmError, ModuleNotFoundError):
    """An optional package this use needs is not installed; the message says what to install."""


# OSErrors that are about the user's files or machine, reported in one line.
NAMED_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                   NotADirectoryError)
NAMED_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "the file system is read-only", errno.EFBIG: "file too large (beyond the file size limit, ulimit -f)",
                errno.EACCES: "permission denied"}


# TensorStore reports a storage failure (a missing bucket, denied credentials, an unreachable
# server) as a ValueError whose message starts with the status code: about the user's storage.
STORAGE_STATUSES = ("NOT_FOUND:", "PERMISSION_DENIED:", "UNAUTHENTICATED:", "UNAVAILABLE:",
                    "DEADLINE_EXCEEDED:", "RESOURCE_EXHAUSTED:")


def is_user_error(error: BaseException) -> bool:
    """Whether `main.py` reports `error` in one line (else it is a bug and keeps its traceback)."""
    if isinstance(error, ScfmError) or isinstance(error, NAMED_OS_ERRORS):
        return True
    if type(error) is ValueError and str(error).startswith(STORAGE_STATUSES):
        return True
    return isinstance(error, OSError) and error.errno in NAMED_ERRNOS


def exit_code(error: BaseException) -> int:
    return getattr(error, "exit_code", EXIT_ERROR)


def one_line(error: BaseException) -> str:
    """The error's message on one line (KeyError's quotes dropped; an OSError's cause named)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    if isinstance(error, OSError) and not isinstance(error, ScfmError) and error.errno:
        reason = NAMED_ERRNOS.get(error.errno, error.strerror or "")
        text = f"{error.filename}: {reason}" if error.filename else reason or text
        if error.errno == errno.ENOSPC:
            text += "; free some space (or write elsewhere) and run the command again"
    text = " ".join(str(text).split())
    return text or type(error).__name__
