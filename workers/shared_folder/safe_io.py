"""Bytes in and out of the shared folder, safely: the primitives the records, the logs and the layout build on.

The folder may be a Google Drive mount shared by several machines, so it is untrusted input: every read is
size-bounded and opens a regular file only, without following a link (neither at the file nor at a folder below
an experiment folder) and without blocking on a FIFO; every name is validated before it becomes a path; every write
is atomic (temp file in the same folder, fsync, rename) or create-only; every listing is bounded; a Drive hiccup
is retried with backoff (`retries`). With SWARM_URL the same calls reach an object store (`storage.mounted`), and these
helpers are where `workers.shared_folder.drive_sim` makes a test's folder slow and flaky. What the bytes say is
json_records' and jsonl's; where they go is folder's (`ExperimentFolder`).
"""

import contextlib
import errno
import fnmatch
import logging
import os
import re
import secrets
import stat
import threading
from pathlib import Path
from typing import Callable, Iterator

from workers.shared_folder import drive_sim, mount, storage
from workers.shared_folder.leftovers import temp_prefix, usual_mode
from workers.shared_folder.rejections import LinkedFolder, NotRegularFile, RejectedFile, warn_once

log = logging.getLogger(__name__)

# a reader takes at most MAX_LISTED entries of one listing and looks at MAX_SCANNED names: a peer writing
# thousands of files into a folder costs each reader a bounded time (an honest round holds a file per node)
MAX_LISTED = 2048
MAX_SCANNED = 65_536


def write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one. The temp file has an unpredictable name
    (O_EXCL, never a planted link), the rename replaces a link planted at `path` itself, never writing through it,
    and no folder on the way is a link (see _folder)."""
    if (where := storage.mounted(path)) is not None:      # an object store: a PUT replaces the object whole
        where[0].write(where[1], data)
        return
    drive_sim.before_write(path)
    with _folder(path.parent, create=True) as directory:
        tmp = _write_temp(directory, path, data)
        try:
            os.replace(tmp, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=directory)
            raise
    drive_sim.after_write(path)


def write_create_only(path: Path, data: bytes) -> bool:
    """Write `data` at `path` only if nothing is there: True when this call created it, False when a file
    was there already (it is left as it is). A hard link of the synced temp file makes it appear whole; a
    folder that takes no hard links (some Drive mounts) gets an O_EXCL file written in place, which a reader
    may meet half-written for a moment and skips as it skips any half-synced file."""
    if (where := storage.mounted(path)) is not None:      # an object store: a conditional PUT (If-None-Match)
        return where[0].create(where[1], data)
    drive_sim.before_write(path)
    with _folder(path.parent, create=True) as directory:
        tmp = _write_temp(directory, path, data)
        try:
            os.link(tmp, path.name, src_dir_fd=directory, dst_dir_fd=directory, follow_symlinks=False)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
            return _create_in_place(directory, path, data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=directory)
    drive_sim.after_write(path)
    return True


def _write_temp(directory_fd: int, path: Path, data: bytes) -> str:
    """A new temp file beside `path` holding `data`, synced; its name is unpredictable and carries its writer."""
    name = f"{temp_prefix(path)}{secrets.token_hex(6)}.tmp"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=directory_fd)
    try:
        usual_mode(fd, 0o644)
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(name, dir_fd=directory_fd)
        raise
    os.close(fd)
    return name


def _create_in_place(directory: int, path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=directory)
    except FileExistsError:
        return False
    try:
        usual_mode(fd, 0o644)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISLNK, "a symbolic link"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


_roots: dict[str, None] = {}       # experiment folders of this process: nothing below them follows a link
_roots_lock = threading.Lock()
_ROOTS_KEPT = 1024                 # `experiments list` opens every experiment under GDRIVE_PATH


def refuse_links_below(root: Path) -> None:
    """From now on no link below the experiment folder `root` is followed (see _folder)."""
    with _roots_lock:
        _roots.pop(os.path.abspath(root), None)
        _roots[os.path.abspath(root)] = None       # the newest is forgotten last
        while len(_roots) > _ROOTS_KEPT:
            del _roots[next(iter(_roots))]


def _below_root(path: Path) -> tuple[str, tuple[str, ...]]:
    """The experiment folder `path` lies in and its parts below it; a path in none is opened as it is (a link
    in an experiment folder's own path is the user's: GDRIVE_PATH may itself be a link to the Drive)."""
    absolute = Path(os.path.abspath(path))
    for root in tuple(_roots):      # a copy: another thread may open an experiment meanwhile
        if absolute.is_relative_to(root):
            return root, absolute.relative_to(root).parts
    return str(absolute), ()


@contextlib.contextmanager
def _folder(directory: Path, create: bool = False) -> Iterator[int]:
    """A descriptor of `directory`, opened one folder at a time below its experiment folder, never through a
    link: a peer's `rollouts/round_5 -> /elsewhere` is not followed. create=True makes missing folders, and a
    link planted where one belongs is removed (the link, never what it points to) and a folder made there."""
    top, parts = _below_root(directory)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    if create:
        mount.make_dirs(Path(top))      # never the experiment folder of a dropped Drive mount again
    fd = os.open(top, flags)
    try:
        for part in parts:
            parent, fd = fd, -1         # _step_into closes the parent, whatever happens
            fd = _step_into(parent, part, directory, create)
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)


def _step_into(parent: int, name: str, directory: Path, create: bool) -> int:
    """The folder `name` in `parent` (whose descriptor is closed); LinkedFolder when it is a link or no folder."""
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent)
        try:
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            what = _kind(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
            if not (create and what == "a symbolic link"):
                raise LinkedFolder(directory, what) from exc
            log.warning("%s: a symbolic link was planted where a folder of the experiment belongs; replaced by a "
                        "folder", directory)
            os.unlink(name, dir_fd=parent)
            os.mkdir(name, 0o755, dir_fd=parent)
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=parent)
    finally:
        os.close(parent)


def _open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the regular file at `path` (NotRegularFile otherwise); no link is followed, neither at
    the file nor at a folder on the way to it, and a FIFO never blocks."""
    with _folder(path.parent, create=bool(flags & os.O_CREAT)) as directory:
        try:
            fd = os.open(path.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644, dir_fd=directory)
        except OSError as exc:
            # ELOOP: the last component is a link (O_NOFOLLOW); ENXIO: a socket, or a FIFO nobody reads
            if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise
            try:
                what = _kind(os.stat(path.name, dir_fd=directory, follow_symlinks=False).st_mode)
            except OSError:
                what = exc.strerror or "unopenable"
            raise NotRegularFile(path, what) from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotRegularFile(path, _kind(info.st_mode))
    return fd


