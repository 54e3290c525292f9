"""A doorbell between the processes of one host that play in the same experiment.

Every hand-off of a round goes through the shared folder (a round state, a peer's rollouts, a worker's rewards
file), and the side that waits for it polls. On one host that poll is most of a round's wall time. So the writer
also rings: one empty datagram to every process of this host that waits on the same experiment, which then
looks at the folder at once instead of at its next poll. The folder stays the record and the only path between
machines; a ring carries nothing but "look now", so a lost, late or forged ring costs at most one poll.

The sockets live in a private folder of this user under the system's temp folder (never in the shared folder),
one per waiting process, named after the experiment folder's path.
"""

import errno
import hashlib
import logging
import os
import select
import socket
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

RING = b"\x01"


def bell_dir(experiment_root: Path) -> Path:
    key = hashlib.sha256(str(Path(experiment_root).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"rl-swarm-{os.getuid()}" / key


class Doorbell:
    """Ring the others of this experiment on this host; wait for a ring or a timeout."""

    def __init__(self, experiment_root: Path, name: str):
        self.dir = bell_dir(experiment_root)
        self.path: Path | None = None
        self.sock: socket.socket | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.dir.parent.stat().st_uid != os.getuid() or self.dir.stat().st_uid != os.getuid():
                raise PermissionError(f"{self.dir} belongs to another user")
            os.chmod(self.dir.parent, 0o700)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            path = self.dir / f"{name}.{os.getpid()}.{id(self):x}.sock"
            sock.bind(str(path))
            sock.setblocking(False)
            self.sock, self.path = sock, path
        except OSError as exc:      # no doorbell (a read-only temp folder, a path too long): polls alone
            log.info("no doorbell for %s (%s): waiting by polls only", name, exc)

    def wait(self, timeout_s: float) -> bool:
        """Sleep until a ring or `timeout_s`; True when rung. Without a socket, a plain sleep."""
        if self.sock is None:
            select.select([], [], [], max(0.0, timeout_s))
            return False
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout_s))
        if not ready:
            return False
        while True:            # several rings since the last look are one "look now"
            try:
                self.sock.recv(16)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return True

    def ring(self) -> None:
        """Wake every other waiter of this experiment on this host; a gone waiter's socket is removed."""
        if self.sock is None:
            return
        try:
            targets = list(self.dir.glob("*.sock"))
        except OSError:
            return
        for target in targets:
            if target == self.path:
                continue
            try:
                self.sock.sendto(RING, str(target))
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):   # its process is gone
                    _unlink(target)
                # EAGAIN: its queue is full of rings already, which is as good as this one

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.path is not None:
            _unlink(self.path)
            self.path = None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
