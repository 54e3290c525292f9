"""The shared records in an object store (S3 through s3fs, GCS through gcsfs), behind storage.Store.

Credentials are never handled here: s3fs and botocore read them (and AWS_ENDPOINT_URL, for an S3-compatible
server) from the environment and their own config files, gcsfs from the Google account or
GOOGLE_APPLICATION_CREDENTIALS; nothing of them reaches a key, a record or a log line.
"""

from __future__ import annotations   # a store's `list` method would shadow list[...] in its annotations

import errno
import hashlib
import importlib
import logging
import os
import secrets
import threading
import time
from collections import Counter
from typing import Any

from workers.shared_folder.storage import MAX_LISTED, Entry, StoreError, Version

log = logging.getLogger(__name__)

EXTRAS = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs")}
PAGE = 1000     # keys an S3 listing returns a request
# A reader lists a folder, then asks each file's version before reading it: a HEAD a file. The listing already
# says each object's ETag and size, so a version asked for within this long of a listing is taken from it (a file
# rewritten in between is seen changed at the next listing, as a poll later would see it anyway).
LISTED_FRESH_S = 1.0
LISTED_KEEP = 4096      # versions remembered from listings at most


def _filesystem(scheme: str) -> Any:
    package, extra = EXTRAS[scheme]
    try:
        importlib.import_module(package)
    except ImportError:
        raise StoreError(f"SWARM_URL={scheme}://...: the {package} package is missing; install it with "
                         f"pip install -e '.[{extra}]'") from None
    import fsspec

    options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
    if scheme == "s3":
        # botocore's standard retries back off with jitter on throttling (429, 503 SlowDown) and dropped calls
        options["config_kwargs"] = {"retries": {"max_attempts": 6, "mode": "standard"}}
    filesystem = fsspec.filesystem(scheme, **options)
    return _HttpErrorsAsOSError(filesystem) if scheme == "gs" else filesystem


