"""A slow, flaky Google Drive, simulated for tests (DRIVE_SIM_LAG, DRIVE_SIM_STALE, DRIVE_SIM_FAIL_RATE,
DRIVE_SIM_HANGUP).

On a Drive mount, a file another machine wrote shows up only after the sync catches up, and a call
fails with EIO now and then. Installed once per process, this makes the shared folder behave so:
another process's new file stays invisible (reads raise FileNotFoundError, listings omit it) until
`lag_s` seconds after its modification time, and each read, write or listing fails with
OSError(EIO, "simulated Drive failure") with probability `fail_rate`. A process always sees its own
writes at once, as on Drive.

A file's lag counts from the first time this process noticed it: a heartbeat rewritten every 2 s
would otherwise never be seen under a 5 s lag, while Drive shows its previous version meanwhile.

A mount can hang up (`hangup_flag`): while that file exists, every read, write and listing fails with
ENOTCONN, "Transport endpoint is not connected", as Colab's Drive FUSE mount does when it drops.

Listings go stale too (`stale_s`): a folder's listing is what it was when this process last refreshed it,
at most `stale_s` seconds ago, plus this process's own new files. A file that appeared since is not listed
yet (even when a read by name would find it), and a file deleted since is still listed, so a reader that
trusts a listing meets FileNotFoundError.

The other half of an untrusted folder, files a broken sync, a careless user or an attacker could leave
there, is planted by `workers.shared_folder.hostile`.

Only the protocol subfolders are covered (state, peers, rollouts, rewards, metrics). Checkpoints and
the warmed-up base are read by their writer or before round 1, and logs only by people, so they stay
outside the simulation. `workers.shared_folder.safe_io`'s helpers are its only callers.
"""

import errno
import logging
import os
import random
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SIMULATED = ("state", "peers", "rollouts", "rewards", "metrics")
FAILURE = "simulated Drive failure"
HUNG_UP = "Transport endpoint is not connected (simulated: the Drive mount hung up)"


@dataclass(frozen=True)
class DriveSimulation:
    """How slow and how flaky the simulated Drive is, for the experiment folder at `root`."""

    root: Path
    lag_s: float = 0.0
    fail_rate: float = 0.0
    seed: int = 0
    stale_s: float = 0.0
    hangup_flag: Path | None = None     # while a file is there, the mount is hung up (ENOTCONN)


class _SlowDrive:
    """The installed simulation with its per-process state; every method is thread-safe."""

    def __init__(self, sim: DriveSimulation):
        self.sim = sim
        self.root = os.path.abspath(sim.root)
        self.rng = random.Random(sim.seed)
        self.visible_at: dict[str, float] = {}
        self.listings: dict[str, tuple[float, list[str]]] = {}   # folder -> (refreshed at, its names then)
        self.failures = 0
        self.lock = threading.Lock()

    def covers(self, path: Path) -> bool:
        rel = os.path.relpath(os.path.abspath(path), self.root)
        return rel.split(os.sep, 1)[0] in SIMULATED

    def hung_up(self) -> bool:
        return self.sim.hangup_flag is not None and os.path.lexists(self.sim.hangup_flag)

    def fail_maybe(self, operation: str, path: Path) -> None:
        if self.hung_up():
            raise OSError(errno.ENOTCONN, HUNG_UP, str(path))
        with self.lock:
            failed = self.rng.random() < self.sim.fail_rate
            self.failures += failed
        if failed:
            log.warning("%s injected: %s of %s", FAILURE, operation, path)
            raise OSError(errno.EIO, FAILURE, str(path))

    def wrote(self, path: Path) -> None:
        with self.lock:
            self.visible_at[os.path.abspath(path)] = 0.0

    def visible(self, path: Path, mtime: float) -> bool:
        with self.lock:
            at = self.visible_at.setdefault(os.path.abspath(path), mtime + self.sim.lag_s)
        return time.time() >= at

    def stale_listing(self, directory: Path, names: list[str]) -> list[str]:
        """The names as of this folder's last refresh (at most stale_s ago), with this process's own writes."""
        key, now = os.path.abspath(directory), time.monotonic()
        with self.lock:
            refreshed = self.listings.get(key)
            if refreshed is None or now - refreshed[0] >= self.sim.stale_s:
                self.listings[key] = (now, list(names))
                return names
            own = [name for name in names if self.visible_at.get(os.path.join(key, name)) == 0.0]
        return sorted(set(refreshed[1]) | set(own))


