"""One coordinator per experiment: `rl-swarm up` (and `pretrain`) hold the experiment's claim from before the
warm-up to their end.

Two things make the claim. The coordinator's public key in keys/coordinator.pub, create-only: an `up` whose
own key (this machine's, under RL_SWARM_CACHE/keys/) is another is refused, whatever it runs. And a lease,
state/coordinator.lease.json, taken create-only and signed with that key: a second `up` with the same key
(this machine, or one sharing its home folder) is refused while the first one lives. A lease whose `up`
crashed does not block a resume: on this host its process is gone (pid and start time), elsewhere it has not
been renewed for PEER_TIMEOUT. A resume proves it is the same coordinator by its key: the lease and the round
states verify under the pinned public key, which only this machine's private key signs for.
"""

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import psutil

from configs_env import SwarmConfig
from workers.shared_folder import mount
from workers.shared_folder.exchange import SMALL_RECORD_BYTES, read_signed
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import read_json_bounded, write_json_atomic, write_json_create_only
from workers.shared_folder.recorded_config import CONFIG_BYTES
from workers.shared_folder.rejections import FolderError, RejectedFile
from workers.shared_folder.retries import with_retries
from workers.shared_folder.safe_io import is_visible, remove_file
from workers.shared_folder.signing import COORDINATOR, KeyRing, NodeKey, UnknownSigner, local_key_dir

log = logging.getLogger(__name__)

RENEW_S = 5.0
LEASE_SCHEMA = 1         # state/coordinator.lease.json's own version


@dataclass(frozen=True)
class Lease:
    host: str
    pid: int
    pid_started: float       # the process's start time: a pid used again by another process is not this lease's
    instance: str
    command: str             # "up" or "pretrain", for the refusal's line
    started_at: float
    renewed_at: float

    @classmethod
    def from_json(cls, record: dict[str, Any], where: str) -> "Lease":
        try:
            lease = cls(**{key: record[key] for key in cls.__dataclass_fields__})
        except (KeyError, TypeError) as exc:
            raise RejectedFile(f"{where}: not a coordinator lease ({exc}); skipped") from exc
        numbers = (lease.pid, lease.pid_started, lease.started_at, lease.renewed_at)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) \
                or not all(isinstance(v, str) for v in (lease.host, lease.instance, lease.command)):
            raise RejectedFile(f"{where}: not a coordinator lease (a field of the wrong type); skipped")
        return lease

    def alive(self, peer_timeout: float, now: float | None = None) -> bool:
        if self.host == socket.gethostname():
            try:
                return abs(psutil.Process(int(self.pid)).create_time() - self.pid_started) < 1.0
            except (psutil.Error, OverflowError, ValueError):
                return False
        return (time.time() if now is None else now) - self.renewed_at < peer_timeout


def signed_lease(folder: ExperimentFolder, keyring: KeyRing) -> Lease:
    """The experiment's lease as its coordinator signed it; FileNotFoundError while no `up` (or `pretrain`) holds
    it, RejectedFile for one it did not sign, OSError for a Drive hiccup."""
    path = folder.coordinator_lease_file
    return Lease.from_json(read_signed(path, COORDINATOR, keyring, SMALL_RECORD_BYTES), str(path))


def coordinator_key(cfg: SwarmConfig, folder: ExperimentFolder) -> tuple[NodeKey, KeyRing]:
    """This machine's coordinator key of the experiment, and a key ring that pins it."""
    key_dir = local_key_dir(cfg.cache_dir, folder.root)
    keyring = KeyRing(folder, pins_dir=key_dir / "pins")
    key = NodeKey.load_or_create(key_dir, COORDINATOR)
    keyring.trust(key)
    return key, keyring


