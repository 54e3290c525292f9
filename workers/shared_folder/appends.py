"""Appends to the shared folder's logs (metrics, evaluations, events, a process's own log): one line at a time,
whole, synced, and never through what a peer planted at the path.

Each log has one writer, so O_APPEND's writes of one line never interleave with another's; a crash can only tear
the last line, which readers skip (jsonl) and the next append ends first.
"""

import errno
import logging
import os
from pathlib import Path

from workers.shared_folder import drive_sim, storage
from workers.shared_folder.rejections import NotRegularFile
from workers.shared_folder.safe_io import _open_regular, _unlink, write_all

log = logging.getLogger(__name__)


def open_append(path: Path) -> int:
    """A descriptor appending to the regular file at `path`, created if missing; never through a link.

    The path is this writer's own (its log, its metrics), so a link, FIFO or socket planted there is removed
    (the link itself, never what it points to) and a new file takes its place: a line that waited for the
    path instead would hold up the round's later files. OSError when a folder sits there.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND        # read too: append_durably looks at the last byte
    try:
        return _open_regular(path, flags)
    except NotRegularFile as error:
        if error.what == "a directory":
            raise OSError(errno.EISDIR, f"{path} is a directory, not the file rl-swarm appends to (remove it)") \
                from error
        log.warning("%s: %s was planted where this node appends; replaced by a new file", path, error.what)
        _unlink(path)
    try:
        return _open_regular(path, flags | os.O_EXCL)     # planted again meanwhile: refused, the line waits
    except NotRegularFile as error:
        raise OSError(errno.EEXIST, f"{path}: {error.what} keeps being planted here; not written") from error


def append_durably(path: Path, data: bytes) -> None:
    """Append `data`, whole lines, to the regular file at `path` (made if missing, never through a link) and fsync.

    A line a crash tore at the end of the file is ended first: it stays one bad line that readers skip, where
    without its newline it would swallow this one too (a metrics line rewritten by a restart, say). A write
    that fails part-way (a full disk) is cut off again before the error goes up, so the retry that follows
    leaves no torn line behind: the file has one writer, so what lies past `size` is this call's own.
    """
    fd = open_append(path)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        try:
            write_all(fd, data)
            os.fsync(fd)
        except OSError:
            _cut_back(fd, path, size)
            raise
    finally:
        os.close(fd)


def _cut_back(fd: int, path: Path, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as error:      # the failed write's error is the one to report; this one only costs a bad line
        log.warning("%s: a failed append's part could not be cut off (%s); readers skip it as a torn line",
                    path, error.strerror or error)


def append_line(path: Path, line: bytes) -> None:
    """Append one whole line and fsync; a crash can only leave a torn last line, which readers skip.

    Each log has one writer, so O_APPEND's writes of one line never interleave with another's.
    """
    if (where := storage.mounted(path)) is not None:      # an object store: the line is an object of its own
        where[0].append(where[1], line)
        return
    drive_sim.before_write(path)
    append_durably(path, line)
    drive_sim.after_write(path)
