"""What the dashboard shows, read from the shared folder (and, in the supervisor, from its own processes).

`rl-swarm status` uses the same reader with no processes, so any machine that mounts the folder sees
the same table the supervisor draws.
"""

import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Iterable

from configs_env import SwarmConfig
from swarm_supervisor.dashboard import NodeRow, SwarmView
from swarm_supervisor.monitor import MonitorSnapshot
from workers.evaluation import HeldOutTrend, eval_file, held_out_trend, read_held_out
from workers.shared_folder.exchange import liveness, read_heartbeats
from workers.shared_folder.folder import ExperimentFolder, RejectedFile, read_json_bounded, warn_skipped
from workers.shared_folder.jsonl import read_jsonl, read_jsonl_tail
from workers.shared_folder.protocol import Heartbeat, RoundMetrics, RoundState

log = logging.getLogger(__name__)

TREND = 8
METRICS_CHUNK = 1024 * 1024      # bytes of a metrics log read a refresh: a long log is caught up over a few
# reward collapse: the mean of the last REWARD_WINDOW rounds under REWARD_COLLAPSE x the best such mean so far
# (only once that best reached REWARD_FLOOR: a node that never earned reward has nothing to lose)
REWARD_WINDOW, REWARD_COLLAPSE, REWARD_FLOOR = 20, 0.5, 0.2


class RewardWatch:
    """A node's rolling mean reward against its best rolling mean."""

    def __init__(self) -> None:
        self.window: deque[float] = deque(maxlen=REWARD_WINDOW)
        self.best: float | None = None

    def add(self, reward: float) -> None:
        self.window.append(reward)
        if len(self.window) == REWARD_WINDOW:
            mean = sum(self.window) / REWARD_WINDOW
            self.best = mean if self.best is None else max(self.best, mean)

    def collapsed(self) -> bool:
        if self.best is None or self.best < REWARD_FLOOR or len(self.window) < REWARD_WINDOW:
            return False
        return sum(self.window) / REWARD_WINDOW < REWARD_COLLAPSE * self.best

    def warning(self, node: str) -> str | None:
        if not self.collapsed():
            return None
        return (f"{node}: reward collapsed to {sum(self.window) / REWARD_WINDOW:.3f} over the last {REWARD_WINDOW} "
                f"rounds, from {self.best:.3f} at its best; its best model is in checkpoints/{node}/best/")


def learning_alarm(trend: HeldOutTrend, rewards: RewardWatch | None) -> str | None:
    """The few words the table shows when a node unlearns."""
    if trend.falling and trend.newest is not None and trend.best is not None:
        return f"held-out falling: {trend.newest:.0%}, best {trend.best:.0%}"
    if rewards is not None and rewards.collapsed():
        return "reward collapsed"
    return None


