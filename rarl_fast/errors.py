"""The failures a user can act on, and how the command line reports them.

Every failure the user caused or can fix ends a command with one line ``rarl-fast: error: ...`` on stderr (the
traceback only with ``--debug``): exit status 2 for the command line, the config, the data and paths
(:class:`UsageError`), 1 for a run that failed while running (:class:`RunError`), 130 for an interrupt
(:class:`RunInterrupted` says where the run can resume). :func:`describe` maps an exception to that status
and line; it is the only place that decides how an error is shown.
"""

from __future__ import annotations

import errno

__all__ = ["RunError", "RunInterrupted", "UsageError", "describe", "one_line"]

MAX_MESSAGE = 600
"""Characters of an error line; longer messages are cut (a config value can be huge)."""


class UsageError(Exception):
    """The command line, the config, the data or a path cannot be used as given (exit status 2)."""

    exit_code = 2


class RunError(RuntimeError):
    """A run failed while running for a reason the user can act on (exit status 1)."""

    exit_code = 1


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run; the message says where it can resume (exit status 130)."""

    exit_code = 130


# errno values that mean "this path, as the user gave it, cannot be used": a usage error, not a failed run
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST}


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line (newlines joined with ' | '), cut to ``limit`` characters."""
    flat = " | ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return flat if len(flat) <= limit else flat[: limit - 5] + " ..."


def describe(err: BaseException) -> tuple[int, str] | None:
    """(exit status, one-line message) for an error the user can act on; None for an unexpected one (a bug)."""
    if isinstance(err, KeyboardInterrupt):
        return 130, one_line(str(err)) if isinstance(err, RunInterrupted) else "interrupted"
    if isinstance(err, UsageError | RunError):
        return err.exit_code, one_line(str(err))
    if isinstance(err, OSError):  # a path that cannot be read or written, a full disk
        text = err.strerror or str(err)
        if err.filename is not None:
            text = f"{text}: {err.filename}"
        return (2 if err.errno in _PATH_ERRNOS else 1), one_line(text)
    if isinstance(err, MemoryError):
        return 1, "out of memory"
    return None