_active: _SlowDrive | None = None


def simulate_drive(root: Path, lag_s: float, fail_rate: float, seed: int = 0, stale_s: float = 0.0,
                   hangup_flag: Path | None = None) -> DriveSimulation | None:
    """Install the simulation in this process (all 0 and no flag: remove it); returns what is installed."""
    global _active
    if lag_s < 0 or stale_s < 0 or not 0 <= fail_rate <= 0.5:
        raise ValueError(f"drive simulation: lag {lag_s!r} and staleness {stale_s!r} must be >= 0 and failure rate "
                         f"{fail_rate!r} in 0..0.5")
    if lag_s == 0 and fail_rate == 0 and stale_s == 0 and hangup_flag is None:
        _active = None
        return None
    sim = DriveSimulation(root=Path(root), lag_s=lag_s, fail_rate=fail_rate, seed=seed, stale_s=stale_s,
                          hangup_flag=hangup_flag)
    _active = _SlowDrive(sim)
    log.warning("drive simulation on for %s: new files of other processes visible %.1fs late, listings up to "
                "%.1fs stale, %.0f%% of operations fail%s", root, lag_s, stale_s, fail_rate * 100,
                f", hung up while {hangup_flag} exists" if hangup_flag else "")
    return sim


def hung_up() -> bool:
    """Whether the simulated mount is hung up now (DRIVE_SIM_HANGUP's file exists)."""
    return _active is not None and _active.hung_up()


def failures() -> int:
    """Failures injected in this process so far."""
    return _active.failures if _active is not None else 0


# -- hooks for workers.shared_folder.safe_io ------------------------------------------------------------------

def before_write(path: Path) -> None:
    if _active is not None and _active.covers(path):
        _active.fail_maybe("write", path)


def after_write(path: Path) -> None:
    if _active is not None and _active.covers(path):
        _active.wrote(path)


def before_read(path: Path, mtime: float) -> None:
    """FileNotFoundError while the file is not synced yet; OSError(EIO) for a simulated failure."""
    if _active is None or not _active.covers(path):
        return
    if _active.hung_up():
        raise OSError(errno.ENOTCONN, HUNG_UP, str(path))
    if not _active.visible(path, mtime):
        raise FileNotFoundError(errno.ENOENT, "not synced yet (simulated Drive lag)", str(path))
    _active.fail_maybe("read", path)


def before_list(directory: Path) -> None:
    if _active is not None and _active.covers(directory / "x"):
        _active.fail_maybe("listing", directory)


def listed(directory: Path, names: list[str]) -> list[str]:
    """What a listing of `directory` shows: `names` itself, or a stale view of it (DriveSimulation.stale_s)."""
    if _active is None or _active.sim.stale_s <= 0 or not _active.covers(directory / "x"):
        return names
    return _active.stale_listing(directory, names)


def visible_names(directory: Path, names: list[str]) -> list[str]:
    """`names` in `directory` less those this process may not see yet (see hidden)."""
    if _active is None or not _active.covers(directory / "x"):
        return names
    return [name for name in names if not hidden(directory / name)]


def hidden(path: Path) -> bool:
    """A regular file this process may not see yet (folders appear at once)."""
    if _active is None or not _active.covers(path):
        return False
    try:
        info = path.stat()
    except FileNotFoundError:
        return _active.sim.stale_s <= 0       # a stale listing still shows a file deleted since its refresh
    return stat.S_ISREG(info.st_mode) and not _active.visible(path, info.st_mtime)
