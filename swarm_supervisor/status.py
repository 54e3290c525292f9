"""What the dashboard shows: the view model (NodeRow, SwarmView), built from the shared folder (and, in the
supervisor, from its own processes); swarm_supervisor.dashboard only draws it.

`rl-swarm status` uses the same reader with no processes, so any machine that mounts the folder sees
the same table the supervisor draws.
"""

import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from configs_env import SwarmConfig
from swarm_supervisor.experiments import experiment_config, status_of
from swarm_supervisor.listing import experiment_folder
from swarm_supervisor.machines import RecordedSample, restarted_node
from swarm_supervisor.learning_health import RewardWatch, learning_alarm
from swarm_supervisor.monitor import DeviceSnapshot, MonitorSnapshot, ProcessSnapshot
from swarm_supervisor.pace import rounds_per_hour
from swarm_supervisor.verdicts import RememberedVerdicts
from workers.shared_folder.held_out import HeldOutTrend, eval_file, held_out_trend, read_held_out
from workers.shared_folder.exchange import liveness, newest_round_state, read_heartbeats, read_round_state
from workers.shared_folder import storage
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.rejections import RejectedFile, warn_skipped
from workers.shared_folder.safe_io import file_size
from workers.shared_folder.jsonl import read_jsonl_tail
from workers.shared_folder.protocol import Heartbeat, RoundMetrics, RoundState, Status
from workers.shared_folder.signing import KeyRing, signed_lines

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeRow:
    node_id: str
    role: str                        # "worker" or "coordinator"
    status: str                      # starting, generating, training, waiting, done, restarting, failed, stopped
    round: int | None
    reward: float | None
    accuracy: float | None           # a share, 0..1
    reward_trend: tuple[float, ...]  # the last few rounds' mean rewards, oldest first
    local_rollouts: int | None
    external_rollouts: int | None
    gpu_mib: float | None
    ram_mib: float | None
    restarts: int
    heartbeat_age_s: float | None
    last_error: str | None
    held_out_start: float | None = None   # greedy exact-match on the held-out set before round 1
    held_out: float | None = None         # the same, at the newest evaluation after round 0
    liveness: str | None = None           # alive, late or gone, from the heartbeat's age (exchange.liveness)
    note: str | None = None               # trouble the node works around (a folder refusing its writes)
    held_out_best: float | None = None    # the best evaluation so far (round 0 included)
    learning_alarm: str | None = None     # a few words when the node unlearns (held-out falling, reward collapsed)
    learning_warning: str | None = None   # the same as a sentence, for the supervisor's events
    device: str | None = None             # where the worker runs: cpu, cuda:1
    rejected: int = 0                     # files and groups of the folder it refused (its heartbeat says)
    rejected_names: tuple[str, ...] = ()  # the newest of them, by name


@dataclass(frozen=True)
class SwarmView:
    experiment: str
    model: str
    device_label: str
    round: int
    max_rounds: int
    elapsed_s: float
    rounds_per_hour: float | None    # while it ran, downtime left out (pace.rounds_per_hour)
    eta_s: float | None
    devices: tuple[DeviceSnapshot, ...]      # the GPUs the workers use; () where NVML reads none
    nodes: tuple[NodeRow, ...]
    events: tuple[str, ...]          # newest last
    rejected_files: int = 0
    phase: str = "running"           # finished, stopped, failed (experiments.status_of): no ETA but running

