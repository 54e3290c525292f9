"""A worker's heartbeat: changed by the worker as its rounds go, written to the folder by a thread of its own.

A round never waits on the folder for a stage's beat (a PUT on S3, a Drive write of seconds in a bad minute):
the thread writes a changed beat, and an unchanged one every HEARTBEAT_S so peers see the worker alive. A fast round
changes its stage five times in a tenth of a second, so a changed beat waits until BEAT_GAP_S after the last write
and the newest one goes (a signed, synced write is ~0.35 ms of CPU, and every reader verifies it).
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from workers.shared_folder.exchange import Exchange
from workers.shared_folder.protocol import Heartbeat, Status

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
BEAT_GAP_S = 0.5       # between two writes of changed beats; a last status is written at once by the caller


class Heartbeats:
    """The newest beat of one worker, and the thread that writes it while the worker plays."""

    def __init__(self, exchange: Exchange, first: Heartbeat, troubles: Callable[[], list[str]]):
        self.exchange, self.troubles = exchange, troubles
        self.beat = first
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()       # one write at a time, each of the newest beat
        self._done = threading.Event()
        self._due = threading.Event()             # a changed beat for the thread to write
        self._thread: threading.Thread | None = None
        self._written_at = -BEAT_GAP_S            # monotonic time of the thread's last write

    def update(self, **changes: object) -> None:
        """Change the beat. The thread writes it; a last status, or one while no thread runs, is written here."""
        self._touch(**changes)
        if self._thread is not None and not self._done.is_set() and changes.get("status") not in Status.TERMINAL:
            self._due.set()
        else:
            self._write()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="heartbeat")
        self._thread.start()

    def stop(self) -> None:
        """No more beats from the thread; a change after this is written by the call that makes it."""
        self._done.set()
        self._due.set()

    def _touch(self, **changes: object) -> None:
        with self._lock:
            now = time.time()
            if changes.get("status", self.beat.status) != self.beat.status or "round" in changes:
                changes["progress_at"] = now
            troubles = self.troubles()
            self.beat = replace(self.beat, updated_at=now, rejected=self.exchange.rejected,
                                rejected_names=self.exchange.rejected_names, note="; ".join(troubles) or None,
                                **changes)

    def _write(self) -> None:
        # the beat is read under the write lock: a write never puts an older beat over a newer one
        with self._write_lock:
            with self._lock:
                beat = self.beat
            try:
                self.exchange.write_heartbeat(beat)
            except OSError as exc:  # a Drive hiccup must not kill the worker; the next beat, 2 s on, retries
                log.warning("heartbeat not written: %s", exc)

    def _loop(self) -> None:
        while not self._done.is_set():
            changed = self._due.wait(HEARTBEAT_S)
            if changed:                      # the changes of the next moments go in the same write
                self._done.wait(self._written_at + BEAT_GAP_S - time.monotonic())
            self._due.clear()                # a change after this is written by this write or the next
            if not changed:
                self._touch()                # alive: a fresh updated_at, and the troubles as they are now
            if changed or not self._done.is_set():      # at a stop too: the newest beat, with a change just before
                self._write()
                self._written_at = time.monotonic()
