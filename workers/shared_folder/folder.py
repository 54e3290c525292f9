"""The shared folder: its layout, and the only ways anything is written to it or read from it.

The folder may be a Google Drive mount shared by several machines, so it is untrusted input:
every read is size-bounded and JSON-only, every name is validated before it becomes a path,
every write is atomic (temp file in the same folder, fsync, rename), and every record carries a
checksum so a half-synced or edited file is skipped rather than trusted. Every read, write and
listing of the protocol subfolders goes through these helpers, which is where `workers.shared_folder.drive_sim`
makes a test's folder slow and flaky.
"""

import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import os
import random
import re
import secrets
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from configs_env import SwarmError
from workers.shared_folder import bounded_json, drive_sim, mount, storage
from workers.shared_folder.leftovers import temp_prefix, usual_mode

log = logging.getLogger(__name__)

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")     # matched whole: fullmatch, never a `$` anchor
ROUND_DIGITS = re.compile(r"[0-9]{1,9}")      # ASCII only: str.isdigit() also takes '²', which int() refuses
MAX_RECORD_BYTES = 4 * 1024 * 1024     # a round's rollouts of one node: I*G completions, far below this
CHECKSUM_KEY = "sha256"
SIGNATURE_KEY = "signature"     # the writer's Ed25519 signature over the rest (workers.shared_folder.signing)
# a reader takes at most MAX_LISTED entries of one listing and looks at MAX_SCANNED names: a peer writing
# thousands of files into a folder costs each reader a bounded time (an honest round holds a file per node)
MAX_LISTED = 2048
MAX_SCANNED = 65_536


T = TypeVar("T")


_JITTER = random.Random()     # its own stream: retries never shift a seeded draw of the training


def backoff_s(attempt: int, first_wait_s: float, rng: random.Random = _JITTER) -> float:
    """The wait before retry `attempt` (1, 2, ...): doubling, with jitter of +-50% so that nodes throttled by
    the same Drive at the same moment do not all come back at the same moment."""
    return first_wait_s * 2 ** (attempt - 1) * rng.uniform(0.5, 1.5)


def with_retries(action: Callable[[], T], what: str, attempts: int = 4, first_wait_s: float = 0.5,
                 retry_missing: bool = True) -> T:
    """Retry an OSError with exponential backoff and jitter: a Drive mount throttles bursts and drops calls
    now and then. At most `attempts` tries, about 0.5 + 1 + 2 s of waiting with the defaults.

    retry_missing=False: a FileNotFoundError is raised at once (a read of a file not there yet).
    """
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except OSError as exc:
            if attempt == attempts or (not retry_missing and isinstance(exc, FileNotFoundError)):
                raise
            wait = backoff_s(attempt, first_wait_s)
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, exc.strerror or exc, attempt,
                        attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


class FolderError(SwarmError):
    """The shared folder cannot be used (missing, not writable, or claimed by someone else)."""


class RejectedFile(SwarmError):
    """A file in the shared folder failed validation; it is skipped and counted, never trusted."""


_warned: dict[str, None] = {}      # insertion-ordered: past WARNED_KEEP the oldest is forgotten first
_warned_lock = threading.Lock()
WARNED_KEEP = 4096


def naming(path: Path, error: RejectedFile) -> str:
    """The refusal as one message that starts with the file, also for checks (a node id, say) that do not
    know which file they run on."""
    text = str(error)
    return text if text.startswith(str(path)) else f"{path}: {text}; skipped"


def warn_skipped(path: Path, error: RejectedFile) -> None:
    """Log a skipped file once per process: a reader that polls (the dashboard, several times a second) meets
    the same bad file again and again."""
    warn_once(naming(path, error))


def warn_once(text: str) -> None:
    with _warned_lock:
        if text in _warned:
            return
        if len(_warned) >= WARNED_KEEP:
            del _warned[next(iter(_warned))]
        _warned[text] = None
    log.warning("%s", text)


def check_node_name(name: str) -> str:
    """Node ids become file names: letters, digits, '.', '_', '-' only, so `../../etc` never becomes a path."""
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name) or name in (".", ".."):
        raise RejectedFile(f"node id {name!r} is not a safe name (letters, digits, '.', '_', '-', at most 64)")
    return name


def canonical_json(record: dict[str, Any], without: tuple[str, ...] = (CHECKSUM_KEY,)) -> bytes:
    """The record without the `without` keys, serialised canonically (sorted keys, no spaces, ASCII): what
    its checksum and its signature cover, the same text on both sides whatever the key order, float
    spelling or escapes in the file."""
    body = {key: value for key, value in record.items() if key not in without}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def record_checksum(record: dict[str, Any]) -> str:
    """SHA-256 of the record without its checksum key (a signature included): a half-synced file fails it."""
    return hashlib.sha256(canonical_json(record)).hexdigest()


