"""The supervisor's events: a line each for people (the dashboard shows the newest) and a record each in its
machine's events.jsonl (ExperimentFolder.events_file_of) for `status`, `experiments` and programs; and the watches
that raise them once per change (the shared folder away and back, a worker unlearning, a GPU above its memory
high-water mark).

While the shared folder cannot be written (a dropped Drive mount, a hung-up FUSE call) the records wait here, in
order, and are written when it answers again: the file keeps what happened during the outage, the outage's own
"folder is gone" first. Each record carries the time it happened, not the time it was written, and an id: a write
that failed after its bytes landed (an fsync's EIO on a FUSE mount) is written again, and readers keep one copy.
"""

import itertools
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from swarm_supervisor.monitor import MonitorSnapshot
from swarm_supervisor.status import SwarmView
from workers.shared_folder.jsonl import append_jsonl
from workers.shared_folder.mount import folder_present
from workers.shared_folder.protocol import EVENT_UNLEARNING
from workers.shared_folder.rejections import RejectedFile

log = logging.getLogger(__name__)

SHOWN = 8                 # the dashboard's newest events
# a peer that plants files without end makes an event a minute for each node that refuses them, not one a file
REFUSALS_TOLD_EVERY_S = 60.0
MAX_WAITING = 10_000      # records kept through an outage; past that the oldest go, and a record says how many


class EventJournal:
    """Events of one supervisor; `add` is called from its loop, its signal handler and the coordinator's thread."""

    def __init__(self, path: Path):
        self.path = path
        self.recent: deque[str] = deque(maxlen=SHOWN)
        self.waiting: deque[dict[str, Any]] = deque()
        self.dropped = 0                     # records lost to MAX_WAITING during a long outage
        self._told = 0                       # of those, how many a written record has reported
        # re-entrant: a signal handler's event can land while this thread changes the queue
        self._queue = threading.RLock()
        self._writing = threading.Lock()     # one writer at a time, or a record could be written twice
        self._failing = False                # the last write failed: warn once per outage, not per event
        self._ids = f"{os.getpid()}-{os.urandom(4).hex()}"
        self._numbers = itertools.count(1)    # next() is atomic: a signal handler's event gets its own number

    def add(self, message: str, level: str = "info", kind: str | None = None, node: str | None = None) -> None:
        """A line for people and, with `kind`, a fact for programs to count (restarts, failures)."""
        self.recent.append(time.strftime("%H:%M:%S ") + message)
        {"warning": log.warning, "error": log.error}.get(level, log.info)(message)
        number = next(self._numbers)
        with self._queue:
            if len(self.waiting) >= MAX_WAITING:
                self.waiting.popleft()
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("the folder has been away for over %d events: the oldest are dropped", MAX_WAITING)
            self.waiting.append({"time": time.time(), "event": message, "level": level,
                                 "id": f"{self._ids}-{number}", **({"kind": kind, "node": node} if kind else {})})
        self.flush()

    def flush(self) -> bool:
        """Write the waiting records, oldest first; False while the folder refuses them (they keep waiting), or
        while another thread writes: a record that thread's loop missed waits for the supervisor's next look at
        the folder (Watches.folder, every 2 s)."""
        if not self._writing.acquire(blocking=False):
            return False
        try:
            while True:
                with self._queue:       # first, once the folder answers, how many the outage cost
                    lost = self.dropped - self._told
                    record = self._lost_record(lost) if lost else self.waiting[0] if self.waiting else None
                if record is None:
                    break
                try:
                    append_jsonl(self.path, record)
                except (OSError, RejectedFile) as exc:      # away, hung up, or a file planted where the log goes
                    if not self._failing:
                        log.warning("events wait to be written to %s (%s); they are kept until it answers",
                                    self.path, exc)
                    self._failing = True
                    return False
                with self._queue:
                    if lost:
                        self._told += lost
                    elif self.waiting and self.waiting[0] is record:     # not dropped meanwhile for a full queue
                        self.waiting.popleft()
            if self._failing:
                log.info("events written to %s again", self.path)
            self._failing = False
            return True
        finally:
            self._writing.release()

    def _lost_record(self, lost: int) -> dict[str, Any]:
        return {"time": time.time(), "event": f"{lost} events lost: the shared folder was away for over "
                f"{MAX_WAITING} events", "level": "warning", "id": f"{self._ids}-lost-{self._told + lost}"}


