"""The shared-folder exchange of one node: heartbeats, publishing rollouts, and reading peers' rollouts."""

import logging
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, TypeVar

from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import MAX_RECORD_BYTES, read_json_bounded, sealed_record, write_json_atomic
from workers.shared_folder.rejections import RejectedFile, naming, warn_once, warn_skipped
from workers.shared_folder.retries import with_retries
from workers.shared_folder.safe_io import list_folder, read_whole
from workers.shared_folder import storage
from workers.shared_folder.doorbell import Doorbell
from workers.shared_folder.protocol import (REFUSED_NAMES, Heartbeat, RolloutFile, RolloutGroup, RoundState, Status,
                                            SwarmFinished, refused_name)
from workers.shared_folder.signing import COORDINATOR, KeyRing, NodeKey, UnknownSigner

log = logging.getLogger(__name__)

# matched whole (fullmatch): a `$` anchor would let "w-1.json\n" through
ROLLOUT_NAME = re.compile(r"(?P<node>[A-Za-z0-9][A-Za-z0-9._-]{0,63}?)(?:\.part(?P<part>[0-9]{1,4}))?\.json")
POLL_S = 0.2
SMALL_RECORD_BYTES = 64 * 1024     # a heartbeat, finished.json, the coordinator's lease: a few hundred bytes each
# records remembered, parsed or known bad: a round reads its peers' rollout files (one per group at most, with
# ROLLOUT_PUBLISH_FREQUENCY=generation), a state file and, in the coordinator, the workers' rewards files
MAX_REMEMBERED = 256
# refused files and groups remembered so each is warned about and counted once: thousands of rounds with a bad
# file each would otherwise grow the set for ever; one forgotten and met again is counted again
MAX_REJECTED_KEPT = 4096
NEWEST_LOOKED = 16        # round states a reader looks at, newest first, before the one it waits for

R = TypeVar("R")
Version = tuple[int, int]


def file_version(path: Path) -> Version:
    # size as well as mtime: Drive may keep a file's modification time while its content finishes syncing;
    # lstat: a planted link is a file of its own, refused by the read, not the version of what it points to
    if (where := storage.mounted(path)) is not None:
        return where[0].version(where[1])
    info = path.lstat()
    return info.st_mtime_ns, info.st_size


