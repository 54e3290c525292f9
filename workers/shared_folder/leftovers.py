"""Temp files and folders that killed writes leave in the shared folder, named so that they can be cleared safely.

Every temp name carries its writer: `.<target>.<pid>@<host>.<random>.tmp` (the random part from tempfile, so
no peer can plant a link at the name first). A leftover is removed when it is older than STALE_TEMP_S or when
its writer's pid is no longer alive on this host; a live writer, here or on another machine sharing the
Drive, is never disturbed. Names of earlier versions (`.<target>.<pid>.tmp`, no host) are cleared by age alone.
"""

import hashlib
import itertools
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from workers.shared_folder.rejections import warn_once

log = logging.getLogger(__name__)

# a json temp lives milliseconds and a GPT-2 checkpoint is written in seconds, even to a slow Drive
STALE_TEMP_S = 300.0
MAX_LOOKED_AT = 65_536       # names of one folder the clean-up looks at: a peer's flood costs a bounded time
TEMP_NAME = re.compile(r"\.(?P<target>.+?)\.(?P<pid>[0-9]{1,10})(?:@(?P<host>[0-9a-f]{8}))?"
                       r"(?:\.[A-Za-z0-9_]{1,16})?\.(?:tmp|old)")
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """A process with this pid runs on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:      # no pid is that large
        return False
    return True


def writer_tag() -> str:
    """`<pid>@<host>`: who writes a temp file, so a later start can tell a dead writer from a live one."""
    return f"{os.getpid()}@{_HOST}"


def temp_prefix(target: Path) -> str:
    return f".{target.name}.{writer_tag()}."


def make_temp_dir(target: Path) -> Path:
    """A new, empty folder beside `target` to write it in, then rename; its name is unpredictable."""
    path = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent))
    usual_mode(path, 0o755)
    return path


def usual_mode(path_or_fd: Path | int, mode: int) -> None:
    """The mode the swarm's files always had (0644, folders 0755) rather than tempfile's 0600/0700, so that
    `rl-swarm status` of another user on the machine still reads them."""
    try:
        os.chmod(path_or_fd, mode)
    except OSError as exc:         # a Drive mount without modes: nothing to set
        log.debug("mode of %s not set: %s", path_or_fd, exc)


def _newest_mtime(path: Path) -> float:
    """The entry's own modification time or, for a folder being written, its newest file's."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        with os.scandir(path) as children:
            for child in children:
                newest = max(newest, child.stat(follow_symlinks=False).st_mtime)
    return newest


def is_stale(path: Path, now: float | None = None) -> bool:
    """A temp entry whose writer is surely gone: dead on this host, or silent for STALE_TEMP_S."""
    match = TEMP_NAME.fullmatch(path.name)
    if match is None:
        return False
    if match["host"] == _HOST and not pid_alive(int(match["pid"])):
        return True
    try:
        return (time.time() if now is None else now) - _newest_mtime(path) > STALE_TEMP_S
    except OSError:        # gone meanwhile, or unreadable: leave it to the next start
        return False


def swap_in(tmp: Path, final: Path) -> None:
    """Rename the whole folder `tmp` (from make_temp_dir) to `final`. An old `final` is first renamed aside (`.old`)
    and removed last, so a kill at any point leaves a whole folder at `final`, or the old one aside, which
    remove_stale_temps brings back; deleting it first left nothing between the two steps."""
    old = tmp.with_suffix(".old")
    if os.path.lexists(final):
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if os.path.lexists(old) and not os.path.lexists(final):
            os.replace(old, final)
        raise
    if os.path.lexists(old):
        remove(old)


def restore_aside(path: Path) -> bool:
    """A stale `.old` folder swap_in had moved aside goes back in place when nothing took it (True), or is
    removed; a `.old` of a live writer is left alone."""
    match = TEMP_NAME.fullmatch(path.name)
    if match is None or not path.name.endswith(".old") or not is_stale(path):
        return False
    target = path.with_name(match["target"])
    if os.path.lexists(target) or not path.is_dir() or path.is_symlink():
        remove(path)
        return False
    os.replace(path, target)
    log.info("%s: the folder a killed write had moved aside is back", target)
    return True


def remove(path: Path) -> None:
    """A file, a link (never what it points to) or a whole folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _entries(root: Path, depth: int) -> Iterator[Path]:
    """Everything in root and up to `depth` levels below, at most MAX_LOOKED_AT names of each folder, without
    following links: a folder below the root is opened with O_NOFOLLOW, so one a peer swapped for a link since
    it was listed is not walked. A loop, not a recursion: a planted tree a thousand folders deep cannot end in
    RecursionError."""
    pending = [(root, 0)]
    while pending:
        directory, level = pending.pop()
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if level else 0))
        except OSError:        # gone meanwhile, a link, or unreadable: nothing of ours to clear there
            continue
        try:
            with os.scandir(fd) as listing:
                entries = [(entry.name, entry.is_dir(follow_symlinks=False))
                           for entry in itertools.islice(listing, MAX_LOOKED_AT + 1)]
        except OSError:
            continue
        finally:
            os.close(fd)
        if len(entries) > MAX_LOOKED_AT:
            warn_once(f"{directory}: over {MAX_LOOKED_AT} entries; the clean-up of killed writes looked at the "
                      f"first {MAX_LOOKED_AT} (a peer flooding the folder?)")
        for name, is_folder in entries[:MAX_LOOKED_AT]:
            yield directory / name
            if level + 1 < depth and is_folder and not name.endswith(".tmp"):
                pending.append((directory / name, level + 1))


def remove_stale_temps(root: Path, depth: int = 4) -> list[Path]:
    """Remove the stale `*.tmp` entries in `root` and up to `depth` levels below (the layout's temps sit at
    most three down: rollouts/round_N/stage_S/), and put back the `.old` folders swap_in left aside when their
    place is empty (removed otherwise). Returns what went."""
    removed = []
    for path in _entries(root, depth):
        try:
            if path.name.endswith(".old"):
                restore_aside(path)
                continue
            if not path.name.endswith(".tmp") or not is_stale(path):
                continue
            remove(path)
        except (OSError, RecursionError) as exc:      # RecursionError: a planted tree too deep for rmtree
            log.warning("%s: a leftover of a killed write, not removed (%s)", path, exc)
            continue
        removed.append(path)
    if removed:
        log.info("removed %d leftover(s) of killed writes under %s", len(removed), root)
    return removed
