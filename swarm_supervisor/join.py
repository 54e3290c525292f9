"""A machine that joins a swarm whose coordinator runs elsewhere (`rl-swarm worker`): it refuses a finished
experiment, waits (bounded, saying for what) for the coordinator's key, the experiment's base and the settings of
the coordinator that runs now (not those a run before it left), then plays with the experiment's settings that shape
the rounds (resume.joined_settings), and follows them when its coordinator restarts with others (SettingsWatch)."""

import time
from dataclasses import dataclass
from typing import Any

from configs_env import SwarmConfig, SwarmError
from configs_env.parsing import spelled
from swarm_supervisor.claim import Lease, signed_lease
from swarm_supervisor.listing import list_experiments, where_shown
from swarm_supervisor.readable import plain
from swarm_supervisor.resume import (JOINED, SHAPING, ExperimentFinished, adopted_settings, finished_note,
                                     joined_settings)
from workers.processes import COORDINATOR_PATIENCE
from workers.shared_folder.base_meta import signed_base_meta
from workers.shared_folder.exchange import newest_signed_round
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.recorded_config import COORDINATOR_INSTANCE, read_recorded_config
from workers.shared_folder.rejections import FolderError, RejectedFile, warn_once
from workers.shared_folder.safe_io import is_visible
from workers.shared_folder.signing import COORDINATOR, KeyRing, UnknownSigner, fingerprint, local_key_dir

JOIN_POLL_S = 1.0
COORDINATOR_KEY = "the coordinator"     # what a joiner waits for first
SETTINGS = "the experiment's settings"
RUNNING_SETTINGS = "the settings of the experiment's running coordinator"
# how often a joiner reads config.json for the settings of a coordinator that restarted: a round or two of its
# workers played with the old ones at most, for a read of one small file (a billed GET on an object store)
SETTINGS_CHECK_S = 10.0


def joiners_keyring(cfg: SwarmConfig, folder: ExperimentFolder) -> KeyRing:
    """A joining machine's keys of the experiment, its coordinator's pinned on this machine at first sight."""
    return KeyRing(folder, pins_dir=local_key_dir(cfg.cache_dir, folder.root) / "pins")


def join_experiment(cfg: SwarmConfig) -> tuple[SwarmConfig, KeyRing, "SettingsWatch"]:
    """A joining machine's settings, the experiment's where they shape the rounds, its keys of the experiment, and
    the watch that follows its coordinator's settings from then on, once the experiment is ready to join. The
    caller refuses a finished experiment first (refuse_finished, before its folder checks write anything). Nothing
    is written into the experiment's folder before its coordinator made it."""
    folder = ExperimentFolder(cfg.experiment_dir)
    keyring = join_when_ready(cfg, folder)
    watch = SettingsWatch(cfg, folder, keyring)     # before they are taken: a config.json signed since is followed
    joined, lines = joined_settings(folder, keyring, cfg)
    for line in lines:
        print(f"rl-swarm: {line}")
    return joined, keyring, watch


def refuse_finished(cfg: SwarmConfig) -> None:
    """ExperimentFinished when the experiment a machine would join has no round left: told before anything is
    written (the folder's write check too), as `up` tells it."""
    folder = ExperimentFolder(cfg.experiment_dir)
    note = finished_note(folder, joiners_keyring(cfg, folder), cfg, joining=True)
    if note is not None:    # a joiner would replay its last round into the finished experiment's results
        raise ExperimentFinished(note)


def join_when_ready(cfg: SwarmConfig, folder: ExperimentFolder) -> KeyRing:
    """JoinWait's wait, from its start to the pinned key."""
    return JoinWait(cfg, folder).until_ready()


