"""The coordinator: a thread that starts rounds by writing one write-once state file per round.

A round r ends when every live worker has written rewards/round_r/<node>.json, or when
COORDINATOR_ROUND_INTERVAL seconds have passed and at least one has (an empty round teaches nothing,
so a swarm with no working worker waits instead of racing to MAX_ROUNDS).

A Drive call that fails is retried, then tried again on the next poll; only a state folder that cannot
be listed at all on resume stops the coordinator.
"""

import logging
import shutil
import threading
import time
from typing import Any, Callable

from configs_env import SwarmConfig
from workers.shared_folder import storage
from workers.shared_folder.archive import archive_folder, finish_killed_archiving
from workers.shared_folder.exchange import Exchange, live_workers, liveness, read_round_state
from workers.shared_folder.folder import ExperimentFolder, round_number
from workers.shared_folder.json_records import write_json_atomic, write_json_create_only
from workers.shared_folder.rejections import FolderError, RejectedFile
from workers.shared_folder.retries import with_retries
from workers.shared_folder.safe_io import list_folder
from workers.shared_folder.protocol import Heartbeat, RoundState, Status, SwarmFinished
from workers.shared_folder.signing import COORDINATOR, KeyRing, NodeKey

log = logging.getLogger(__name__)

POLL_S = 0.1
# In an object store a poll is a billed LIST request: this host's workers ring the doorbell when they finish, so
# the poll only has to catch the workers of other machines, and half a second late is a small part of their round
STORE_POLL_S = 0.5
HEARTBEAT_S = 2.0
# The heartbeats are read at most this often. A round's end asked for them up to three times, and the liveness
# events once more, and on an object store each read is a listing plus a HEAD and a GET per heartbeat: most of a
# hand-off between rounds. The price: a worker that stops (its last beat says so) is let go up to a second later.
LIVENESS_READ_S = 1.0


