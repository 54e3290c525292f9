"""The supervisor's events: a line each for people (the dashboard shows the newest) and a record each in
logs/supervisor/events.jsonl for `status`, `experiments` and programs.

While the shared folder cannot be written (a dropped Drive mount, a hung-up FUSE call) the records wait here, in
order, and are written when it answers again: the file keeps what happened during the outage, the outage's own
"folder is gone" first. Each record carries the time it happened, not the time it was written.
"""

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from workers.shared_folder.jsonl import append_jsonl

log = logging.getLogger(__name__)

SHOWN = 8                 # the dashboard's newest events
MAX_WAITING = 10_000      # records kept through an outage; past that the oldest go (and the log says how many)


class EventJournal:
    """Events of one supervisor; `add` is called from its loop and from the coordinator's thread."""

    def __init__(self, path: Path):
        self.path = path
        self.recent: deque[str] = deque(maxlen=SHOWN)
        self.waiting: deque[dict[str, Any]] = deque()
        self.dropped = 0                     # records lost to MAX_WAITING during a long outage
        self._writing = threading.Lock()     # one writer at a time, or a record could be written twice
        self._failing = False                # the last write failed: warn once per outage, not per event

    def add(self, message: str, level: str = "info", kind: str | None = None, node: str | None = None) -> None:
        """A line for people and, with `kind`, a fact for programs to count (restarts, failures)."""
        self.recent.append(time.strftime("%H:%M:%S ") + message)
        {"warning": log.warning, "error": log.error}.get(level, log.info)(message)
        if len(self.waiting) >= MAX_WAITING:
            self.waiting.popleft()
            self.dropped += 1
            log.warning("%d events not written to %s: the folder was away for longer than %d events",
                        self.dropped, self.path, MAX_WAITING)
        self.waiting.append({"time": time.time(), "event": message, "level": level,
                             **({"kind": kind, "node": node} if kind else {})})
        self.flush()

    def flush(self) -> bool:
        """Write the waiting records, oldest first; False while the folder refuses them (they keep waiting).

        A caller that finds another thread writing leaves its record to that thread's loop, which runs until
        nothing waits; the supervisor's loop also flushes every few seconds, so no record waits on a next event.
        """
        if not self._writing.acquire(blocking=False):
            return False
        try:
            while self.waiting:
                try:
                    append_jsonl(self.path, self.waiting[0])
                except OSError as exc:
                    if not self._failing:
                        log.warning("events wait to be written to %s (%s); they are kept until it answers",
                                    self.path, exc)
                    self._failing = True
                    return False
                self.waiting.popleft()
            if self._failing:
                log.info("events written to %s again", self.path)
            self._failing = False
            return True
        finally:
            self._writing.release()