TREND = 8
RECORDED_FRESH_S = 30.0    # the supervisor records a monitor sample every 5 s: an older one is of a stopped swarm
MACHINES_LISTED_S = 10.0   # how often the reader looks for the supervisor folders of machines that joined
METRICS_CHUNK = 1024 * 1024      # bytes of a metrics log read a refresh: a long log is caught up over a few
# On an object store each listing is a billed request of tens of ms, and a view made 12 a second for 4 workers: a
# view asks whether a node's held-out log grew every HELD_OUT_CHECK_S there (it grows every EVAL_EVERY rounds)
HELD_OUT_CHECK_S = 10.0
class SwarmReader:
    """Reads metrics incrementally (new lines only) so a refresh several times a second stays cheap.

    A read the Drive fails shows the last good answer; the next refresh, a fraction of a second later, reads again.
    """

    def __init__(self, folder: ExperimentFolder, cfg: SwarmConfig, model_label: str, device_label: str,
                 keyring: KeyRing | None = None):
        self.folder, self.cfg = folder, cfg
        # shows what nodes signed, not what others say
        self.keyring = RememberedVerdicts(keyring or KeyRing.for_viewing(folder, cfg.cache_dir))
        self.model_label, self.device_label = model_label, device_label
        self._offsets: dict[str, int] = {}
        self._refused: set[Path] = set()      # metrics paths that hold no regular file
        self.latest: dict[str, RoundMetrics] = {}
        self.trends: dict[str, deque[float]] = {}
        self.rejected = 0
        self._beats: dict[str, Heartbeat] = {}
        self._rounds: list[int] = []
        self._states: dict[int, RoundState] = {}     # intact round states read so far (they never change)
        self._held_out: dict[str, tuple[int, HeldOutTrend]] = {}   # node: (file size, trend)
        self._held_out_checked: dict[str, float] = {}                # node: when its size was last asked (a store)
        self.rewards: dict[str, RewardWatch] = {}
        self._samples_at: dict[str | None, int] = {}  # bytes of each machine's monitor.jsonl read
        self.samples: dict[str | None, RecordedSample] = {}     # each machine's newest monitor sample
        self._events_at: dict[str | None, int] = {}   # bytes of each machine's events.jsonl read
        self.restarts: dict[str, int] = {}            # restarts the supervisors recorded, by node
        self._counted: set[str] = set()               # ids of the restart events counted
        self._joined: list[str] = []                  # NODE_IDs of machines that joined
        self._machines_listed_at = -math.inf

    def _read_recorded(self) -> None:
        """What only the supervisors measure (GPU and RAM per node, restarts), from the files they record them in,
        each machine's own: a reader without the processes (`rl-swarm status`, a notebook) shows the same table."""
        for machine in self._machines():
            self._read_machine(machine)

    def _machines(self) -> list[str | None]:
        """Each machine that keeps supervisor files: None for the coordinator's, a NODE_ID for one that joined."""
        now = time.monotonic()
        if now - self._machines_listed_at >= MACHINES_LISTED_S:
            try:
                self._joined = self.folder.joined_machines()
                self._machines_listed_at = now
            except OSError as exc:      # a Drive hiccup: the machines known so far, listed again next refresh
                log.debug("supervisor folders not listed: %s", exc)
            known = {None, *self._joined}      # what a machine no longer listed left behind goes
            for kept in (self._samples_at, self._events_at, self.samples):
                for machine in set(kept) - known:
                    del kept[machine]
        return [None, *self._joined]

    def _read_machine(self, machine: str | None) -> None:
        samples = self._read_tail(self.folder.monitor_file_of(machine), self._samples_at, machine,
                                  RecordedSample.from_json)
        if samples:
            self.samples[machine] = samples[-1].of_machine(machine)
        events = self._read_tail(self.folder.events_file_of(machine), self._events_at, machine)
        for row in events:
            node, said = restarted_node(machine, row), row.get("id")
            if node is None:
                continue
            if isinstance(said, str):       # an event written twice (a retried append) counts once
                if said in self._counted:
                    continue
                self._counted.add(said)
            self.restarts[node] = self.restarts.get(node, 0) + 1

    @staticmethod
    def _read_tail(path: Path, offsets: dict, machine: str | None, parse=lambda row, _: row) -> list:
        """The records appended to a machine's file since the last read; none while it is missing or unreadable
        (not written yet, a Drive hiccup: the next refresh reads again)."""
        try:
            lines = read_jsonl_tail(path, offsets.get(machine, 0), parse, METRICS_CHUNK)
        except (RejectedFile, OSError) as exc:
            log.debug("%s not read: %s", path, exc)
            return []
        offsets[machine] = lines.end
        return lines.records

    def _read_new_metrics(self, node: str) -> None:
        path = self.folder.metrics_file(node)
        try:
            lines = read_jsonl_tail(path, self._offsets.get(node, 0),
                                    signed_lines(RoundMetrics.from_json, node, self.keyring), METRICS_CHUNK)
        except RejectedFile as error:     # not a regular file (a planted link or FIFO): counted once
            if path not in self._refused:
                self._refused.add(path)
                self.rejected += 1
                warn_skipped(path, error)
            return
        except OSError:      # not there (or not synced) yet, or a Drive hiccup: the next refresh reads it
            return
        self._offsets[node] = lines.end
        self.rejected += len(lines.bad)
        for row in lines.records:
            last = self.latest.get(node)
            if last is None or row.round >= last.round:
                self.latest[node] = row
            if last is None or row.round > last.round:    # a line doubled by a retry, or a replayed round, once
                self.trends.setdefault(node, deque(maxlen=TREND)).append(row.reward_mean)
                signal = row.local_groups - row.zero_advantage_groups + row.external_groups
                self.rewards.setdefault(node, RewardWatch()).add(row.reward_mean, signal)

    def held_out(self, node: str) -> HeldOutTrend:
        """The node's held-out accuracy: start, best, newest; the file is re-read when it grows."""
        path = eval_file(self.folder, node)
        cached = self._held_out.get(node)
        now = time.monotonic()
        if storage.mounted(path) is not None and now - self._held_out_checked.get(node, -math.inf) < HELD_OUT_CHECK_S:
            return cached[1] if cached else HeldOutTrend()
        self._held_out_checked[node] = now
        try:
            size = file_size(path)
            if cached is None or cached[0] != size:
                rows, _ = read_held_out(path, self.keyring)
                if rows or not size:     # no row of a non-empty file: not synced yet or a Drive hiccup, read again
                    cached = self._held_out[node] = (size, held_out_trend(rows))
        except OSError:      # not written yet, or a Drive hiccup: the last answer stands until the next refresh
            pass
        return cached[1] if cached else HeldOutTrend()

    def heartbeats(self) -> dict[str, Heartbeat]:
        try:
            self._beats = read_heartbeats(self.folder, self.keyring)
        except OSError as exc:
            log.warning("heartbeats not read (%s); showing the last ones", exc)
        return self._beats

    def last_error(self, node: str, pid: int) -> str | None:
        """The error the process `pid` of `node` beat last (not one of a process before it)."""
        beat = self.heartbeats().get(node)
        return beat.last_error if beat and beat.pid == pid else None

    def state_rounds(self) -> list[int]:
        try:
            self._rounds = self.folder.state_rounds()
        except OSError as exc:
            log.warning("round states not listed (%s); showing the last listing", exc)
        return self._rounds

    def _state(self, round_: int) -> RoundState | None:
        if round_ not in self._states:
            try:
                self._states[round_] = read_round_state(self.folder, self.keyring, round_)
            except (RejectedFile, OSError):     # half-synced, forged, or a Drive hiccup: read again next time
                return None
        return self._states[round_]

    def _newest_state(self, rounds: list[int]) -> RoundState | None:
        """The newest round state the coordinator signed: a half-synced or forged round_000099.json is no round."""
        return newest_round_state(self._state, rounds)

    def _timing(self, round_: int, max_rounds: int, running: bool,
                rounds: list[int]) -> tuple[float, float | None, float | None]:
        """Elapsed seconds, rounds per hour (pace.rounds_per_hour) and ETA, from the round state files' timestamps
        (`rounds`: listed).

        A swarm that is not running is timed to its newest round, not to now: stopped a day ago, it did its
        rounds at the pace it did them, and it has no ETA.
        """
        first = self._state(rounds[0]) if rounds else None
        if first is None:
            return 0.0, None, None
        newest = self._newest_state(rounds)
        per_hour = rounds_per_hour(self._state, newest, running)
        if not running:
            finished = [row.finished_at for row in self.latest.values() if newest and row.round >= newest.round]
            end = max([newest.started_at if newest else first.started_at, *finished])
            return max(0.0, end - first.started_at), per_hour, None
        elapsed = max(0.0, time.time() - first.started_at)
        eta = max(0, max_rounds - round_) / per_hour * 3600 if per_hour else None
        # a forged start time of -1e308 makes the rate tiny and the ETA infinite: no ETA rather than a crash
        return elapsed, per_hour, eta if eta is not None and math.isfinite(eta) else None

    def view(self, handles: Iterable = (), snapshot: MonitorSnapshot | None = None, events: Iterable[str] = (),
             own_coordinator: str | None = None, coordinator_round: int | None = None) -> SwarmView:
        """The swarm now; a supervisor passes its processes (`handles`) and the instance of the coordinator it runs
        (`own_coordinator`): a heartbeat of the run before is no news of this one, which is starting."""
        beats = self.heartbeats()
        handles = list(handles)
        if not handles:
            self._read_recorded()
            snapshot = snapshot or self._recorded_snapshot()
        nodes = [h.node for h in handles] + sorted(n for n, b in beats.items()
                                                   if b.role == "worker" and n not in {h.node for h in handles})
        coordinator = beats.get("coordinator")
        starting = own_coordinator is not None and (coordinator is None or coordinator.instance != own_coordinator)
        rows = [] if coordinator is None and not starting else \
            [_coordinator_row(None if starting else coordinator, coordinator_round)]
        by_node = {h.node: h for h in handles}
        for node in nodes:
            self._read_new_metrics(node)
            rows.append(self._row(node, beats.get(node), by_node.get(node), snapshot))
        rounds = self.state_rounds()        # once a view: on a bucket a listing is a billed request
        newest = None if coordinator_round else self._newest_state(rounds)
        round_ = coordinator_round or (newest.round if newest else 0)
        # a machine that joined counts to the rounds the coordinator's states carry, not to its own MAX_ROUNDS
        max_rounds = newest.max_rounds if newest else self.cfg.max_rounds
        phase = self.phase(beats)
        if starting and phase != "finished":      # the folder still says how the run before ended
            phase = "starting"
        elapsed, per_hour, eta = self._timing(round_, max_rounds, phase == "running", rounds)
        return SwarmView(experiment=self.cfg.experiment_name, model=self.model_label, device_label=self.device_label,
                         round=round_, max_rounds=max_rounds, elapsed_s=elapsed, rounds_per_hour=per_hour,
                         eta_s=eta, devices=snapshot.devices if snapshot else (), nodes=tuple(rows),
                         events=tuple(events), phase=phase,
                         rejected_files=self.rejected + sum(b.rejected for b in beats.values()))

    def _recorded_snapshot(self) -> MonitorSnapshot | None:
        """Per node, each machine's newest sample; the GPU line, the coordinator's machine's."""
        # a sample another machine wrote reaches this one DRIVE_LAG late
        fresh = {machine: sample for machine, sample in self.samples.items()
                 if time.time() - sample.time <= RECORDED_FRESH_S + self.cfg.drive_lag}
        if not fresh:
            return None
        device, own = None, fresh.get(None)
        if own is not None and own.device_total_mib and own.device_used_mib is not None:
            device = DeviceSnapshot(name="GPU", total_mib=own.device_total_mib, used_mib=own.device_used_mib,
                                    free_mib=own.device_total_mib - own.device_used_mib, utilization_pct=None)
        processes = {node: ProcessSnapshot(pid=0, alive=True, rss_mib=rss, cpu_pct=None, gpu_mib=gpu)
                     for sample in fresh.values() for node, (gpu, rss) in sample.nodes.items()}
        # the recorded sample sums the GPUs the workers use: one line for all of them
        return MonitorSnapshot(taken_at=max(sample.time for sample in fresh.values()),
                               devices=(device,) if device is not None else (), processes=processes,
                               supervisor_cpu_pct=None, host_ram_used_mib=0.0, host_ram_total_mib=0.0)

    def phase(self, beats: dict[str, Heartbeat]) -> str:
        try:
            return status_of(self.folder, self.keyring, beats, self.cfg.drive_lag)
        except OSError as exc:     # a Drive hiccup: as if running, the next refresh asks again
            log.warning("experiment status not read (%s)", exc)
            return "running"

    def _row(self, node: str, beat, handle, snapshot: MonitorSnapshot | None) -> NodeRow:
        if handle is not None and beat is not None and (handle.process is None or beat.pid != handle.process.pid):
            beat = None      # the run before's, or a crashed process's: the process running now has not beaten yet
        metrics = self.latest.get(node)
        status = beat.status if beat else Status.STARTING
        if handle is not None:
            if handle.failed:
                status = Status.FAILED
            elif handle.restart_at is not None:
                status = Status.RESTARTING
            elif not handle.alive() and (handle.exited_ok or handle.stopped):    # over, whatever its beat last said
                status = Status.DONE if beat and beat.status == Status.DONE else Status.STOPPED
        process = None
        if snapshot is not None and handle is not None and handle.process is not None:
            process = snapshot.processes.get(handle.process.pid)
        elif snapshot is not None and handle is None:
            process = snapshot.processes.get(node)         # a recorded sample names its processes by node
        error = (handle.last_error if handle is not None and handle.last_error else None) or \
            (beat.last_error if beat else None)
        trend = self.held_out(node)
        rewards = self.rewards.get(node)
        return NodeRow(node_id=node, role="worker", status=status, round=beat.round if beat else None,
                       reward=metrics.reward_mean if metrics else None,
                       accuracy=metrics.accuracy if metrics else None,
                       reward_trend=tuple(self.trends.get(node, ())),
                       local_rollouts=metrics.local_groups if metrics else None,
                       external_rollouts=metrics.external_groups if metrics else None,
                       gpu_mib=process.gpu_mib if process else None, ram_mib=process.rss_mib if process else None,
                       restarts=handle.total_restarts if handle is not None else self.restarts.get(node, 0),
                       heartbeat_age_s=beat.age() if beat else None,
                       last_error=error if status in Status.TROUBLE or (handle and handle.stopped) else None,
                       held_out_start=trend.start, held_out=trend.newest, held_out_best=trend.best,
                       learning_alarm=learning_alarm(trend, rewards),
                       learning_warning=trend.warning(node) or (rewards.warning(node) if rewards else None),
                       liveness=liveness(beat, self.cfg.peer_timeout) if beat else None,
                       note=beat.note if beat else None,
                       rejected=beat.rejected if beat else 0, rejected_names=beat.rejected_names if beat else (),
                       device=handle.spec.device if handle is not None else beat.device if beat else None)