class Exchange:
    """One node's reads and writes. What it writes it signs with its key; a record it reads counts only when
    it is signed by the node it speaks for (a peer's key is pinned by `keyring` on first sight).

    Reads are cached per file version; a bad file is warned about once, counted, and read again only once
    it changes (a half-synced file that finishes syncing is then accepted). Only the MAX_REMEMBERED newest
    records are remembered: rounds only move forward, so what falls out is an older round's, never read again."""

    def __init__(self, folder: ExperimentFolder, node: str, key: NodeKey, keyring: KeyRing | None = None):
        self.folder = folder
        self.node = node
        self.key = key
        self.keyring = keyring or KeyRing(folder)
        self.keyring.trust(key)
        self.rejected = 0               # files and groups refused, each counted once (the heartbeat shows it)
        # the newest of them, for the heartbeat: a tuple replaced whole, as the heartbeat's thread reads it
        self.rejected_names: tuple[str, ...] = ()
        self._refused: dict[Path, None] = {}
        self._bad: dict[Path, Version] = {}
        self._cache: dict[Path, tuple[Version, Any]] = {}
        self.trouble: dict[str, str] = {}     # "publish" / "fetch": what the folder refused most recently
        self._doorbell: Doorbell | None = None
        self._beats: dict[Path, tuple[bytes, Any, Heartbeat]] = {}     # heartbeats accepted, by their bytes

    def reject(self, path: Path, error: RejectedFile) -> None:
        if self._first_refusal(path):
            log.warning("rejected %s", naming(path, error))

    def reject_group(self, where: str, why: str) -> None:
        """A well-formed file with a group this worker cannot use: warned about once per group."""
        if self._first_refusal(Path(where)):
            log.warning("rejected %s: %s; skipped", where, why)

    def _first_refusal(self, key: Path) -> bool:
        """Count and remember a refusal; False when it is remembered already (it moves to the newest end)."""
        known = key in self._refused
        _remember(self._refused, key, None, MAX_REJECTED_KEPT)
        if not known:
            self.rejected += 1
            where = key.relative_to(self.folder.root) if key.is_relative_to(self.folder.root) else key
            self.rejected_names = (*self.rejected_names, refused_name(str(where)))[-REFUSED_NAMES:]
        return not known

    @property
    def doorbell(self) -> Doorbell:
        """This node's doorbell, made on first use (in the process that uses it: a spawned worker makes its own)."""
        if self._doorbell is None:
            self._doorbell = Doorbell(self.folder.root, self.node)
        return self._doorbell

    def publish_rollouts(self, round_: int, groups: list[RolloutGroup], part: int | None = None) -> Path:
        """Write this node's groups; an OSError after the retries is raised and kept as this node's trouble."""
        record = RolloutFile(node=self.node, round=round_, created_at=time.time(), groups=tuple(groups))
        path = self.folder.rollout_file(round_, self.node, part)
        try:
            signed = self.key.sign(record.to_json())
            with_retries(lambda: write_json_atomic(path, signed), f"publishing {path.name}")
            self.doorbell.ring()      # peers of this host waiting for these groups look now
        except OSError as exc:
            self.trouble["publish"] = (f"round {round_}: rollouts not published ({exc.strerror or exc}); "
                                       "trained on local rollouts")
            raise
        self.trouble.pop("publish", None)
        return path

    def peer_rollouts(self, round_: int, expected: set[str] = frozenset()) -> dict[str, list[RolloutGroup]]:
        """Every valid group other nodes published for this round, by node; in a flooded folder the files of
        the `expected` peers are read first."""
        found: dict[str, list[RolloutGroup]] = {}
        directory = self.folder.rollout_dir(round_)

        def of_expected(name: str) -> bool:
            match = ROLLOUT_NAME.fullmatch(name)
            return match is not None and match["node"] in expected

        try:
            listing = list_folder(directory, "*.json", first=of_expected)
        except OSError as exc:     # a Drive listing that fails is a round with no peers yet, not a crash
            log.warning("could not list %s: %s", directory, exc)
            self.trouble["fetch"] = f"round {round_}: peers' rollouts not listed ({exc.strerror or exc})"
            return found
        self.trouble.pop("fetch", None)
        for path in listing:
            match = ROLLOUT_NAME.fullmatch(path.name)
            if match is None or match["node"] == self.node:
                continue

            def parse(record: dict[str, Any], where: str, node: str = match["node"]) -> RolloutFile:
                rollouts = RolloutFile.from_json(record, where)
                if rollouts.node != node or rollouts.round != round_:
                    raise RejectedFile(f"{where}: names node {rollouts.node!r} round {rollouts.round}, which its "
                                       "path contradicts; skipped")
                return rollouts

            rollouts = self.read_record(path, parse, signer=match["node"])
            if rollouts is not None:
                found.setdefault(rollouts.node, []).extend(rollouts.groups)
        return found

    def read_record(self, path: Path, parse: Callable[[dict[str, Any], str], R], signer: str,
                    max_bytes: int = MAX_RECORD_BYTES) -> R | None:
        """A record signed by `signer`, checksummed, parsed and validated, or None while it is missing, not synced
        yet, unreadable for the moment (the caller polls again), of a signer with no published key yet (warned
        about once, read again later) or bad (warned about once)."""
        try:
            version = file_version(path)
            if self._bad.get(path) == version:
                return None
            cached = self._cache.get(path)
            if cached and cached[0] == version:
                return cached[1]
            record = read_signed(path, signer, self.keyring, max_bytes)
            record = parse(record, str(path))
        except UnknownSigner as error:      # its key may not have synced yet: no verdict, read again next time
            warn_once(f"{path}: speaks for {signer!r}, whose public key is not known yet; not read until it is "
                      f"({error})")
            return None
        except RejectedFile as error:
            _remember(self._bad, path, version)
            self.reject(path, error)
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:      # a Drive hiccup: as if the file were not there yet
            log.info("%s not readable now (%s); the next poll tries again", path, exc.strerror or exc)
            return None
        _remember(self._cache, path, (version, record))
        return record

    def wait_for_peers(self, round_: int, peers: set[str], timeout_s: float,
                       stop: threading.Event) -> dict[str, list[RolloutGroup]]:
        """Bounded wait until every expected peer published this round; then whatever arrived."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.peer_rollouts(round_, peers)
            missing = peers - set(found)
            if not missing or stop.is_set() or time.monotonic() >= deadline:
                if missing and not stop.is_set():
                    log.info("round %d: waited %.0fs, going on without %s", round_, timeout_s, sorted(missing))
                return found
            self.doorbell.wait(POLL_S)

    def write_heartbeat(self, heartbeat: Heartbeat) -> None:
        write_json_atomic(self.folder.heartbeat_file(self.node), self.key.sign(heartbeat.to_json()))

    def read_heartbeats(self) -> dict[str, Heartbeat]:
        return read_heartbeats(self.folder, self.keyring, self.reject, self._beats)

    def finished(self) -> SwarmFinished | None:
        """The coordinator's finished.json, when it is there and signed by the coordinator."""
        return self.read_record(self.folder.finished_file, SwarmFinished.from_json, signer=COORDINATOR)

    def round_state(self, round_: int) -> RoundState | None:
        """The coordinator's signed state of `round_`, or None as read_record says."""
        return self.read_record(self.folder.round_state_file(round_), round_state_parser(round_), signer=COORDINATOR)


