"""Temp files and folders that killed writes leave in the shared folder, named so that they can be cleared safely.

Every temp name carries its writer: `.<target>.<pid>@<host>.<random>.tmp` (the random part from tempfile, so
no peer can plant a link at the name first). A leftover is removed when it is older than STALE_TEMP_S or when
its writer's pid is no longer alive on this host; a live writer, here or on another machine sharing the
Drive, is never disturbed. Names of earlier versions (`.<target>.<pid>.tmp`, no host) are cleared by age alone.
"""

import errno
import hashlib
import itertools
import logging
import os
import re
import socket
import stat
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
MAX_REMOVED_DEPTH = 32      # folders deep a leftover is removed: ours are one deep (a checkpoint's files)
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
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


def _newest_mtime(parent: int, name: str) -> float:
    """The entry's own modification time or, for a folder being written, its newest file's."""
    info = os.stat(name, dir_fd=parent, follow_symlinks=False)
    newest = info.st_mtime
    if stat.S_ISDIR(info.st_mode):
        fd = _open_folder_at(parent, name)
        try:
            with os.scandir(fd) as children:
                for child in itertools.islice(children, MAX_LOOKED_AT):
                    newest = max(newest, child.stat(follow_symlinks=False).st_mtime)
        finally:
            os.close(fd)
    return newest


def _is_stale_at(parent: int, name: str) -> bool:
    """A temp entry of the folder open at `parent` whose writer is surely gone: dead on this host, or silent for
    STALE_TEMP_S."""
    match = TEMP_NAME.fullmatch(name)
    if match is None:
        return False
    if match["host"] == _HOST and not pid_alive(int(match["pid"])):
        return True
    try:
        return time.time() - _newest_mtime(parent, name) > STALE_TEMP_S
    except OSError:        # gone meanwhile, swapped for a link, or unreadable: leave it to the next start
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


def _restore_aside_at(parent: int, name: str, directory: Path) -> None:
    """A stale `.old` folder swap_in had moved aside, in the folder open at `parent`, goes back in place when
    nothing took it, or is removed; a `.old` of a live writer is left alone."""
    match = TEMP_NAME.fullmatch(name)
    if match is None or not name.endswith(".old") or not _is_stale_at(parent, name):
        return
    target = match["target"]
    if _exists_at(parent, target) or not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
        remove_at(parent, name)         # its place is taken (the newer one stays), or it is no folder of ours
        return
    os.rename(name, target, src_dir_fd=parent, dst_dir_fd=parent)
    log.info("%s: the folder a killed write had moved aside is back", directory / target)