def _coordinator_row(beat: Heartbeat | None, round_: int | None) -> NodeRow:
    """The coordinator's row: as its heartbeat says, or starting while the one this supervisor runs has not beaten."""
    return NodeRow(node_id="coordinator", role="coordinator", status=beat.status if beat else Status.STARTING,
                   round=beat.round if beat else round_, reward=None, accuracy=None, reward_trend=(),
                   local_rollouts=None, external_rollouts=None, gpu_mib=None, ram_mib=None, restarts=0,
                   heartbeat_age_s=beat.age() if beat else None, last_error=beat.last_error if beat else None,
                   rejected=beat.rejected if beat else 0, rejected_names=beat.rejected_names if beat else ())


def folder_reader(cfg: SwarmConfig, name_others: bool = True) -> SwarmReader:
    """A reader of an experiment from its folder alone, with the model, device and MAX_ROUNDS it was started with;
    FolderError when it is not there (`name_others`: naming those that are, from a listing of them all)."""
    folder = experiment_folder(cfg, cfg.experiment_name, name_others)
    keyring = KeyRing.for_viewing(folder, cfg.cache_dir)
    recorded = experiment_config(folder, keyring)
    if isinstance(recorded.get("max_rounds"), int):
        cfg = cfg.with_overrides(max_rounds=recorded["max_rounds"])
    return SwarmReader(folder, cfg, str(recorded.get("model_resolved", "?")), str(recorded.get("device_resolved", "?")),
                       keyring)