def read_signed(path: Path, signer: str, keyring: KeyRing, max_bytes: int = MAX_RECORD_BYTES) -> dict[str, Any]:
    """A record of the folder that counts only as `signer`'s: checksum, then signature under its pinned key.
    Raises as read_json_bounded, and RejectedFile (UnknownSigner while `signer` has no key) when not its."""
    return keyring.verify(read_json_bounded(path, max_bytes, require_checksum=True), signer, str(path))


def round_state_parser(round_: int) -> Callable[[dict[str, Any], str], RoundState]:
    """RoundState.from_json for the state file of `round_`: RejectedFile when it says another round."""
    def parse(record: dict[str, Any], where: str) -> RoundState:
        state = RoundState.from_json(record, where)
        if state.round != round_:
            raise RejectedFile(f"{where}: says round {state.round}, which its name contradicts; skipped")
        return state
    return parse


def read_round_state(folder: ExperimentFolder, keyring: KeyRing, round_: int) -> RoundState:
    """The coordinator's signed state of `round_`; raises as read_signed, and RejectedFile when its round is
    not the one its name says."""
    path = folder.round_state_file(round_)
    return round_state_parser(round_)(read_signed(path, COORDINATOR, keyring), str(path))


def newest_round_state(read: Callable[[int], RoundState | None], rounds: list[int],
                       at_least: int = 1) -> RoundState | None:
    """The newest round state >= at_least that `read` accepts (a signed one), among the NEWEST_LOOKED newest
    listed, else round `at_least` itself: forged later rounds, however many, cost a bounded number of reads
    and never hide the round a reader waits for (the coordinator writes its rounds in order, one by one)."""
    candidates = [r for r in reversed(rounds) if r >= at_least][:NEWEST_LOOKED]
    for round_ in candidates:
        state = read(round_)
        if state is not None:
            return state
    return read(at_least) if at_least in rounds and at_least not in candidates else None


def signed_round_state(folder: ExperimentFolder, keyring: KeyRing, round_: int) -> RoundState | None:
    """The coordinator's signed state of `round_`; None when missing or not the coordinator's (warned about once,
    unless no coordinator key is published yet); OSError for a Drive hiccup."""
    try:
        return read_round_state(folder, keyring, round_)
    except (RejectedFile, FileNotFoundError) as error:
        if isinstance(error, RejectedFile) and not isinstance(error, UnknownSigner):
            warn_skipped(folder.round_state_file(round_), error)
        return None


def newest_signed_round(folder: ExperimentFolder, keyring: KeyRing) -> RoundState | None:
    """The newest round the coordinator started (signed), or None before round 1; OSError for a Drive hiccup."""
    return newest_round_state(lambda round_: signed_round_state(folder, keyring, round_), folder.state_rounds())


def read_finished(folder: ExperimentFolder, keyring: KeyRing) -> SwarmFinished | None:
    """The coordinator's signed finished.json; None when it is missing, unreadable now, or not the coordinator's
    (warned about once)."""
    path = folder.finished_file
    try:
        return SwarmFinished.from_json(read_signed(path, COORDINATOR, keyring, SMALL_RECORD_BYTES), str(path))
    except FileNotFoundError:
        return None
    except RejectedFile as error:
        warn_skipped(path, error)
        return None
    except OSError as exc:
        log.info("%s not readable now (%s)", path, exc.strerror or exc)
        return None


def _remember(store: dict[Path, Any], path: Path, value: Any, keep: int | None = None) -> None:
    """Store `value` as the newest entry; past `keep` (MAX_REMEMBERED) entries the oldest is dropped."""
    store.pop(path, None)
    store[path] = value
    while len(store) > (keep or MAX_REMEMBERED):
        del store[next(iter(store))]