def _sealed_bytes(record: dict[str, Any]) -> bytes:
    # the round trip turns tuples into lists and non-string keys into strings, exactly as a reader sees them
    body = json.loads(json.dumps({k: v for k, v in record.items() if k != CHECKSUM_KEY}, allow_nan=False))
    sealed = {**body, CHECKSUM_KEY: record_checksum(body)}
    return json.dumps(sealed, separators=(",", ":"), allow_nan=False).encode("utf-8")


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


def write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one; the record gains a checksum.

    The temp file has an unpredictable name (O_EXCL, never a planted link), the rename replaces a link
    planted at `path` itself, never writing through it, and no folder on the way is a link (see _folder).
    """
    data = _sealed_bytes(record)
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


def write_json_create_only(path: Path, record: dict[str, Any]) -> bool:
    """Write the record at `path` only if nothing is there: True when this call created it, False when a file
    was there already (it is left as it is). A hard link of the synced temp file makes it appear whole; a
    folder that takes no hard links (some Drive mounts) gets an O_EXCL file written in place, which a reader
    may meet half-written for a moment and skips as it skips any half-synced file."""
    data = _sealed_bytes(record)
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


class NotRegularFile(RejectedFile):
    """Something other than a regular file where the swarm expects one: a link, FIFO, socket, folder, device."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path}: {what}, not a regular file; skipped")
        self.what = what


class LinkedFolder(RejectedFile):
    """A folder inside the experiment folder that is a symbolic link (or no folder at all): never followed."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path}: {what} where a folder of the experiment belongs; not followed, skipped")


_roots: dict[str, None] = {}       # experiment folders of this process: nothing below them follows a link
_ROOTS_KEPT = 1024                 # `experiments list` opens every experiment under GDRIVE_PATH


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


def parse_json(data: bytes, where: str) -> Any:
    """The JSON value of `data`, bounded (see bounded_json); RejectedFile naming `where` and why when refused."""
    try:
        return bounded_json.loads(data.decode("utf-8"))
    except bounded_json.RefusedJSON as exc:
        raise RejectedFile(f"{where}: {exc}; skipped") from exc
    except ValueError as exc:         # bad UTF-8 or JSON, an empty file
        raise RejectedFile(f"{where}: not valid JSON ({exc.__class__.__name__}: {str(exc)[:80]}); skipped") from exc


def read_json_bounded(path: Path, max_bytes: int = MAX_RECORD_BYTES, *,
                      require_checksum: bool = False) -> dict[str, Any]:
    """One JSON object from the folder, its checksum checked and removed.

    Raises FileNotFoundError while the file is missing (or not synced yet), OSError for a Drive hiccup
    (the caller tries again later), and RejectedFile naming the file and why when it is bad: not a regular
    file (a link, FIFO, directory...), over `max_bytes`, not JSON, beyond bounded_json's limits, or not an
    object. A record without a checksum is accepted only when require_checksum is False (files not
    written by write_json_atomic, such as checkpoint meta files).
    """
    record = parse_json(read_whole(path, max_bytes), str(path))
    if not isinstance(record, dict):
        raise RejectedFile(f"{path}: expected a JSON object, got {type(record).__name__}; skipped")
    claimed = record.pop(CHECKSUM_KEY, None)
    if claimed is None:
        if require_checksum:
            raise RejectedFile(f"{path}: no checksum (written by an older rl-swarm or by hand); skipped")
        return record
    try:
        intact = isinstance(claimed, str) and claimed == record_checksum(record)
    except (ValueError, RecursionError):     # NaN or a nesting no writer produces: not what was sealed
        intact = False
    if not intact:
        raise RejectedFile(f"{path}: checksum mismatch (half-synced or edited); skipped")
    return record


def list_folder(directory: Path, pattern: str = "*", limit: int = MAX_LISTED,
                first: Callable[[str], bool] | None = None) -> list[Path]:
    """Sorted entries matching `pattern`, without temp or hidden files; [] when the folder does not exist,
    or is a link (warned about once).

    The one way the swarm lists the shared folder; OSError for a Drive hiccup (the caller polls again). At
    most `limit` entries, those whose name `first` takes before the others, with one warning: a peer that
    floods a folder costs a reader a bounded time.
    """
    if (where := storage.mounted(directory)) is not None:
        names = [entry.name for entry in where[0].list(where[1])]
    else:
        names = _scan(directory)
        if names is None:
            return []
        names = drive_sim.listed(directory, names)
    listed = sorted(directory / name for name in names if not name.startswith(".")
                    and fnmatch.fnmatchcase(name, pattern) and not drive_sim.hidden(directory / name))
    if len(listed) > limit:
        warn_once(f"{directory}: {len(listed)} entries, over the {limit} a reader takes from one folder (a peer "
                  f"flooding it?); the rest skipped")
        if first is not None:
            listed.sort(key=lambda path: not first(path.name))      # stable: still sorted within each side
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


def open_append(path: Path) -> int:
    """A descriptor appending to the regular file at `path`, created if missing; never through a link.

    The path is this writer's own (its log, its metrics), so a link, FIFO or socket planted there is removed
    (the link itself, never what it points to) and a new file takes its place: a line that waited for the
    path instead would hold up the round's later files. OSError when a folder sits there.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
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


