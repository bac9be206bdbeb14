"""Faults a user can cause, as the exception types every script turns into one line.

Each error a user can fix (a flag, a config field, a file, the state of a workdir) derives from `UserError` and
carries a one-line message naming the flag, field or file and what was expected. Scripts catch them in one place
(`one_line_errors`) and print `FATAL: <message>` on stderr with the exit status of the class: 2 for bad
input (flags, config, data and weight files), 1 for `RunFailure` (the run could not go on: no intact checkpoint,
a full disk, too many non-finite steps, a workdir in use). Any other exception is a bug and keeps its traceback.

Module-specific errors (ConfigError, ConversionError, ...) derive from these and from the builtin type they have
always been (ValueError, RuntimeError), so existing `except ValueError` code keeps working. A leaf: imports
nothing of its siblings (the preprocessing scripts use it without loading JAX or ml_collections).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import sys

# Paths the user named that do not fit: bad input (exit 2). Other OSErrors (a full disk, an I/O error) are the
# machine's: exit 1.
_BAD_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


# A run stopped by a signal before train.steps, its checkpoint saved: run the same command again to resume
# (sysexits' EX_TEMPFAIL, "try again later"; scripts/slurm/train.sbatch requeues the job on it).
EXIT_RESUMABLE = 75


class UserError(Exception):
    """Bad input the user can correct; scripts exit 2 with the message."""

    exit_status = 2


class InputError(UserError, ValueError):
    """Bad input of a module that has no error type of its own."""


class RunFailure(UserError, RuntimeError):
    """The run cannot continue (its state or the machine, not a flag); scripts exit 1. Nothing is lost: the
    message says what is intact and how to go on."""

    exit_status = 1


def fatal(message: str, status: int = 2):
    """Print `FATAL: message` as one line on stderr and exit with `status`."""
    line = "; ".join(part.strip() for part in str(message).strip().splitlines() if part.strip())
    print(f"FATAL: {line}", file=sys.stderr, flush=True)
    sys.exit(status)


def os_error_line(e: OSError) -> str:
    """`path: reason` for an OSError, with what to do about a full disk."""
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    text = f"{where}{e.strerror or e}"
    if e.errno == errno.ENOSPC:
        text += " (the disk is full: free space, then run the same command again; files written before are intact)"
    return text


@contextlib.contextmanager
def one_line_errors():
    """Turn the faults a user can cause into one `FATAL:` line and the documented exit status (2 bad input, 1 the
    run could not go on); anything else is a bug and keeps its traceback."""
    try:
        yield
    except UserError as e:
        fatal(str(e), e.exit_status)
    except OSError as e:
        fatal(os_error_line(e), 2 if isinstance(e, _BAD_PATH_ERRORS) else 1)


def guarded(main):
    """A script's `main` run inside `one_line_errors` (decorate it; its flags are parsed by a `cli.Parser`, whose
    bad flag is the same one line)."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        with one_line_errors():
            return main(*args, **kwargs)

    return run


def filter_hook(owner, name: str, drop) -> None:
    """Wrap the hook `owner.<name>` (sys.unraisablehook, threading.excepthook) so that what `drop(arg)` claims (and
    may report itself, in one line) is not printed as a traceback from a background thread; everything else goes
    to the hook as before. Installed once per `drop`, however often it is called."""
    current = getattr(owner, name)
    if drop in getattr(current, "neox_drops", ()):
        return

    def hook(arg):
        if not drop(arg):
            current(arg)

    hook.neox_drops = (*getattr(current, "neox_drops", ()), drop)
    setattr(owner, name, hook)
