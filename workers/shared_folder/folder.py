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
import hashlib
import json
import logging
import os
import random
import re
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from configs_env import SwarmError
from workers.shared_folder import bounded_json, drive_sim, mount
from workers.shared_folder.leftovers import temp_prefix, usual_mode

log = logging.getLogger(__name__)

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")     # matched whole: fullmatch, never a `$` anchor
ROUND_DIGITS = re.compile(r"[0-9]{1,9}")      # ASCII only: str.isdigit() also takes '²', which int() refuses
MAX_RECORD_BYTES = 4 * 1024 * 1024     # a round's rollouts of one node: I*G completions, far below this
CHECKSUM_KEY = "sha256"


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


def record_checksum(record: dict[str, Any]) -> str:
    """SHA-256 of the record without its checksum key, serialised canonically (sorted keys, no spaces, ASCII).

    The writer hashes the record as a reader will parse it (see write_json_atomic), so both sides hash
    the same text whatever the key order, float spelling or escapes in the file.
    """
    body = {key: value for key, value in record.items() if key != CHECKSUM_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one; the record gains a checksum.

    The temp file has an unpredictable name (mkstemp: O_EXCL, never a planted link) and the rename replaces
    a link planted at `path` itself, never writing through it.
    """
    # the round trip turns tuples into lists and non-string keys into strings, exactly as a reader sees them
    body = json.loads(json.dumps({k: v for k, v in record.items() if k != CHECKSUM_KEY}, allow_nan=False))
    sealed = {**body, CHECKSUM_KEY: record_checksum(body)}
    drive_sim.before_write(path)
    mount.make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    try:
        usual_mode(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(sealed, f, separators=(",", ":"), allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    drive_sim.after_write(path)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISLNK, "a symbolic link"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


class NotRegularFile(RejectedFile):
    """Something other than a regular file where the swarm expects one: a link, FIFO, socket, folder, device."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path}: {what}, not a regular file; skipped")
        self.what = what


def _open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the regular file at `path` (NotRegularFile otherwise); a link is not followed and a
    FIFO never blocks."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        # ELOOP: the last component is a link (O_NOFOLLOW); ENXIO: a socket, or a FIFO nobody reads
        if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise
        try:
            what = _kind(os.lstat(path).st_mode)
        except OSError:
            what = exc.strerror or "unopenable"
        raise NotRegularFile(path, what) from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotRegularFile(path, _kind(info.st_mode))
    return fd


def _read_regular(path: Path, offset: int, limit: int, whole: bool) -> bytes:
    """Up to `limit` bytes from `offset` of a regular file; whole=True: RejectedFile when it holds more."""
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


def list_folder(directory: Path, pattern: str = "*") -> list[Path]:
    """Sorted entries matching `pattern`, without temp or hidden files; [] when the folder does not exist.

    The one way the swarm lists the shared folder; OSError for a Drive hiccup (the caller polls again).
    """
    if not directory.is_dir():
        return []
    drive_sim.before_list(directory)
    return sorted(p for p in directory.glob(pattern) if not p.name.startswith(".") and not drive_sim.hidden(p))


def is_visible(path: Path) -> bool:
    """The file exists and this process can see it; False after a failed check too, which callers repeat."""
    try:
        drive_sim.before_read(path, path.stat().st_mtime)
    except OSError:
        return False
    return True


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
        path.unlink()
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
    drive_sim.before_write(path)
    mount.make_dirs(path.parent)
    line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
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

    def create(self) -> "ExperimentFolder":
        for sub in ("state", "peers", "rollouts", "rewards", "metrics", "checkpoints", "logs"):
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
        """Every node's metrics (or eval.jsonl) file, by node name."""
        return sorted((self.root / "metrics").glob(f"*/{name}"))

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