class JoinWait:
    """A joining machine's wait, within a bound, for the coordinator's key, the experiment's base/ (or a first round
    of a swarm that runs without one) and the config.json signed by the coordinator's `up` that runs now. What it
    waits for is said on the console as soon as it is made, and again when that changes; once ready it pins the
    coordinator's key and prints it for the person to check. It never makes a base of its own nor starts from the
    raw model of a swarm that has one."""

    def __init__(self, cfg: SwarmConfig, folder: ExperimentFolder):
        self.cfg, self.folder = cfg, folder
        self.keyring = joiners_keyring(cfg, folder)
        self.bound = COORDINATOR_PATIENCE * cfg.peer_timeout
        self.said: str | None = None
        self.line = ""
        self.waiting = self.look()

    def look(self) -> str | None:
        """What it still waits for (said when new), or None once it can start."""
        waiting = _not_ready(self.folder, self.keyring, self.cfg.peer_timeout)
        if waiting is not None and waiting != self.said:
            self.line = f"{waiting}{self._how(waiting)}"
            print(f"rl-swarm: waiting up to {self.bound:.0f}s for {self.line}", flush=True)
            self.said = waiting
        self.waiting = waiting
        return waiting

    def _how(self, waiting: str) -> str:
        """Where it looks, and what makes what it waits for."""
        name, where = self.cfg.experiment_name, where_shown(self.cfg)
        if waiting == SETTINGS:
            return f" ({self.folder.config_file}, signed by its coordinator as its `rl-swarm up` starts)"
        if waiting == RUNNING_SETTINGS:
            return (f": {self.folder.config_file} holds those of a run that has ended (a resume may change them); "
                    "its `rl-swarm up` writes its own as it starts, after its warm-up")
        if waiting != COORDINATOR_KEY:
            if self.cfg.swarm_url:      # the base is not in the bucket: each machine keeps its copy
                return (f": copy experiments/{name}/base/ from the coordinator's machine to the same place under "
                        "this GDRIVE_PATH")
            return ": the coordinator's `rl-swarm up` makes it in its warm-up (or `rl-swarm pretrain`)"
        line = (f" of experiment {name!r} under {where}: start it with `rl-swarm up` and the same GDRIVE_PATH"
                f"{', SWARM_URL' if self.cfg.swarm_url else ''} and EXPERIMENT_NAME, before or after this")
        try:
            listing = list_experiments(self.cfg)
        except (SwarmError, OSError):       # a bucket or a Drive that cannot be listed now: the wait goes on
            return line
        if not any(root.name == name for root in listing.roots):
            line += f" (no such experiment there yet; {listing.known})" if listing.roots else \
                " (no experiment there yet)"
        return plain(line)

    def until_ready(self) -> KeyRing:
        deadline = time.monotonic() + self.bound
        while self.look() is not None:
            if time.monotonic() >= deadline:
                if self.waiting == SETTINGS and is_visible(self.folder.config_file):
                    break       # one the coordinator did not sign: joined_settings says it keeps its own settings
                raise SwarmError(f"gave up after {self.bound:.0f}s waiting for {self.line}")
            time.sleep(JOIN_POLL_S)
        print(f"rl-swarm: coordinator key {fingerprint(self.keyring.public_key(COORDINATOR))} (pinned on this "
              "machine: check that it is the one `rl-swarm up` printed)")
        return self.keyring


def _not_ready(folder: ExperimentFolder, keyring: KeyRing, peer_timeout: float) -> str | None:
    """What a joiner still waits for, or None once it can start."""
    conflict = keyring.coordinator_conflict()
    if conflict:
        raise FolderError(conflict)
    try:
        keyring.public_key(COORDINATOR)
    except (UnknownSigner, OSError):      # not published yet, or a Drive hiccup
        return COORDINATOR_KEY
    if not _has_start(folder, keyring):
        return f"the experiment's base model ({folder.base_dir})"
    recorded = _signed_settings(folder, keyring)
    if recorded is None:
        return SETTINGS
    # a coordinator of a version before config.json named its `up` cannot be told from the one before it: taken
    written_by = recorded.get(COORDINATOR_INSTANCE)
    running = _running_lease(folder, keyring, peer_timeout)
    if written_by is not None and (running is None or written_by != running.instance):
        return RUNNING_SETTINGS
    return None


def _has_start(folder: ExperimentFolder, keyring: KeyRing) -> bool:
    """Whether the coordinator's base/ is there, or a first round of a swarm that runs without one."""
    try:
        if signed_base_meta(folder, keyring) is not None:
            return True
    except RejectedFile as refused:     # a peer's, or one still syncing: the coordinator's is waited for
        warn_once(str(refused))
    except OSError:                     # a Drive hiccup: looked at again
        pass
    try:
        return newest_signed_round(folder, keyring) is not None     # WARMUP_STEPS=0
    except OSError:
        return False