class SwarmReader:
    """Reads metrics incrementally (new lines only) so a refresh several times a second stays cheap.

    A read the Drive fails shows the last good answer; the next refresh, a fraction of a second later, reads again.
    """

    def __init__(self, folder: ExperimentFolder, cfg: SwarmConfig, model_label: str, device_label: str):
        self.folder, self.cfg = folder, cfg
        self.model_label, self.device_label = model_label, device_label
        self._offsets: dict[str, int] = {}
        self._refused: set[Path] = set()      # metrics paths that hold no regular file
        self.latest: dict[str, RoundMetrics] = {}
        self.trends: dict[str, deque[float]] = {}
        self.rejected = 0
        self._first_round: tuple[int, float] | None = None
        self._beats: dict[str, Heartbeat] = {}
        self._rounds: list[int] = []
        self._intact_rounds: set[int] = set()
        self._held_out: dict[str, tuple[int, HeldOutTrend]] = {}   # node: (file size, trend)
        self.rewards: dict[str, RewardWatch] = {}

    def _read_new_metrics(self, node: str) -> None:
        path = self.folder.metrics_file(node)
        try:
            lines = read_jsonl_tail(path, self._offsets.get(node, 0), RoundMetrics.from_json, METRICS_CHUNK)
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
                self.rewards.setdefault(node, RewardWatch()).add(row.reward_mean)

    def held_out(self, node: str) -> HeldOutTrend:
        """The node's held-out accuracy: start, best, newest; the file is re-read when it grows."""
        path = eval_file(self.folder, node)
        cached = self._held_out.get(node)
        try:
            size = path.stat().st_size
            if cached is None or cached[0] != size:
                rows, _ = read_held_out(path)
                if rows or not size:     # no row of a non-empty file: not synced yet or a Drive hiccup, read again
                    cached = self._held_out[node] = (size, held_out_trend(rows))
        except OSError:      # not written yet, or a Drive hiccup: the last answer stands until the next refresh
            pass
        return cached[1] if cached else HeldOutTrend()

    def heartbeats(self) -> dict[str, Heartbeat]:
        try:
            self._beats = read_heartbeats(self.folder)
        except OSError as exc:
            log.warning("heartbeats not read (%s); showing the last ones", exc)
        return self._beats

    def last_error(self, node: str) -> str | None:
        beat = self.heartbeats().get(node)
        return beat.last_error if beat else None

    def state_rounds(self) -> list[int]:
        try:
            self._rounds = self.folder.state_rounds()
        except OSError as exc:
            log.warning("round states not listed (%s); showing the last listing", exc)
        return self._rounds

    def current_round(self) -> int:
        """The newest round with an intact state file: a half-synced or hostile round_000099.json is no round."""
        for round_ in reversed(self.state_rounds()):
            if round_ in self._intact_rounds:
                return round_
            path = self.folder.round_state_file(round_)
            try:
                RoundState.from_json(read_json_bounded(path, require_checksum=True), str(path))
            except (RejectedFile, OSError):
                continue
            self._intact_rounds.add(round_)
            return round_
        return 0

    def _timing(self, round_: int) -> tuple[float, float | None, float | None]:
        """Elapsed seconds, rounds per hour and ETA, from the round state files' timestamps."""
        rounds = self.state_rounds()
        if not rounds:
            return 0.0, None, None
        if self._first_round is None or self._first_round[0] != rounds[0]:
            path = self.folder.round_state_file(rounds[0])
            try:
                first = RoundState.from_json(read_json_bounded(path, require_checksum=True), str(path))
                self._first_round = (first.round, first.started_at)
            except (RejectedFile, OSError):
                return 0.0, None, None
        elapsed = max(0.0, time.time() - self._first_round[1])
        done = max(0, round_ - self._first_round[0])
        if done == 0 or elapsed <= 0:
            return elapsed, None, None
        per_hour = done / elapsed * 3600
        eta = max(0, self.cfg.max_rounds - round_) / per_hour * 3600
        # a forged start time of -1e308 makes the rate tiny and the ETA infinite: no ETA rather than a crash
        return elapsed, per_hour, eta if math.isfinite(eta) else None

    def view(self, handles: Iterable = (), snapshot: MonitorSnapshot | None = None, events: Iterable[str] = (),
             started: float | None = None, coordinator_round: int | None = None) -> SwarmView:
        beats = self.heartbeats()
        handles = list(handles)
        nodes = [h.node for h in handles] + sorted(n for n, b in beats.items()
                                                   if b.role == "worker" and n not in {h.node for h in handles})
        rows = []
        coordinator = beats.get("coordinator")
        if coordinator is not None:
            rows.append(NodeRow(node_id="coordinator", role="coordinator", status=coordinator.status,
                                round=coordinator.round, stage=None, reward=None, accuracy=None, reward_trend=(),
                                local_rollouts=None, external_rollouts=None, gpu_mib=None, ram_mib=None,
                                restarts=0, heartbeat_age_s=coordinator.age(), last_error=coordinator.last_error))
        by_node = {h.node: h for h in handles}
        for node in nodes:
            self._read_new_metrics(node)
            rows.append(self._row(node, beats.get(node), by_node.get(node), snapshot))
        round_ = coordinator_round or self.current_round()
        elapsed, per_hour, eta = self._timing(round_)
        return SwarmView(experiment=self.cfg.experiment_name, model=self.model_label, device_label=self.device_label,
                         round=round_, max_rounds=self.cfg.max_rounds, elapsed_s=elapsed, rounds_per_hour=per_hour,
                         eta_s=eta, device=snapshot.device if snapshot else None, nodes=tuple(rows),
                         events=tuple(events),
                         rejected_files=self.rejected + sum(b.rejected for b in beats.values()))

    def _row(self, node: str, beat, handle, snapshot: MonitorSnapshot | None) -> NodeRow:
        metrics = self.latest.get(node)
        status = beat.status if beat else "starting"
        if handle is not None:
            if handle.failed:
                status = "failed"
            elif handle.restart_at is not None:
                status = "restarting"
            elif not handle.alive() and handle.exited_ok:
                status = beat.status if beat else "done"
        process = None
        if snapshot is not None and handle is not None and handle.process is not None:
            process = snapshot.processes.get(handle.process.pid)
        error = (handle.last_error if handle is not None and handle.last_error else None) or \
            (beat.last_error if beat else None)
        trend = self.held_out(node)
        rewards = self.rewards.get(node)
        return NodeRow(node_id=node, role="worker", status=status, round=beat.round if beat else None,
                       stage=beat.stage if beat else None,
                       reward=metrics.reward_mean if metrics else None,
                       accuracy=metrics.accuracy if metrics else None,
                       reward_trend=tuple(self.trends.get(node, ())),
                       local_rollouts=metrics.local_groups if metrics else None,
                       external_rollouts=metrics.external_groups if metrics else None,
                       gpu_mib=process.gpu_mib if process else None, ram_mib=process.rss_mib if process else None,
                       restarts=handle.total_restarts if handle is not None else 0,
                       heartbeat_age_s=beat.age() if beat else None,
                       last_error=error if status in ("failed", "crashed", "restarting") else None,
                       held_out_start=trend.start, held_out=trend.newest, held_out_best=trend.best,
                       learning_alarm=learning_alarm(trend, rewards),
                       learning_warning=trend.warning(node) or (rewards.warning(node) if rewards else None),
                       liveness=liveness(beat, self.cfg.peer_timeout) if beat else None,
                       note=beat.note if beat else None)


def read_events(folder: ExperimentFolder, last: int = 8) -> list[str]:
    """The supervisor's newest events, for `rl-swarm status`."""
    try:
        rows = list(read_jsonl(folder.events_file))
    except RejectedFile as error:
        return [str(error)]
    out = []
    for row in rows[-last:]:
        if isinstance(row.get("time"), (int, float)) and isinstance(row.get("event"), str):
            try:
                out.append(time.strftime("%H:%M:%S ", time.localtime(row["time"])) + row["event"][:200])
            except (OverflowError, OSError, ValueError):     # a time no clock shows
                warn_skipped(folder.events_file, RejectedFile(f"an event at time {row['time']!r}"))
    return out


def experiment_config(folder: ExperimentFolder) -> dict:
    try:
        return read_json_bounded(folder.config_file, max_bytes=256 * 1024)
    except (OSError, RejectedFile):
        return {}