class Coordinator(threading.Thread):
    def __init__(self, cfg: SwarmConfig, folder: ExperimentFolder, stop: threading.Event,
                 local_workers: Callable[[], set[str]], key: NodeKey, keyring: KeyRing | None = None,
                 on_event: Callable[[str], None] = lambda _: None):
        super().__init__(name="coordinator", daemon=True)
        self.cfg, self.folder, self.stop = cfg, folder, stop
        self.local_workers = local_workers
        self.on_event = on_event
        self.round = 0
        self.run_first_round = 1           # set on resume: the round this run begins with
        self.round_started = time.monotonic()
        self.finished = threading.Event()
        self.error: BaseException | None = None
        # signs the round states, finished.json and its heartbeat; validated, cached reads of the rewards files
        self.exchange = Exchange(folder, COORDINATOR, key, keyring)
        self._beat = Heartbeat.first(COORDINATOR, "coordinator", Status.RUNNING)
        self._last_beat = 0.0
        self._liveness: dict[str, tuple[str, str]] = {}    # worker: (alive / late / gone, process instance)
        self._beats: tuple[float, dict[str, Heartbeat]] | None = None    # when the heartbeats were read, and them
        self._done: tuple[int, set[str]] = (0, set())        # a round, and its nodes already seen done

    @property
    def instance(self) -> str:
        """Its heartbeat's instance id: a coordinator heartbeat with another is of a run before this one."""
        return self._beat.instance

    def run(self) -> None:
        try:
            finish_killed_archiving(self.cfg.gdrive_path, self.archive)
            self._resume()
            poll_s = STORE_POLL_S if storage.mounted(self.folder.state_dir) is not None else POLL_S
            while not self.stop.is_set() and not self.finished.is_set():
                if self._heartbeat():
                    self._announce_liveness()
                try:
                    if self.round == 0:
                        self._start_round(1, "start")
                    else:
                        self._maybe_advance()
                except OSError as exc:     # a Drive hiccup: nothing changed, the next poll decides again
                    log.warning("round %d: the folder failed (%s); trying again", self.round, exc)
                self.exchange.doorbell.wait(poll_s)      # a worker's rewards file rings it
            self._heartbeat(status=Status.DONE if self.finished.is_set() else Status.STOPPED, force=True)
        except BaseException as exc:  # the supervisor reports it and stops the swarm
            log.exception("coordinator failed")
            self.error = exc

    def _resume(self) -> None:
        """Continue at the newest round with a state file of its own; with none, the loop starts round 1."""
        keyring = self.exchange.keyring
        for round_ in reversed(with_retries(self.folder.state_rounds, f"listing {self.folder.root / 'state'}")):
            path = self.folder.round_state_file(round_)
            try:
                with_retries(lambda r=round_: read_round_state(self.folder, keyring, r), f"reading {path}")
            except (RejectedFile, FileNotFoundError) as error:   # half-synced, forged or gone: not a round to resume at
                log.warning("%s", error)
                continue
            self.round, self.run_first_round = round_, round_ + 1
            self.on_event(f"coordinator resumes at round {self.round}")
            return

    @property
    def archive(self) -> tuple[str, ...]:
        """Where retired rounds' rollouts go, below GDRIVE_PATH (ROLLOUT_ARCHIVE_OLD)."""
        return ("archives", self.cfg.experiment_name, "rollouts")

    def done_nodes(self, round_: int) -> set[str]:
        """Nodes whose intact rewards file marks this round done (a half-synced or forged one is skipped)."""
        if self._done[0] != round_:
            self._done = (round_, set())
        done = self._done[1]          # a node seen done stays done: its file is not read again at every poll
        for path in list_folder(self.folder.reward_file(round_, "x").parent, "*.json"):
            if path.stem in done:
                continue
            def parse(record: dict[str, Any], where: str, node: str = path.stem) -> str:
                if record.get("node") != node or record.get("round") != round_:
                    raise RejectedFile(f"{where}: names node {record.get('node')!r} round {record.get('round')!r}, "
                                       "which its path contradicts; skipped")
                return node
            node = self.exchange.read_record(path, parse, signer=path.stem)
            if node is not None:
                done.add(node)
        return set(done)

    def expected_nodes(self) -> set[str]:
        """Workers this swarm waits for: local processes that are up, and remote nodes with a fresh heartbeat."""
        return live_workers(self._heartbeats(), self.cfg.peer_timeout) | self.local_workers()

    def _heartbeats(self) -> dict[str, Heartbeat]:
        now = time.monotonic()
        if self._beats is None or now - self._beats[0] >= LIVENESS_READ_S:
            self._beats = (now, self.exchange.read_heartbeats())
        return self._beats[1]

    def _maybe_advance(self) -> None:
        done = self.done_nodes(self.round)
        if not done:
            return
        waited = time.monotonic() - self.round_started
        expected = self.expected_nodes()
        if expected <= done:
            self._advance("all workers done", expected)
        elif waited >= self.cfg.coordinator_round_interval:
            self.on_event(f"round {self.round}: interval of {self.cfg.coordinator_round_interval:.0f}s reached, "
                          f"going on without {', '.join(sorted(expected - done))}")
            self._advance("interval", expected)

    def _advance(self, reason: str, expected: set[str]) -> None:
        if self.round >= self.cfg.max_rounds:
            record = self.exchange.key.sign(SwarmFinished(rounds=self.round, finished_at=time.time()).to_json())
            with_retries(lambda: write_json_atomic(self.folder.finished_file, record), "writing finished.json")
            self.finished.set()
            self.on_event(f"all {self.round} rounds done")
            return
        self._start_round(self.round + 1, reason, expected)

    def _start_round(self, round_: int, reason: str, expected: set[str] | None = None) -> None:
        expected = self.expected_nodes() if expected is None else expected
        state = RoundState(round=round_, max_rounds=self.cfg.max_rounds, started_at=time.time(), reason=reason,
                           nodes=tuple(sorted(expected)), run_first_round=self.run_first_round)
        self._write_round_state(state)
        self.exchange.doorbell.ring()        # the workers of this host start the round now, not at their next poll
        self.round = round_
        self.round_started = time.monotonic()
        self._heartbeat(force=True)
        if self.cfg.rollout_cleanup_enabled:
            self.retire_old_rollouts()

    def _write_round_state(self, state: RoundState) -> None:
        """Create-only (S3 If-None-Match, a hard link in a folder): a second coordinator of the experiment never
        overwrites a round the first started; FolderError when another one started this round."""
        path = self.folder.round_state_file(state.round)
        signed = self.exchange.key.sign(state.to_json())
        if with_retries(lambda: write_json_create_only(path, signed), f"writing {path.name}"):
            return
        try:
            held = with_retries(lambda: read_round_state(self.folder, self.exchange.keyring, state.round),
                                f"reading {path.name}", retry_missing=False)
        except RejectedFile as error:
            # not signed by this experiment's coordinator key (a forgery, a half-synced file): no round, so
            # replaced, as the workers skip it too
            log.warning("%s; replaced by this coordinator's round %d", error, state.round)
            with_retries(lambda: write_json_atomic(path, signed), f"writing {path.name}")
            return
        if held != state:       # equal: this coordinator's own write, acknowledged too late and retried
            raise FolderError(f"{path}: round {state.round} was already started by another coordinator of experiment "
                              f"{self.cfg.experiment_name!r}: stop the other `rl-swarm up` of this experiment, then "
                              "run this one again to resume")

    def retire_old_rollouts(self) -> None:
        """Delete or archive rollouts of rounds older than the last N; only the coordinator does this.

        One round more than asked is kept, because a worker the interval left behind may still be
        reading the previous round while this one starts.
        """
        oldest_kept = self.round - self.cfg.rollout_keep_last_n_rounds
        try:
            rounds = list_folder(self.folder.rollouts_dir, "round_*")
        except OSError as exc:   # a Drive hiccup: the next round tries again
            log.warning("could not list old rollouts: %s", exc)
            return
        for path in rounds:
            number = round_number(path.name)
            if number is None or number >= oldest_kept:
                continue
            try:
                if (where := storage.mounted(path)) is not None:     # in a bucket: deleted (config forbids archiving)
                    where[0].delete(where[1])
                elif path.is_symlink():        # planted: the link goes, never what it points to
                    path.unlink()
                elif self.cfg.rollout_archive_old:
                    archive_folder(path, self.cfg.gdrive_path, self.archive)
                else:
                    shutil.rmtree(path)
            except (OSError, RejectedFile) as exc:   # a Drive hiccup, or a file planted in the archive's way
                log.warning("could not retire %s: %s", path, exc)

    def _announce_liveness(self) -> None:
        """An event each time a worker turns late, gone, or alive again (not for its first heartbeat)."""
        try:
            beats = self._heartbeats()
        except OSError as exc:      # a Drive hiccup: the next beat looks again
            log.info("liveness not checked: %s", exc)
            return
        for node, beat in sorted(beats.items()):
            if beat.role != "worker":
                continue
            now = liveness(beat, self.cfg.peer_timeout)
            before, instance = self._liveness.get(node, (None, beat.instance))
            self._liveness[node] = (now, beat.instance)
            if before is None or before == now:     # first seen (a resumed swarm's old beats too), or no change
                continue
            if now == "gone" and beat.status in (Status.DONE, Status.STOPPED):     # a normal exit, not news
                continue
            if before == "gone" and instance != beat.instance:          # a new process: the supervisor said so
                continue
            if now == "late":
                self.on_event(f"{node} is late: no heartbeat for {beat.age():.0f}s (gone after "
                              f"{self.cfg.peer_timeout:.0f}s)")
            elif now == "gone":
                why = (f"it says {beat.status}" if beat.status in Status.TERMINAL
                       else f"no heartbeat for {beat.age():.0f}s")
                self.on_event(f"{node} is gone ({why}): rounds no longer wait for it")
            else:
                self.on_event(f"{node} is alive again")

    def _heartbeat(self, status: str = Status.RUNNING, force: bool = False) -> bool:
        """Write the coordinator's own heartbeat every HEARTBEAT_S; True when it was time to."""
        now = time.monotonic()
        if not force and now - self._last_beat < HEARTBEAT_S:
            return False
        self._last_beat = now
        self._beat = Heartbeat(**{**self._beat.__dict__, "status": status, "round": self.round,
                                  "updated_at": time.time(), "rejected": self.exchange.rejected,
                                  "rejected_names": self.exchange.rejected_names})
        try:
            self.exchange.write_heartbeat(self._beat)
        except OSError as exc:   # a missed beat is harmless: the next one is 2 s away, PEER_TIMEOUT is minutes
            log.warning("coordinator heartbeat not written: %s", exc)
        return True
