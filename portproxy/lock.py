"""One owner per control socket, per state directory and per nft table: an flock'ed file for each.

The lock is taken before anything is touched, so a second ``portproxy serve`` with the
same ``--socket`` never unlinks the live daemon's socket (which would leave it running but
unreachable), and a ``portproxy map --mode kernel`` beside a daemon never rewrites the
daemon's nft table: the second process refuses with one line naming the pid that holds it. The lock goes with the process (however it
dies), so a stale lock file never blocks a restart.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

RUN_DIR = Path("/run/portproxy")


from .errors import Conflict, SystemFailure
from .netident import netns_id


class AlreadyRunning(Conflict):
    pass


UNWRITABLE = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)
"""Why a lock file may not be creatable in a directory that is there."""


def take_lock(path: Path, what: str) -> int:
    """Lock ``path`` (created if needed) for this process's life; return the fd to keep."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in UNWRITABLE or not path.parent.is_dir():
            raise SystemFailure(f"cannot create {path}: {exc.strerror}") from None
        # A full or read-only directory: lock the file read-only if it is there, else the
        # directory itself, so that a readable state still starts.
        try:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc2:
            raise SystemFailure(f"cannot create {path}: {exc2.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        os.close(fd)
        raise AlreadyRunning(f"another portproxy (pid {holder}) is using {what}") from None
    try:  # who holds it, for the refusal of a second taker; the lock holds without it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # a full disk (or a locked directory: EISDIR) must not stop a start
    return fd


def table_lock_path(table: str) -> Path:
    """The lock of nft table ``inet TABLE`` in this thread's network namespace."""
    return RUN_DIR / f"nft-{netns_id()}-{table}.lock"


def held(path: Path) -> bool:
    """Whether a live process holds the lock at ``path``, by reading it, never flocking it: a
    taker's flock is non-blocking, and a probe holding it for a moment would fail them. The
    file names its holder's pid (written right after the flock) and goes on release; a
    crash leaves a dead pid."""
    try:
        text = path.read_text().strip()
    except OSError:
        return False
    if not text.isdigit():
        return True  # being taken
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def release_lock(path: Path, fd: int) -> None:
    """Give a lock up for good: the file goes first (a new owner makes a new one), then the fd."""
    try:
        path.unlink()
    except OSError:
        pass  # gone already, or a read-only directory (then the fd held the lock)
    os.close(fd)