def _unlink(path: Path) -> None:
    with _folder(path.parent) as directory:
        os.unlink(path.name, dir_fd=directory)


def _read_regular(path: Path, offset: int, limit: int, whole: bool) -> bytes:
    """Up to `limit` bytes from `offset` of a regular file; whole=True: RejectedFile when it holds more."""
    if (where := storage.mounted(path)) is not None:
        return _read_stored(path, *where, offset, limit, whole)
    try:
        fd = _open_regular(path)
    except (PermissionError, NotADirectoryError) as exc:
        raise RejectedFile(f"{path}: unreadable ({exc.strerror or exc}); skipped") from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        drive_sim.before_read(path, info.st_mtime)
        if whole and info.st_size > limit:
            raise RejectedFile(f"{path}: {info.st_size} bytes is over the {limit}-byte limit; skipped")
        f.seek(offset)
        return f.read(limit)


def _read_stored(path: Path, store: storage.Store, key: str, offset: int, limit: int, whole: bool) -> bytes:
    """The same bytes from an object store: a log (.jsonl) is its records concatenated, a record one object."""
    if key.endswith(storage.LOG_SUFFIX):
        data = store.read_log(key, offset, limit + 1 if whole else limit)
    else:
        try:
            data = store.read(key, limit) if whole else store.read_range(key, offset, limit)
        except ValueError as exc:
            raise RejectedFile(f"{path}: {exc}; skipped") from exc
    if whole and len(data) > limit:
        raise RejectedFile(f"{path}: over the {limit}-byte limit; skipped")
    return data


def list_folder(directory: Path, pattern: str = "*", limit: int = MAX_LISTED,
                first: Callable[[str], bool] | None = None) -> list[Path]:
    """list_names' entries as paths."""
    return [directory / name for name in list_names(directory, pattern, limit, first)]


