"""Errors a user can act on, and which failures are worth retrying.

Every ``mapex`` command turns these into one line on standard error that names the file, setting
or server and the reason, and an exit status: 1 for what a retry cannot fix (bad input, a missing
file, a read-only file system, no permission, a full disk), 75 (``EX_TEMPFAIL``) for what it may
fix (a timeout, a lost connection, an I/O error of remote storage), so the flows retry only those.
"""

from __future__ import annotations

import errno

EX_TEMPFAIL = 75  # exit status of a transient failure: worth retrying
# OSErrors that no retry fixes: the user has to free space, grant access or pick another path
PERMANENT_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOENT,
                    errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}


class MapexError(Exception):
    """A failure the user can act on; the message says what and where."""


def exit_status(exc: BaseException) -> int | None:
    """The exit status a command ends with for ``exc``: 1 (permanent), 75 (transient), or ``None``
    for an exception that is a bug (the command shows its traceback)."""
    if isinstance(exc, MapexError | ValueError | FloatingPointError):
        return 1
    if isinstance(exc, OSError) and not isinstance(exc, TimeoutError | ConnectionError):
        return 1 if exc.errno in PERMANENT_ERRNOS or exc.errno is None and isinstance(
            exc, FileNotFoundError | PermissionError | NotADirectoryError | IsADirectoryError) else EX_TEMPFAIL
    if isinstance(exc, TimeoutError | ConnectionError):
        return EX_TEMPFAIL
    return None
