"""The shared-folder exchange of one node: heartbeats, publishing rollouts, and reading peers' rollouts."""

import logging
import re
import threading
import time
from pathlib import Path

from workers.folder import ExperimentFolder, RejectedFile, read_json_bounded, with_retries, write_json_atomic
from workers.protocol import Heartbeat, RolloutFile, RolloutGroup

log = logging.getLogger(__name__)

ROLLOUT_NAME = re.compile(r"^(?P<node>[A-Za-z0-9][A-Za-z0-9._-]{0,63}?)(?:\.part(?P<part>\d{1,4}))?\.json$")
POLL_S = 0.2
TERMINAL = ("stopped", "done", "failed", "crashed")     # heartbeat statuses of a node that will publish no more


class Exchange:
    """Reads are cached per file and bad files are warned about once, then only counted."""

    def __init__(self, folder: ExperimentFolder, node: str):
        self.folder = folder
        self.node = node
        self.rejected: set[Path] = set()
        self._cache: dict[Path, tuple[float, RolloutFile]] = {}

    def reject(self, path: Path, error: RejectedFile) -> None:
        if path not in self.rejected:
            self.rejected.add(path)
            log.warning("rejected %s", error)

    def reject_group(self, where: str, why: str) -> None:
        """A well-formed file with a group this worker cannot use: warned about once per group."""
        key = Path(where)
        if key not in self.rejected:
            self.rejected.add(key)
            log.warning("rejected %s: %s; skipped", where, why)

    def publish_rollouts(self, round_: int, stage: int, groups: list[RolloutGroup], part: int | None = None) -> Path:
        record = RolloutFile(node=self.node, round=round_, stage=stage, created_at=time.time(), groups=tuple(groups))
        path = self.folder.rollout_file(round_, stage, self.node, part)
        with_retries(lambda: write_json_atomic(path, record.to_json()), f"publishing {path.name}")
        return path

    def peer_rollouts(self, round_: int, stage: int = 0) -> dict[str, list[RolloutGroup]]:
        """Every valid group other nodes published for this round and stage, by node."""
        found: dict[str, list[RolloutGroup]] = {}
        directory = self.folder.rollout_dir(round_, stage)
        try:
            listing = sorted(directory.iterdir()) if directory.is_dir() else []
        except OSError as exc:     # a Drive listing that fails is a round with no peers yet, not a crash
            log.warning("could not list %s: %s", directory, exc)
            return found
        for path in listing:
            match = ROLLOUT_NAME.match(path.name)
            if path.name.startswith(".") or match is None:
                continue
            if match["node"] == self.node or path in self.rejected:
                continue
            record = self._read(path)
            if record is None:
                continue
            if record.node != match["node"] or record.round != round_ or record.stage != stage:
                self.reject(path, RejectedFile(f"{path}: names node {record.node!r} round {record.round} stage "
                                               f"{record.stage}, which its path contradicts; skipped"))
                continue
            found.setdefault(record.node, []).extend(record.groups)
        return found

    def _read(self, path: Path) -> RolloutFile | None:
        try:
            mtime = path.stat().st_mtime
            cached = self._cache.get(path)
            if cached and cached[0] == mtime:
                return cached[1]
            record = RolloutFile.from_json(read_json_bounded(path), str(path))
        except FileNotFoundError:
            return None
        except RejectedFile as error:
            self.reject(path, error)
            return None
        self._cache[path] = (mtime, record)
        return record

    def wait_for_peers(self, round_: int, peers: set[str], timeout_s: float, stop: threading.Event,
                       stage: int = 0) -> dict[str, list[RolloutGroup]]:
        """Bounded wait until every expected peer published this round; then whatever arrived."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.peer_rollouts(round_, stage)
            missing = peers - set(found)
            if not missing or stop.is_set() or time.monotonic() >= deadline:
                if missing and not stop.is_set():
                    log.info("round %d: waited %.0fs, going on without %s", round_, timeout_s, sorted(missing))
                return found
            stop.wait(POLL_S)

    def write_heartbeat(self, heartbeat: Heartbeat) -> None:
        write_json_atomic(self.folder.heartbeat_file(self.node), heartbeat.to_json())

    def read_heartbeats(self) -> dict[str, Heartbeat]:
        return read_heartbeats(self.folder, self.reject)


def read_heartbeats(folder: ExperimentFolder, on_reject=None) -> dict[str, Heartbeat]:
    """Every node's latest valid heartbeat in peers/."""
    beats: dict[str, Heartbeat] = {}
    peers_dir = folder.root / "peers"
    if not peers_dir.is_dir():
        return beats
    for path in peers_dir.glob("*.json"):
        if path.name.startswith("."):
            continue
        try:
            beat = Heartbeat.from_json(read_json_bounded(path, max_bytes=64 * 1024), str(path))
        except FileNotFoundError:
            continue
        except RejectedFile as error:
            if on_reject is not None:
                on_reject(path, error)
            continue
        if beat.node == path.stem:
            beats[beat.node] = beat
    return beats


def live_workers(beats: dict[str, Heartbeat], peer_timeout: float, now: float | None = None) -> set[str]:
    """Workers whose heartbeat is recent and who have not said they stopped."""
    now = time.time() if now is None else now
    return {b.node for b in beats.values()
            if b.role == "worker" and b.age(now) < peer_timeout and b.status not in TERMINAL}