def list_names(directory: Path, pattern: str = "*", limit: int = MAX_LISTED,
               first: Callable[[str], bool] | None = None, warn_when_cut: bool = True) -> list[str]:
    """Sorted names matching `pattern`, without temp or hidden files; [] when the folder does not exist, or is a
    link (warned about once). The one way the swarm lists the shared folder; OSError for a Drive hiccup (the caller
    polls again). At most `limit` names, the first by name (as an object store lists them), or those `first` takes
    before the others, with one warning: a peer that floods a folder costs a reader a bounded time. Names, not
    paths, are sorted and filtered: a long run's state/ of thousands lists in a fraction of a millisecond."""
    if (where := storage.mounted(directory)) is not None:
        names = [entry.name for entry in where[0].list(where[1], storage.MAX_LISTED)]
    else:
        names = _scan(directory)
        if names is None:
            return []
        names = drive_sim.listed(directory, names)
    matches = re.compile(fnmatch.translate(pattern)).match
    listed = sorted(name for name in names if not name.startswith(".") and matches(name))
    listed = drive_sim.visible_names(directory, listed)
    if len(listed) > limit:
        if warn_when_cut:
            warn_once(f"{directory}: {len(listed)} entries, over the {limit} a reader takes from one folder (a peer "
                      f"flooding it?); the rest skipped")
        if first is not None:
            listed.sort(key=lambda name: not first(name))      # stable: still sorted within each side
        listed = sorted(listed[:limit])
    return listed


def _scan(directory: Path) -> list[str] | None:
    """At most MAX_SCANNED names in a local folder; None when it does not exist or is a link (warned once)."""
    names: list[str] = []
    try:
        with _folder(directory) as fd:
            drive_sim.before_list(directory)
            with os.scandir(fd) as entries:
                for entry in entries:
                    if len(names) >= MAX_SCANNED:
                        warn_once(f"{directory}: over {MAX_SCANNED} entries; only the first {MAX_SCANNED} looked at "
                                  "(a peer flooding the folder?)")
                        break
                    names.append(entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except LinkedFolder as error:
        warn_once(str(error))
        return None
    return names


def is_visible(path: Path) -> bool:
    """The file exists and this process can see it; False after a failed check too, which callers repeat."""
    if (where := storage.mounted(path)) is not None:
        try:
            where[0].version(where[1])
        except OSError:
            return False
        return True
    try:
        drive_sim.before_read(path, path.stat().st_mtime)
    except OSError:
        return False
    return True


def remove_file(path: Path) -> None:
    """Remove a record (a link planted there itself, never what it points to); nothing when none is there."""
    if (where := storage.mounted(path)) is not None:
        where[0].delete(where[1])
        return
    with contextlib.suppress(FileNotFoundError):
        _unlink(path)


def file_size(path: Path) -> int:
    """Bytes of a file (in a store, of a log's records together); FileNotFoundError while there is none."""
    if (where := storage.mounted(path)) is None:
        return path.stat().st_size
    store, key = where
    if key.endswith(storage.LOG_SUFFIX):
        return sum(entry.size for entry in store.list(key) if not entry.folder)
    return store.version(key)[1]


def read_from(path: Path, offset: int, limit: int) -> bytes:
    """Up to `limit` bytes from `offset` of a file read incrementally (an append-only log such as metrics)."""
    return _read_regular(path, offset, limit, whole=False)


def read_whole(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file; RejectedFile naming it when it is over `max_bytes`."""
    return _read_regular(path, 0, max_bytes, whole=True)


def write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a signal, a full disk, a network mount): loop until every byte is out."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "the file took no more bytes")
        view = view[written:]


def check_regular(path: Path) -> None:
    """NotRegularFile unless `path` is a regular file, looked at without following a link or blocking on a
    FIFO: for files a library opens by name itself (safetensors, torch.load), which would follow and block."""
    os.close(_open_regular(path))


def copy_regular_files(source: Path, target: Path, limit: int = 64) -> None:
    """Copy the files directly in `source` into the existing folder `target`. `source` is a peer's to write: a
    link, FIFO, device or folder there is refused (NotRegularFile), never followed or read, so no file of this
    machine is copied into the shared folder through a planted link; more than `limit` entries is refused too."""
    names = sorted(os.listdir(source))
    if len(names) > limit:
        raise RejectedFile(f"{source}: {len(names)} entries, more than the {limit} a copy takes")
    for name in names:
        fd = _open_regular(source / name)
        try:
            out = os.open(target / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                while chunk := os.read(fd, 1 << 20):
                    write_all(out, chunk)
            finally:
                os.close(out)
        finally:
            os.close(fd)


def sync_folder(folder: Path, files: bool = False) -> None:
    """fsync a folder, so that a rename into it or a file made in it outlives a power cut; with `files`, each
    regular file directly in it first (links are never followed). A file system that cannot sync a folder (some
    network mounts answer EINVAL) is left to its own guarantees."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if files:
            for entry in os.scandir(fd):
                if entry.is_file(follow_symlinks=False):
                    file_fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    try:
                        os.fsync(file_fd)
                    finally:
                        os.close(file_fd)
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
                raise
    finally:
        os.close(fd)