def read_heartbeats(folder: ExperimentFolder, keyring: KeyRing,
                    on_reject: Callable[[Path, RejectedFile], None] | None = None,
                    known: dict[Path, tuple[bytes, Any, Heartbeat]] | None = None) -> dict[str, Heartbeat]:
    """Every node's latest valid heartbeat in peers/, signed by that node; a bad or forged one goes to
    `on_reject` (default: warned about once), one of a node with no published key yet is skipped. `known`
    keeps the beats accepted by their exact bytes: a file read again unchanged is not verified again.

    Raises OSError when the Drive would not list or read them all, even after quick retries: a partial
    answer would look like nodes that left, which the coordinator would stop waiting for.
    """
    beats: dict[str, Heartbeat] = {}
    peers_dir = folder.peers_dir
    listing = with_retries(lambda: list_folder(peers_dir, "*.json"), f"listing {peers_dir}", attempts=3,
                           first_wait_s=0.05)
    for path in listing:
        try:
            data = with_retries(lambda p=path: read_whole(p, SMALL_RECORD_BYTES), f"reading {path}", attempts=3,
                                first_wait_s=0.05, retry_missing=False)
            beat = _heartbeat(path, data, keyring, known)
        except FileNotFoundError:
            continue        # gone, or not synced yet
        except UnknownSigner as error:      # its key may not have synced yet: no verdict
            warn_skipped(path, error)
            continue
        except RejectedFile as error:
            (on_reject or warn_skipped)(path, error)
            continue
        beats[beat.node] = beat
    return beats


def _heartbeat(path: Path, data: bytes, keyring: KeyRing,
               known: dict[Path, tuple[bytes, Any, Heartbeat]] | None) -> Heartbeat:
    """The heartbeat in `data`, read from `path`: checksum, signature of the node its name says, fields. The same
    bytes as a beat accepted before under the key still pinned are that beat: a worker reads its peers' beats each
    round, most of them unchanged since (~0.2 ms each to parse and verify again)."""
    node = path.stem
    seen = None if known is None else known.get(path)
    if seen is not None and seen[0] == data and seen[1] is keyring.pinned(node):
        return seen[2]
    record = sealed_record(data, path, require_checksum=True)
    beat = Heartbeat.from_json(keyring.verify(record, node, str(path)), str(path))
    if beat.node != node:
        raise RejectedFile(f"{path}: the heartbeat of {beat.node!r}, which its name contradicts; skipped")
    if known is not None and (pinned := keyring.pinned(node)) is not None:
        _remember(known, path, (data, pinned, beat))
    return beat


def liveness(beat: Heartbeat, peer_timeout: float, now: float | None = None) -> str:
    """"alive", "late" (no heartbeat for a quarter of PEER_TIMEOUT: still waited for) or "gone" (none for
    PEER_TIMEOUT, or it said it stopped: rounds no longer wait for it).

    Under a slow Drive every heartbeat arrives late by the sync lag, so "late" is a warning, not a verdict.
    """
    age = beat.age(now)
    if beat.status in Status.TERMINAL or age >= peer_timeout:
        return "gone"
    return "late" if age >= peer_timeout / 4 else "alive"


def live_workers(beats: dict[str, Heartbeat], peer_timeout: float, now: float | None = None) -> set[str]:
    """Workers that are alive or late: those a round waits for."""
    return {b.node for b in beats.values() if b.role == "worker" and liveness(b, peer_timeout, now) != "gone"}


class Outbox:
    """This node's writes the folder refused, kept in order and tried again before anything newer.

    A round's metrics line, evaluation and rewards file ("done" mark) must land in that order; while the
    Drive is down they wait here and the worker goes on training, so no result is lost and none is
    written out of order. Bounded: past MAX_WAITING writes the folder is treated as gone for good.
    """

    MAX_WAITING = 1000        # three writes a round: over 300 rounds without a working folder

    def __init__(self) -> None:
        self._waiting: deque[tuple[str, Callable[[], None]]] = deque()
        self.trouble: str | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def send(self, what: str, write: Callable[[], None]) -> bool:
        """Queue one write behind the waiting ones and try them all; True when nothing is left waiting."""
        self.keep(what, write)
        return self.flush()

    def keep(self, what: str, write: Callable[[], None]) -> None:
        """Queue a write that just failed its own retries, to be tried again with the next ones."""
        if len(self._waiting) >= self.MAX_WAITING:
            raise OSError(f"{len(self._waiting)} writes have waited for the shared folder; giving up on it "
                          f"(the worker restarts from its last checkpoint once the folder works)")
        self._waiting.append((what, write))

    def flush(self, attempts: int = 4) -> bool:
        """Write what waits, oldest first, each with up to `attempts` tries; True when nothing is left."""
        while self._waiting:
            what, write = self._waiting[0]
            try:
                with_retries(write, what, attempts=attempts)
            except OSError as exc:
                self.trouble = (f"{len(self._waiting)} write(s) waiting for the folder ({what}: "
                                f"{exc.strerror or exc}); training goes on")
                log.warning("%s", self.trouble)
                return False
            self._waiting.popleft()
        self.trouble = None
        return True