def _signed_settings(folder: ExperimentFolder, keyring: KeyRing) -> dict[str, Any] | None:
    """The config.json its coordinator signed, whose settings a joiner plays with, or None while there is none to
    read. One it did not sign (a peer's, or one still syncing) is waited past, up to the wait's bound: taken too
    early, the joiner would play with its own G and MAX_NEW_TOKENS, and its peers would drop its groups."""
    try:
        return read_recorded_config(folder, keyring)
    except RejectedFile as refused:
        warn_once(str(refused))
        return None
    except OSError:                     # not written yet (FileNotFoundError), or a Drive hiccup
        return None


def _running_lease(folder: ExperimentFolder, keyring: KeyRing, peer_timeout: float) -> Lease | None:
    """The lease of the coordinator's `up` that runs now, or None while none does (a lease it signed, held by a live
    process here or renewed within PEER_TIMEOUT elsewhere)."""
    try:
        lease = signed_lease(folder, keyring)
    except RejectedFile as refused:     # a peer's, or one still syncing: the coordinator's is waited for
        warn_once(str(refused))
        return None
    except OSError:                     # no `up` holds the experiment (FileNotFoundError), or a Drive hiccup
        return None
    return lease if lease.alive(peer_timeout) else None


@dataclass(frozen=True)
class SettingsChange:
    """What a joiner does of the settings its coordinator restarted with: lines to say, and the settings its workers
    restart with (None: they play with them already)."""

    lines: tuple[str, ...]
    cfg: SwarmConfig | None


class SettingsWatch:
    """A joiner's look, every SETTINGS_CHECK_S, at config.json for one its coordinator signed as it restarted (that
    of another `up`, which runs now): its workers, started with the settings of the `up` before, would publish
    groups every peer drops and drop theirs. What shapes the rounds is then taken as at the join (adopted_settings
    from this machine's own settings); a config.json of an `up` that does not run (one a peer put back) is not."""

    def __init__(self, own: SwarmConfig, folder: ExperimentFolder, keyring: KeyRing):
        self.own, self.folder, self.keyring = own, folder, keyring
        recorded = _signed_settings(folder, keyring)
        self.instance = recorded.get(COORDINATOR_INSTANCE) if recorded else None
        # only forward: a peer that puts back an ended `up`'s signed lease and config.json (both genuine, renewed
        # within PEER_TIMEOUT) must not turn the joiners' workers back and forth
        running = _running_lease(folder, keyring, own.peer_timeout)
        self.since = running.started_at if running else float("-inf")
        self.next_look = time.monotonic() + SETTINGS_CHECK_S

    def look(self, playing: SwarmConfig) -> SettingsChange | None:
        """What changes for workers that play with `playing`, when a config.json of another `up` that runs now is
        new since the last look (due every SETTINGS_CHECK_S); None otherwise."""
        if time.monotonic() < self.next_look:
            return None
        self.next_look = time.monotonic() + SETTINGS_CHECK_S
        recorded = _signed_settings(self.folder, self.keyring)      # None on a Drive hiccup: looked at again
        written_by = recorded.get(COORDINATOR_INSTANCE) if recorded else None
        if written_by is None or written_by == self.instance:
            return None
        running = _running_lease(self.folder, self.keyring, self.own.peer_timeout)
        if running is None or running.instance != written_by or running.started_at <= self.since:
            return None
        self.instance, self.since = written_by, running.started_at
        # from what its workers play with: a value this machine's parser refuses keeps theirs, not its own
        adopted, lines = adopted_settings(recorded, playing)
        followed = playing.with_overrides(**{attr: getattr(adopted, attr) for attr in JOINED})
        changed = [attr for attr in SHAPING if getattr(followed, attr) != getattr(playing, attr)]
        if not changed:
            return SettingsChange(tuple(lines), None) if lines else None
        was, now = playing.to_json(), followed.to_json()
        said = ", ".join(f"{SHAPING[attr]} {spelled(was[attr])} -> {spelled(now[attr])}" for attr in changed)
        return SettingsChange((*lines, plain(f"the coordinator restarted with other settings ({said}): this "
                                             "machine's workers restart with them")), followed)
