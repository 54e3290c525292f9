"""Checkpoints and best models written behind the rounds, by a thread, while the worker plays on.

A checkpoint of GPT-2 124M (weights and AdamW moments) is ~0.9 GB: 6-7 s to write and fsync on a plain disk,
longer on a Drive mount. Every worker checkpoints at the same round, so the whole swarm waited for the slowest
write. Now a worker copies what it saves into host memory (workers/host_copies.py) and hands the copy to
this writer, which writes the copies in order. A crash before a write lands leaves the checkpoint before it, as
a crash between two checkpoints always has; the next start clears the temp folder that write left.
"""

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from workers.shared_folder.retries import with_retries

log = logging.getLogger(__name__)

PENDING = 2             # copies held at once: a round's checkpoint and its best model; a third waits for room
ROOM_WAIT_S = 600.0     # the most a worker waits for room; writes that slow mean a stuck folder


@dataclass(frozen=True)
class Written:
    """What became of one write: `error` is None when it landed."""

    kind: str            # "checkpoint", "best", or "record" (a line that waited for a write before it)
    round: int
    what: str            # for the log: "checkpoint of round 50"
    write: Callable[[], object]
    error: Exception | None = None


class BackgroundWriter:
    """One thread writing what `submit` hands it, in order; `finished` says what became of each."""

    def __init__(self, name: str):
        self._jobs: queue.Queue = queue.Queue(maxsize=PENDING)
        self._outcomes: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._pending = 0
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, kind: str, round_: int, what: str, write: Callable[[], object],
               release: Callable[[], None] | None = None) -> None:
        """Queue `write` (retried as every folder write is); waits only while PENDING writes wait before it.
        OSError when no room came in ROOM_WAIT_S. `release` is called once `write` will read nothing more: after
        its last try, or here when it was never queued."""
        with self._idle:
            self._pending += 1
        try:
            self._jobs.put((kind, round_, what, write, release), timeout=ROOM_WAIT_S)
        except queue.Full:
            if release is not None:
                release()
            self._one_less()
            raise OSError(f"{what} not written: the writes before it took over {ROOM_WAIT_S:.0f}s") from None

    def finished(self) -> list[Written]:
        """The writes that ended since the last call, oldest first. A write that failed other than as a folder
        error (a bug, not the disk) is raised here, in the worker's thread, so the worker crashes and restarts."""
        done = []
        while True:
            try:
                outcome = self._outcomes.get_nowait()
            except queue.Empty:
                return done
            if outcome.error is not None and not isinstance(outcome.error, OSError):
                raise outcome.error
            done.append(outcome)

    def wait(self, timeout: float) -> bool:
        """True once every submitted write has ended (landed or failed); False when `timeout` came first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        while True:
            kind, round_, what, write, release = self._jobs.get()
            try:
                with_retries(write, what)
                outcome = Written(kind, round_, what, write)
            except Exception as exc:      # noqa: BLE001 - handed to the worker's thread by finished(), never lost
                outcome = Written(kind, round_, what, write, exc)
            finally:
                if release is not None:
                    release()
            self._outcomes.put(outcome)
            self._one_less()

    def _one_less(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()
