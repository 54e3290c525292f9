"""A worker process as the supervisor holds it, and the policy that decides when a crashed one restarts (as
an Erlang/OTP supervisor's child spec and restart intensity: data, no logic of the swarm)."""

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from workers.processes import WorkerSpec


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5          # R
    window_s: float = 600.0        # T
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0

    def delay(self, recent_restarts: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2 ** max(0, recent_restarts - 1))


@dataclass
class WorkerHandle:
    spec: WorkerSpec
    process: Any = None
    restarts: deque = field(default_factory=deque)   # monotonic times of restarts within the window
    total_restarts: int = 0
    restart_at: float | None = None
    failed: bool = False
    exited_ok: bool = False
    stopped: bool = False               # it exited otherwise (or was killed) once the swarm was stopping
    last_error: str | None = None
    kill_reason: str | None = None      # set when the supervisor itself killed the process
    memory_wait_since: float | None = None    # its restart waits for room on its GPU (monotonic start)
    memory_wait_gave_up: float | None = None  # when a wait last ran out: the next out-of-memory exit counts
    respawn_asked: bool = False         # asked to stop to start again with a new spec: no crash, not finished

    @property
    def node(self) -> str:
        return self.spec.node

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def restart_with(self, spec: WorkerSpec) -> None:
        """Its processes run `spec` from now on: a live one is asked to stop as on Ctrl-C (it checkpoints its last
        round) and is started again as it exits (Supervisor._reap)."""
        self.spec = spec
        if self.alive():
            self.respawn_asked = True
            self.process.terminate()