class CoordinatorClaim:
    """This process's hold on the experiment as its coordinator (see the module's docstring)."""

    def __init__(self, cfg: SwarmConfig, folder: ExperimentFolder, key: NodeKey, keyring: KeyRing, command: str):
        self.cfg, self.folder, self.key, self.keyring = cfg, folder, key, keyring
        now = time.time()
        self.lease = Lease(host=socket.gethostname(), pid=os.getpid(), pid_started=psutil.Process().create_time(),
                           instance=uuid.uuid4().hex[:12], command=command, started_at=now, renewed_at=now)
        self.lost: str | None = None       # why the claim is no longer ours, once another took it
        self._done = threading.Event()

    def take(self) -> None:
        """Publish the key and take the lease; FolderError with one line when another coordinator holds it."""
        self._own_the_key()
        path = self.folder.coordinator_lease_file
        for _ in range(2):      # a stale lease removed, then one more try; a racing `up` that wins is refused
            if with_retries(lambda: write_json_create_only(path, self._signed()), f"taking {path.name}"):
                return
            held = self._read_lease()
            if held is not None and held.alive(self.cfg.peer_timeout):
                since = time.time() - held.started_at
                raise FolderError(
                    f"experiment {self.cfg.experiment_name!r} already has a coordinator: `rl-swarm {held.command}` "
                    f"(pid {held.pid} on {held.host[:64]!r}, for {since:.0f}s): stop it first, or join its swarm "
                    f"with `rl-swarm worker`")
            log.info("%s: %s; taken over", path, "a lease not signed by this coordinator" if held is None
                     else f"the lease of pid {held.pid}, which is gone")
            remove_file(path)
        raise FolderError(f"{path}: another coordinator took the lease meanwhile: stop it first, or join its swarm "
                          "with `rl-swarm worker`")

    def _own_the_key(self) -> None:
        """keys/coordinator.pub is this machine's key (published now if missing); FolderError otherwise."""
        path = self.folder.public_key_file(COORDINATOR)
        if not is_visible(path) and self._written_before_signatures():
            raise FolderError(f"experiment {self.cfg.experiment_name!r} was written by an rl-swarm before signed "
                              f"records (its config.json says schema 1, and it has no "
                              f"{path.relative_to(self.folder.root)}): finish it with that version, or start a new "
                              "EXPERIMENT_NAME")
        try:
            self.keyring.publish(self.key)
        except FolderError as conflict:
            raise FolderError(f"experiment {self.cfg.experiment_name!r} belongs to another coordinator ({conflict}); "
                              "join it with `rl-swarm worker`, or pick another EXPERIMENT_NAME") from None

    def _written_before_signatures(self) -> bool:
        """An experiment that an older `up` started: its rounds cannot be resumed, their states are not signed."""
        try:
            config = read_json_bounded(self.folder.config_file, CONFIG_BYTES)
        except (OSError, RejectedFile):
            return False
        return config.get("schema") == 1 and bool(self.folder.state_rounds())

    def _signed(self) -> dict[str, Any]:
        return self.key.sign({"schema": LEASE_SCHEMA, **asdict(self.lease)})

    def _read_lease(self) -> Lease | None:
        """The lease in the folder when this coordinator's key signed it; None when it is gone or forged."""
        try:
            return signed_lease(self.folder, self.keyring)
        except FileNotFoundError:
            return None
        except (UnknownSigner, RejectedFile) as error:
            log.warning("%s", error)
            return None

    @contextlib.contextmanager
    def held(self) -> Iterator["CoordinatorClaim"]:
        """Take the claim, renew it every RENEW_S while the block runs, and give it back at the end."""
        self.take()
        renewer = threading.Thread(target=self._renew_loop, name="coordinator-lease", daemon=True)
        renewer.start()
        try:
            yield self
        finally:
            self._done.set()
            renewer.join(timeout=RENEW_S + 5)
            self._release()

    def _renew_loop(self) -> None:
        while not self._done.wait(RENEW_S):
            try:
                held = self._read_lease()
                if held is None and not mount.folder_present(self.folder.root):
                    log.warning("coordinator lease not renewed: the shared folder is not there (a dropped mount?)")
                    continue
                if held is None:        # deleted or replaced by a forgery: a peer cannot end the swarm that way
                    log.warning("the coordinator lease %s was gone or not ours: written again",
                                self.folder.coordinator_lease_file)
                elif held.instance != self.lease.instance:       # signed by our key: another `up` of ours
                    self.lost = ("another coordinator took the experiment's lease "
                                 f"({self.folder.coordinator_lease_file}); this one stops")
                    log.error("%s", self.lost)
                    return
                self.lease = Lease(**{**asdict(self.lease), "renewed_at": time.time()})
                write_json_atomic(self.folder.coordinator_lease_file, self._signed())
            except OSError as exc:      # a Drive hiccup: the next renewal, RENEW_S on, tries again
                log.warning("coordinator lease not renewed: %s", exc)

    def _release(self) -> None:
        held = self._read_lease()
        if held is not None and held.instance == self.lease.instance:
            remove_file(self.folder.coordinator_lease_file)