def _exists_at(parent: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def remove(path: Path) -> None:
    """A file, a link (never what it points to) or a whole folder, nothing below `path` followed (see remove_at)."""
    parent = os.open(path.parent, _FOLDER_FLAGS & ~os.O_NOFOLLOW)     # the path up to it is the caller's
    try:
        remove_at(parent, path.name)
    finally:
        os.close(parent)


def remove_at(parent: int, name: str) -> None:
    """Remove `name` from the folder open at `parent`: a file or a link itself (never what it points to), or a
    folder and all in it, each folder opened from its parent without following a link, so one a peer swaps for
    a link meanwhile is never walked into (OSError then, and the rest stays). A tree over MAX_REMOVED_DEPTH
    folders deep is refused (OSError) rather than holding a descriptor per level."""
    if not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
        os.unlink(name, dir_fd=parent)
        return
    stack = [(parent, name, _open_folder_at(parent, name))]      # (its folder, its name, itself)
    try:
        while stack:
            folder = stack[-1][2]
            sub = _unlink_files_in(folder)
            if sub is None:
                above, below, folder = stack.pop()
                os.close(folder)
                os.rmdir(below, dir_fd=above)
            elif len(stack) >= MAX_REMOVED_DEPTH:
                raise OSError(errno.ELOOP, f"over {MAX_REMOVED_DEPTH} folders deep; not removed")
            else:
                stack.append((folder, sub, _open_folder_at(folder, sub)))
    finally:
        for _, _, folder in stack:
            os.close(folder)


def _unlink_files_in(folder: int) -> str | None:
    """Unlink the files and links of the folder open at `folder` until a folder is met; its name, or None once
    nothing but emptiness is left."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            os.unlink(entry.name, dir_fd=folder)
    return None


def _open_folder_at(parent: int, name: str) -> int:
    """The folder `name` of the folder open at `parent`, never through a link (OSError: ELOOP or ENOTDIR)."""
    return os.open(name, _FOLDER_FLAGS, dir_fd=parent)


def _listing(folder: int, directory: Path) -> list[tuple[str, bool]]:
    """(name, is a folder) of at most MAX_LOOKED_AT entries of the folder open at `folder`; a flood is warned about."""
    with os.scandir(folder) as listing:
        entries = [(entry.name, entry.is_dir(follow_symlinks=False))
                   for entry in itertools.islice(listing, MAX_LOOKED_AT + 1)]
    if len(entries) > MAX_LOOKED_AT:
        warn_once(f"{directory}: over {MAX_LOOKED_AT} entries; the clean-up of killed writes looked at the "
                  f"first {MAX_LOOKED_AT} (a peer flooding the folder?)")
    return entries[:MAX_LOOKED_AT]


def remove_stale_temps(root: Path, depth: int = 4) -> list[Path]:
    """Remove the stale `*.tmp` entries in `root` and up to `depth` levels below (the layout's temps sit at
    most three down: rollouts/round_N/stage_S/), and put back the `.old` folders swap_in left aside when their
    place is empty (removed otherwise). Returns what went.

    Every folder is opened from the one above it without following a link, and a leftover is removed from the
    very folder it was listed in (dir_fd-relative): a folder a peer swapped for a link meanwhile is not walked,
    nor removed through. A loop, not a recursion: a planted tree a thousand folders deep cannot end in
    RecursionError."""
    try:
        top = os.open(root, _FOLDER_FLAGS & ~os.O_NOFOLLOW)      # the path up to it is the user's
    except OSError:
        return []
    try:
        return remove_stale_temps_at(top, root, depth)
    finally:
        os.close(top)


def remove_stale_temps_at(folder: int, directory: Path, depth: int) -> list[Path]:
    """remove_stale_temps in the folder open at `folder` (left open), named `directory` in messages."""
    removed: list[Path] = []
    stack = _level(os.dup(folder), directory)
    try:
        while stack:
            here, where, entries = stack[-1]
            name, is_folder = next(entries, ("", False))
            if not name:
                os.close(stack.pop()[0])
            elif TEMP_NAME.fullmatch(name):
                if _clear_at(here, name, where):
                    removed.append(where / name)
            elif is_folder and len(stack) < depth and not name.endswith(".tmp"):
                try:
                    below = _open_folder_at(here, name)
                except OSError:        # gone meanwhile, a link, or unreadable: nothing of ours to clear there
                    continue
                stack += _level(below, where / name)
    finally:
        for here, _, _ in stack:
            os.close(here)
    if removed:
        log.info("removed %d leftover(s) of killed writes under %s", len(removed), directory)
    return removed


def _level(folder: int, directory: Path) -> list[tuple[int, Path, Iterator[tuple[str, bool]]]]:
    """The folder open at `folder` with its listing, a level of the walk; none (and closed) when it won't list."""
    try:
        return [(folder, directory, iter(_listing(folder, directory)))]
    except OSError:
        os.close(folder)
        return []


def _clear_at(folder: int, name: str, directory: Path) -> bool:
    """Clear one temp entry of the folder open at `folder`; True when a stale `.tmp` went."""
    try:
        if name.endswith(".old"):
            _restore_aside_at(folder, name, directory)
            return False
        if not name.endswith(".tmp") or not _is_stale_at(folder, name):
            return False
        remove_at(folder, name)
    except OSError as exc:
        log.warning("%s: a leftover of a killed write, not removed (%s)", directory / name, exc)
        return False
    return True
