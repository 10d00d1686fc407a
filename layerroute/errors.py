"""Errors the user can fix, and the one wrapper every command-line entry point uses to report them.

A :class:`UserError` is about what the user passed (a missing file, a malformed log, a model or adapter that does not
fit, an occupied output directory), so a command prints its message as ``prog: error: ...`` and exits with status 2;
a traceback would only point into LayerRoute's own code. A full disk or a read-only file system is reported the same
way. Anything else is a bug and keeps its traceback. ``--debug`` (anywhere on a command line) shows the traceback of
user errors too.
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

USER_ERROR_STATUS = 2  # argparse's status for bad usage: both mean "fix what you passed"
DEBUG_FLAG = "--debug"
# A full disk, a read-only file system, a directory the user may not write: the machine's state, never a bug.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class UserError(Exception):
    """Bad input the user can fix; the message says what is wrong and, where it helps, what to do."""


class MissingInputError(UserError, FileNotFoundError):
    """A file, directory or data set the user named does not exist or cannot be reached."""


class InvalidAdapterError(UserError, ValueError):
    """An adapter directory whose files LayerRoute will not load: a truncated or corrupt weights file, a config that
    does not fit its weights or was edited into something ``save_pretrained`` never writes, or weights only in a
    pickle-based format. The message names the file and the reason."""


def check_output_directory(flag: str, path: Path | None) -> None:
    """Refuse, before any work, an output file ``path`` (given as ``flag``) whose directory does not exist: for
    outputs written only at the end of a long run, which would otherwise fail after it."""
    if path is not None and not path.parent.is_dir():
        raise MissingInputError(f"{flag} {path}: the directory {path.parent} does not exist")


@contextmanager
def user_input(what: str) -> Iterator[None]:
    """Re-raise ``ValueError`` and ``OSError`` from loading something the user named as a :class:`UserError`.

    For library calls whose documented ``ValueError`` / ``OSError`` mean "this input does not fit" (an adapter trained
    on another base model, a model directory that is not one); ``what`` names the input in the message. The original
    exception stays chained, so ``--debug`` shows where it came from.
    """
    try:
        yield
    except UserError:
        raise
    except (ValueError, OSError) as error:
        raise UserError(f"{what}: {error}") from error


def command(prog: str) -> Callable[[Callable[[list[str] | None], int]], Callable[[list[str] | None], int]]:
    """Decorate a ``main(argv) -> int``: a :class:`UserError`, or an ``OSError`` of :data:`ENVIRONMENT_ERRNOS`, becomes
    ``prog: error: message`` on stderr and exit status 2; other exceptions propagate with their traceback. ``--debug``
    is taken out of ``argv`` wherever it stands (so every subcommand accepts it) and lets these propagate too."""

    def decorate(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = DEBUG_FLAG in argv
            try:
                return main([a for a in argv if a != DEBUG_FLAG])
            except (UserError, OSError) as error:
                if debug or not isinstance(error, UserError) and error.errno not in ENVIRONMENT_ERRNOS:
                    raise
                print(f"{prog}: error: {error}", file=sys.stderr)
                return USER_ERROR_STATUS

        return wrapped

    return decorate