def write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a signal, a full disk, a network mount): loop until every byte is out."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "the file took no more bytes")
        view = view[written:]


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one whole line and fsync; a crash can only leave a torn last line, which readers skip.

    Each log has one writer, so O_APPEND's writes of one line never interleave with another's.
    """
    line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
    if (where := storage.mounted(path)) is not None:      # an object store: the line is an object of its own
        where[0].append(where[1], line)
        return
    drive_sim.before_write(path)
    fd = open_append(path)
    try:
        write_all(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    drive_sim.after_write(path)


class ExperimentFolder:
    """Paths of one experiment: <GDRIVE_PATH>/experiments/<EXPERIMENT_NAME>/ and the seeds' layout under it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        with _warned_lock:
            _roots.pop(os.path.abspath(self.root), None)
            _roots[os.path.abspath(self.root)] = None       # the newest is forgotten last
            while len(_roots) > _ROOTS_KEPT:
                del _roots[next(iter(_roots))]

    def create(self) -> "ExperimentFolder":
        for sub in ("state", "peers", "rollouts", "rewards", "metrics", "checkpoints", "logs", "keys"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        mount.claim(self.root)
        try:
            # mkstemp, not a name of ours: a link planted at a predictable name would have us truncate its target
            fd, probe = tempfile.mkstemp(dir=self.root / "state", prefix=".probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise FolderError(f"{self.root}: the shared folder is not writable ({exc.strerror}); "
                              "check GDRIVE_PATH and that the Drive is mounted") from exc
        return self

    @property
    def config_file(self) -> Path:
        return self.root / "config.json"

    def round_state_file(self, round_: int) -> Path:
        return self.root / "state" / f"round_{round_:06d}.json"

    @property
    def finished_file(self) -> Path:
        return self.root / "state" / "finished.json"

    @property
    def coordinator_lease_file(self) -> Path:
        """Held by the one `rl-swarm up` (or `pretrain`) of the experiment, from before its warm-up to its end."""
        return self.root / "state" / "coordinator.lease.json"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    def public_key_file(self, node: str) -> Path:
        return self.keys_dir / f"{check_node_name(node)}.pub"

    def heartbeat_file(self, node: str) -> Path:
        return self.root / "peers" / f"{check_node_name(node)}.json"

    def rollout_dir(self, round_: int) -> Path:
        # one stage a round: the folder keeps the seeds' stage_0 level, so older folders still read
        return self.root / "rollouts" / f"round_{round_}" / "stage_0"

    def rollout_file(self, round_: int, node: str, part: int | None = None) -> Path:
        name = check_node_name(node) if part is None else f"{check_node_name(node)}.part{part}"
        return self.rollout_dir(round_) / f"{name}.json"

    def reward_file(self, round_: int, node: str) -> Path:
        return self.rewards_dir(round_) / f"{check_node_name(node)}.json"

    def metrics_file(self, node: str) -> Path:
        return self.root / "metrics" / check_node_name(node) / "metrics.jsonl"

    def eval_file(self, node: str) -> Path:
        return self.root / "metrics" / check_node_name(node) / "eval.jsonl"

    def metrics_files(self, name: str = "metrics.jsonl") -> list[Path]:
        """Every node's metrics (or eval.jsonl) file, by node name; listed through the helpers, so on an object
        store too, and never through a linked folder."""
        return [path for node in list_folder(self.root / "metrics") for path in list_folder(node, name)]

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def rollouts_dir(self) -> Path:
        return self.root / "rollouts"

    @property
    def peers_dir(self) -> Path:
        return self.root / "peers"

    def rewards_dir(self, round_: int) -> Path:
        return self.root / "rewards" / f"round_{round_}"

    def checkpoint_dir(self, node: str) -> Path:
        return self.root / "checkpoints" / check_node_name(node)

    def log_dir(self, node: str) -> Path:
        return self.root / "logs" / check_node_name(node)

    @property
    def supervisor_log_dir(self) -> Path:
        return self.root / "logs" / "supervisor"

    @property
    def events_file(self) -> Path:
        return self.supervisor_log_dir / "events.jsonl"

    @property
    def monitor_file(self) -> Path:
        return self.supervisor_log_dir / "monitor.jsonl"

    def state_rounds(self) -> list[int]:
        """Round numbers with a state file, ascending; OSError for a Drive hiccup."""
        found = []
        for path in list_folder(self.state_dir, "round_*.json"):
            number = round_number(path.stem)
            if number is not None:
                found.append(number)
        return sorted(found)


def round_number(name: str) -> int | None:
    """N of a `round_N` name (state files, rollout and checkpoint folders); None for anything else."""
    digits = name.removeprefix("round_")
    return int(digits) if name.startswith("round_") and ROUND_DIGITS.fullmatch(digits) else None