class Watches:
    """What the supervisor's loop observes, told as an event when it changes, not at every look."""

    def __init__(self, journal: EventJournal, root: Path, memory_high_water: float):
        self.journal, self.root, self.memory_high_water = journal, root, memory_high_water
        self.folder_gone_at: float | None = None     # when the shared folder vanished (a dropped Drive mount)
        self.unlearning: set[str] = set()            # workers the learning-health guard warned about
        self.above_high_water: set[str] = set()      # the GPUs whose memory is above MEMORY_HIGH_WATER
        self.refusals_told: dict[str, tuple[int, float]] = {}    # node: its refusals told of, and when

    def folder(self) -> None:
        """An event when the shared folder vanishes (a dropped Drive mount) and one when it is back; the events
        that could not be written meanwhile are written once it answers."""
        present = folder_present(self.root)
        if present and self.journal.waiting:
            self.journal.flush()
        if not present and self.folder_gone_at is None:
            self.folder_gone_at = time.monotonic()
            self.journal.add(f"the shared folder {self.root} is gone (a dropped Drive mount?): workers go on and "
                             "keep their records until it is back", level="warning")
        elif present and self.folder_gone_at is not None:
            away = time.monotonic() - self.folder_gone_at
            self.folder_gone_at = None
            self.journal.add(f"the shared folder is back after {away:.0f}s: workers write the records they kept "
                             "and catch up")

    def learning(self, view: SwarmView) -> None:
        """A warning event when a worker starts to unlearn (held-out falling, reward collapsed), one when it stops."""
        for row in view.nodes:
            if row.role != "worker":
                continue
            if row.learning_warning and row.node_id not in self.unlearning:
                self.unlearning.add(row.node_id)
                self.journal.add(row.learning_warning, level="warning", kind=EVENT_UNLEARNING, node=row.node_id)
            elif not row.learning_warning and row.node_id in self.unlearning:
                self.unlearning.discard(row.node_id)
                self.journal.add(f"{row.node_id}: learning again (held-out and reward back within the guard's "
                                 "bounds)")

    def refusals(self, view: SwarmView) -> None:
        """A warning event when a node refused more of the folder's files or groups: how many, the newest by name
        (as its heartbeat names them), where the reasons are; at most one a node every REFUSALS_TOLD_EVERY_S."""
        now = time.monotonic()
        for row in view.nodes:
            told, at = self.refusals_told.get(row.node_id, (0, -REFUSALS_TOLD_EVERY_S))
            told = told if row.rejected >= told else 0        # a restarted process counts from 0 again
            if row.rejected <= told or now - at < REFUSALS_TOLD_EVERY_S:
                continue
            self.refusals_told[row.node_id] = (row.rejected, now)
            log_file = f"logs/{row.node_id}/worker.log" if row.role == "worker" else "logs/supervisor/supervisor.log"
            newest = f"; the newest: {', '.join(row.rejected_names)}" if row.rejected_names else ""
            self.journal.add(f"{row.node_id} refused {row.rejected - told} more files or groups of the shared folder "
                             f"({row.rejected} in all){newest}; {log_file} says why", level="warning")

    def memory(self, snapshot: MonitorSnapshot) -> None:
        """One event each time a GPU's memory crosses the high-water mark (and again after it fell back)."""
        for device in snapshot.devices:
            if not device.total_mib:
                continue
            share = device.used_mib / device.total_mib
            above = share >= self.memory_high_water
            if above and device.label not in self.above_high_water:
                self.journal.add(f"GPU memory of {device.label} at {share:.0%} of {device.total_mib / 1024:.0f} GiB "
                                 f"(high-water mark {self.memory_high_water:.0%}): a worker on it may hit CUDA out "
                                 "of memory")
            (self.above_high_water.add if above else self.above_high_water.discard)(device.label)