class _HttpErrorsAsOSError:
    """gcsfs lets errors through that are not OSErrors: its HttpError for a status it does not map (a 5xx after its
    own retries, a 416), aiohttp's for a dropped connection, its ChecksumError. The rest of rl-swarm retries and
    reports an OSError as a storage hiccup, so each becomes one; a refused credential becomes a PermissionError."""

    def __init__(self, fs: Any):
        from gcsfs.retry import ChecksumError, HttpError
        import aiohttp

        self._fs, self._http_error = fs, HttpError
        self._errors = (HttpError, ChecksumError, aiohttp.ClientError)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):        # its own fields, read before __init__ set them (a copy, a pickle)
            raise AttributeError(name)
        attribute = getattr(self._fs, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except OSError:
                raise
            except self._errors as error:
                code = getattr(error, "code", None) if isinstance(error, self._http_error) else None
                number = errno.EACCES if code in (401, 403) else errno.EIO
                raise OSError(number, f"{name}: {type(error).__name__} {code or ''} {error}"[:300]) from error
        return call


def _precondition_failed(error: OSError) -> bool:
    """A create-only write refused because the object exists (s3fs says FileExistsError only on AWS's wording)."""
    if isinstance(error, FileExistsError):
        return True
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "PreconditionFailed" or \
        response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412


class FsspecStore:
    """Keys below `root` (bucket/prefix/experiments/<name>); `requests` counts the calls made, by kind."""

    def __init__(self, scheme: str, root: str, fs: Any = None):
        self.scheme, self.root = scheme, root.strip("/")
        self.url = f"{scheme}://{self.root}"
        self.fs = fs if fs is not None else _filesystem(scheme)
        self.requests: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self._listed: dict[str, tuple[float, Version]] = {}     # key: when a listing saw it, and its version there

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def _count(self, kind: str, n: int = 1) -> None:
        with self._count_lock:
            self.requests[kind] += n

    def read(self, key: str, limit: int) -> bytes:
        self._count("get")
        data = self._cat(self._path(key), 0, limit + 1)      # one ranged GET, never the whole of a huge object
        if len(data) > limit:
            raise ValueError(f"{self.url}/{key}: over the {limit}-byte limit")
        return data

    def read_range(self, key: str, start: int, length: int) -> bytes:
        self._count("get")
        return self._cat(self._path(key), start, start + length)

    def _cat(self, path: str, start: int, end: int) -> bytes:
        try:
            return self.fs.cat_file(path, start=start, end=end)
        except OSError as error:
            response = getattr(error.__cause__, "response", None) or {}
            if response.get("Error", {}).get("Code") == "InvalidRange" \
                    or getattr(error.__cause__, "code", None) == 416:      # an empty object (S3, GCS)
                return b""
            raise

    def write(self, key: str, data: bytes) -> None:
        self._count("put")
        self._forget(key)
        self.fs.pipe_file(self._path(key), data)

    def create(self, key: str, data: bytes) -> bool:
        self._count("put")
        self._forget(key)
        try:
            self.fs.pipe_file(self._path(key), data, mode="create")
        except OSError as error:
            if _precondition_failed(error):
                return False
            raise
        return True

    def append(self, key: str, data: bytes) -> None:
        # a log has one writer: its nanosecond clock orders the records, the pid and random part keep a restarted
        # writer's records apart from its predecessor's
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}.json"
        if not self.create(f"{key}/{name}", data):
            raise FileExistsError(f"{self.url}/{key}/{name}: a record of that name already exists")

    def read_log(self, key: str, start: int, limit: int) -> bytes:
        """The records overlapping [start, start + limit) are fetched whole, in one concurrent batch."""
        wanted, position = [], 0
        for entry in self.list(key):
            if entry.folder:
                continue
            if position + entry.size > start and position < start + limit:
                wanted.append((self._path(f"{key}/{entry.name}"), position))
            position += entry.size
        if not wanted:
            return b""
        self._count("get", len(wanted))
        parts = self.fs.cat([path for path, _ in wanted], on_error="raise")
        data = b"".join(parts[path] for path, _ in wanted)
        skip = start - wanted[0][1]
        return data[skip:skip + limit]

    def list(self, key: str, limit: int = MAX_LISTED) -> list[Entry]:
        path = self._path(key)
        entries, now = [], time.monotonic()
        for info in self._list(path, limit)[:limit]:
            if info["name"].rstrip("/") == path:      # a folder's own marker object (SeaweedFS keeps one)
                continue
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            folder = info.get("type") == "directory"
            entries.append(Entry(name=name, size=int(info.get("size") or 0), folder=folder))
            if not folder and _tag(info):
                self._remember(f"{key}/{name}" if key else name, now, _version(info))
        return sorted(entries, key=lambda entry: entry.name)

    def _remember(self, key: str, when: float, version: Version) -> None:
        with self._count_lock:
            self._listed.pop(key, None)
            if len(self._listed) >= LISTED_KEEP:
                del self._listed[next(iter(self._listed))]
            self._listed[key] = (when, version)

    def _forget(self, key: str) -> None:
        with self._count_lock:
            self._listed.pop(key, None)

    def _list(self, path: str, limit: int) -> list[dict[str, Any]]:
        if self.scheme == "s3":
            from fsspec.asyn import sync

            # s3fs's paged listing with a bound: at most `limit` keys, PAGE a request (its ls has no bound)
            found = sync(self.fs.loop, self.fs._lsdir, path, refresh=True, max_items=limit)
            self._count("list", max(1, -(-len(found) // PAGE)))
            return found
        self._count("list")
        try:
            return self.fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return []

    def version(self, key: str) -> Version:
        with self._count_lock:
            listed = self._listed.get(key)
        if listed is not None and time.monotonic() - listed[0] < LISTED_FRESH_S:
            return listed[1]
        self._count("head")
        info = self.fs.info(self._path(key))
        if info.get("type") == "directory":
            raise FileNotFoundError(f"{self.url}/{key}: a folder, not a record")
        return _version(info)

    def delete(self, key: str) -> None:
        self._count("delete")
        self._forget(key)
        try:
            self.fs.rm(self._path(key), recursive=True)
        except FileNotFoundError:
            pass


def _tag(info: dict[str, Any]) -> str:
    # S3's ETag and GCS's generation change with every write; a listing and a HEAD spell them alike
    return str(info.get("ETag") or info.get("generation") or info.get("mtime") or "").strip('"')


def _version(info: dict[str, Any]) -> Version:
    return int.from_bytes(hashlib.sha256(_tag(info).encode()).digest()[:8], "big"), int(info.get("size") or 0)
