"""Where the shared records live: one small interface, a local folder or an object store behind it.

The swarm names every shared file by a local path (`ExperimentFolder`). With SWARM_URL set, the protocol's
subfolders of the experiment (state, peers, rollouts, rewards, metrics, keys, config.json) are *mounted* on an object
store: the folder helpers (`workers.shared_folder.safe_io`) ask `mounted(path)` before each read, write or listing
and hand the store the key under the URL. Checkpoints, the base model and logs are not mounted: they stay under
GDRIVE_PATH on the machine that writes them.

A store keeps the folder's guarantees in its own words: a write replaces a whole object (readers see the old
one or the new one), `create` writes only where nothing is (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`),
an append is an object per record, listings are bounded and paged.
"""

from __future__ import annotations   # a store's `list` method would shadow list[...] in its annotations

import atexit
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from configs_env import SwarmError
from configs_env.parsing import SAFE_NAME, STORE_URL

log = logging.getLogger(__name__)

# the experiment's records an object store holds; the rest of the experiment folder stays local
MOUNTED = ("state", "peers", "rollouts", "rewards", "metrics", "keys", "config.json")
MAX_LISTED = 10_000          # entries one listing returns at most: 5 years of 2000-round metrics would not reach it
LOG_SUFFIX = ".jsonl"         # a log: in a store, an object per record under its key


class StoreError(SwarmError):
    """The object store cannot be used (a missing extra, a bad URL, a bucket that is not there)."""


@dataclass(frozen=True)
class Entry:
    name: str       # the last part of the key: a file name, or a folder's name for a common prefix
    size: int       # bytes; 0 for a folder
    folder: bool = False


Version = tuple[int, int]


class Store(Protocol):
    """Keys are '/'-separated paths below the store's root; every method may raise OSError for a hiccup."""

    url: str

    def read(self, key: str, limit: int) -> bytes:
        """The whole object; FileNotFoundError when missing; ValueError naming the size when over `limit`."""

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Up to `length` bytes from `start`; FileNotFoundError when missing."""

    def write(self, key: str, data: bytes) -> None:
        """Create or replace the object as a whole."""

    def create(self, key: str, data: bytes) -> bool:
        """Write only where no object is; False (nothing written) when one already is."""

    def append(self, key: str, data: bytes) -> None:
        """One more record of the log at `key` (an object of its own under it)."""

    def read_log(self, key: str, start: int, limit: int) -> bytes:
        """The log's records, concatenated in order, from byte `start`: at most `limit` bytes."""

    def list(self, key: str, limit: int = MAX_LISTED) -> list[Entry]:
        """The entries right under `key`, at most `limit`, in name order; [] when there are none."""

    def version(self, key: str) -> Version:
        """Something that changes whenever the object does (size and a hash of its ETag or generation)."""

    def delete(self, key: str) -> None:
        """Remove the object, or every object under `key`; nothing when none is there."""


@dataclass(frozen=True)
class Mount:
    root: Path            # the local experiment folder whose protocol subfolders the store holds
    store: Store


_mounts: dict[Path, Mount] = {}
_lock = threading.Lock()


def mount(root: Path, store: Store) -> None:
    """From now on, in this process, the protocol subfolders of `root` are read and written in `store`."""
    with _lock:
        _mounts[Path(root).absolute()] = Mount(Path(root).absolute(), store)


def unmount(root: Path) -> None:
    with _lock:
        _mounts.pop(Path(root).absolute(), None)


def mounted(path: Path) -> tuple[Store, str] | None:
    """The store holding `path` and its key there; None for a local file (the folder helpers' own case)."""
    if not _mounts:
        return None
    full = Path(path).absolute()
    for root, where in list(_mounts.items()):
        if full == root or root not in full.parents:
            continue
        parts = full.relative_to(root).parts
        if parts[0] in MOUNTED:
            return where.store, "/".join(parts)
    return None


def _store_root(url: str, experiment: str) -> tuple[str, str]:
    """The scheme and the bucket/prefix/experiments/<experiment> of a URL (checked by configs_env already)."""
    match = STORE_URL.fullmatch(url)
    if match is None:
        raise StoreError(f"SWARM_URL={url!r}: expected s3://bucket/prefix or gs://bucket/prefix")
    parts = (match["bucket"], match["prefix"].strip("/"), "experiments", experiment)
    return match["scheme"], "/".join(part for part in parts if part)


def open_store(url: str, experiment: str) -> Store:
    """The store of one experiment: <url>/experiments/<experiment>/ ("": the folder of every experiment)."""
    from workers.shared_folder.store_fsspec import FsspecStore

    return FsspecStore(*_store_root(url, experiment))


def experiment_names(url: str) -> list[str]:
    """The experiments under <url>/experiments/, in name order; a name no experiment could have is skipped."""
    names = []
    for entry in open_store(url, "").list(""):
        if entry.folder and SAFE_NAME.fullmatch(entry.name):
            names.append(entry.name)
        else:
            log.warning("%s/experiments/%r: not an experiment's name; skipped", url, entry.name)
    return names


def mount_experiment(url: str | None, root: Path, experiment: str) -> Store | None:
    """Mount the experiment's store in this process when SWARM_URL is set; a second call returns the first's."""
    if url is None:
        return None
    scheme, where = _store_root(url, experiment)
    with _lock:
        held = _mounts.get(Path(root).absolute())
    if held is not None and held.store.url == f"{scheme}://{where}":
        return held.store
    store = open_store(url, experiment)
    mount(root, store)
    # what this process cost the store, in its log: the requests a round makes are what a bucket bills
    atexit.register(lambda: log.info("object store requests of this process: %s", dict(getattr(store, "requests", {}))))
    return store
