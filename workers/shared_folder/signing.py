"""Who wrote a record: each node signs what speaks for it with its own Ed25519 key, and readers check it.

A node's private key lives on its machine only (NodeKey, under RL_SWARM_CACHE/keys/), never in the shared
folder; its public key is published in the folder's keys/ once and never replaced (KeyRing.publish). A reader
pins a node's public key the first time it meets it, and from then on a record speaks for that node only when
its signature verifies under that key. The coordinator's key is pinned on disk too, by each machine that
joins, so a worker restarted next week still refuses a coordinator that is not the one it joined.

What is signed is the record's canonical JSON without its checksum and its signature (json_records.canonical_json).
"""

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import (CHECKSUM_KEY, SIGNATURE_KEY, canonical_json, read_json_bounded,
                                                record_checksum, write_json_create_only)
from workers.shared_folder.rejections import FolderError, RejectedFile, check_node_name, warn_once
from workers.shared_folder.safe_io import check_regular, list_folder, sync_folder

log = logging.getLogger(__name__)

COORDINATOR = "coordinator"      # the node id of the coordinator, whose key is the experiment's owner
KEY_SCHEMA = 1
KEY_BYTES = 4096                 # a public key file is about 200 bytes
PRIVATE_KEY_BYTES = 1024
MAX_PINNED = 4096                # peers' keys kept in memory; one forgotten is pinned again from the folder
# beside a key made by an rl-swarm that signs checkpoints and bases: a key without it is older, and an unsigned
# checkpoint or base in the folder may be that node's own (see NodeKey.predates_signed_files)
SIGNS_FILES = ".signs-files"


class UnknownSigner(RejectedFile):
    """No public key of the node a record speaks for has been published (yet): not read until there is one."""


def fingerprint(public: Ed25519PublicKey) -> str:
    """A short, readable name of a public key, for a person to compare between machines."""
    digest = hashlib.sha256(_raw(public)).hexdigest()[:16]
    return "ed25519:" + "-".join(digest[i:i + 4] for i in range(0, 16, 4))


def file_sha256(path: Path) -> str:
    """SHA-256 of a regular file, for a signed meta.json to name (read without following a link or blocking)."""
    check_regular(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def local_key_dir(cache_dir: Path, experiment_dir: Path) -> Path:
    """This machine's keys and pins for one experiment folder: never in the shared folder. Named by the
    experiment and its folder's path, so two GDRIVE_PATHs with one EXPERIMENT_NAME keep their keys apart."""
    where = hashlib.sha256(os.path.abspath(experiment_dir).encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return Path(cache_dir).expanduser() / "keys" / f"{experiment_dir.name}-{where}"


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _create_private_file(path: Path, data: bytes) -> bool:
    """Write `data` at `path` (mode 0600) only if nothing is there; True when this call created it. The temp
    file is synced, then hard-linked: a process racing to create the same key reads the winner's whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        sync_folder(path.parent)        # a key lost to a power cut, its public half published, locks the name out
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return True


def _read_private_file(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


class NodeKey:
    """A node's private Ed25519 key, kept in this machine's key folder (0700, the file 0600)."""

    def __init__(self, node: str, private: Ed25519PrivateKey, path: Path | None = None,
                 predates_signed_files: bool = False):
        self.node, self._private, self.path = check_node_name(node), private, path
        self.public = private.public_key()
        # made by an rl-swarm before checkpoints and bases were signed: an unsigned one may be this node's own.
        # Read from this machine's disk, not from when the key was made: `up` makes its workers' keys before they
        # start, so a worker never sees its key made, and a peer can plant an unsigned file before any start
        self.predates_signed_files = predates_signed_files

    @classmethod
    def load_or_create(cls, key_dir: Path, node: str) -> "NodeKey":
        """The node's key from `key_dir`, made there on first use: a restarted node keeps its key."""
        path = _private_dir(key_dir) / f"{check_node_name(node)}.key"
        marker = path.with_name(path.name + SIGNS_FILES)
        if not path.exists():
            _create_private_file(marker, b"")      # first: a key is never seen without it when this made it
            fresh = Ed25519PrivateKey.generate()
            _create_private_file(path, fresh.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        try:
            private = serialization.load_pem_private_key(_read_private_file(path, PRIVATE_KEY_BYTES), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise FolderError(f"{path}: this machine's key of {node!r} is unreadable ({exc}); move it away to make "
                              "a new one (the node then needs a new NODE_ID: its old key stays in the folder)") from exc
        if not isinstance(private, Ed25519PrivateKey):
            raise FolderError(f"{path}: not an Ed25519 key; move it away to make a new one")
        return cls(node, private, path, predates_signed_files=not marker.exists())

    def mark_signs_files(self) -> None:
        """Mark this key on this machine as one that signs its checkpoints and bases: unsigned ones are not its own."""
        if self.path is not None:
            _create_private_file(self.path.with_name(self.path.name + SIGNS_FILES), b"")
        self.predates_signed_files = False

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    def sign(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record with this node's signature over its canonical JSON."""
        body = {k: v for k, v in record.items() if k != SIGNATURE_KEY}
        signature = self._private.sign(canonical_json(body, without=()))
        return {**body, SIGNATURE_KEY: base64.b64encode(signature).decode("ascii")}

    def verify(self, record: dict[str, Any], where: str) -> dict[str, Any]:
        """The record without its signature when this node signed it (its own checkpoints); RejectedFile otherwise."""
        return _verified(record, self.public, self.node, where)


def _key_record(node: str, public: Ed25519PublicKey) -> dict[str, Any]:
    return {"schema": KEY_SCHEMA, "node": node, "ed25519": base64.b64encode(_raw(public)).decode("ascii"),
            "created_at": time.time()}


def _public_from(record: dict[str, Any], node: str, where: str) -> Ed25519PublicKey:
    if record.get("schema") != KEY_SCHEMA or record.get("node") != node or not isinstance(record.get("ed25519"), str):
        raise RejectedFile(f"{where}: not the public key of {node!r}; skipped")
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(record["ed25519"], validate=True))
    except ValueError as exc:
        raise RejectedFile(f"{where}: not an Ed25519 public key ({exc}); skipped") from exc


def _verified(record: dict[str, Any], key: Ed25519PublicKey | None, node: str, where: str) -> dict[str, Any]:
    """The record without its signature when `key` (node's) signed it; RejectedFile otherwise."""
    signature = record.get(SIGNATURE_KEY)
    if not isinstance(signature, str) or len(signature) > 200 or key is None:
        raise RejectedFile(f"{where}: not signed (written by an rl-swarm before signed records, or forged); "
                           "skipped")
    body = {k: v for k, v in record.items() if k != SIGNATURE_KEY}
    try:
        key.verify(base64.b64decode(signature, validate=True), canonical_json(body, without=()))
    except (InvalidSignature, ValueError) as exc:
        raise RejectedFile(f"{where}: its signature is not {node!r}'s (key {fingerprint(key)}): forged or "
                           "edited; skipped") from exc
    return body


class KeyRing:
    """The public keys this process trusts, by node: pinned on first sight from the folder's keys/ (first key
    published wins: the folder's key files are create-only), the coordinator's also pinned on disk in
    `pins_dir` when given (this machine's key folder), so every later start holds the same one."""

    def __init__(self, folder: ExperimentFolder, pins_dir: Path | None = None, unsigned_readable: bool = False):
        self.folder, self.pins_dir = folder, pins_dir
        self.unsigned_readable = unsigned_readable
        self._pinned: dict[str, Ed25519PublicKey] = {}

    @classmethod
    def for_viewing(cls, folder: ExperimentFolder, cache_dir: Path | None) -> "KeyRing":
        """For views that decide nothing (status, experiments, validate): the coordinator's key is pinned on this
        machine when met (under `cache_dir`, as a joiner pins it), and a folder an rl-swarm before signed records
        wrote still shows its unsigned schema-1 records.

        Such a folder is told from what a peer cannot remove: this machine holds no key folder of the experiment
        (none of its nodes ran here, no view pinned its coordinator), and no key at all is published in the
        folder. A deleted keys/coordinator.pub, or keys/ emptied, makes no experiment this machine has seen signed
        read unsigned records. `cache_dir` None: a view without a config, which the folder's keys alone decide for.
        """
        key_dir = None if cache_dir is None else local_key_dir(cache_dir, folder.root)
        try:
            published = bool(list_folder(folder.keys_dir, "*.pub"))
        except OSError:         # a Drive hiccup: read as a signed folder, the side that trusts nothing unsigned
            published = True
        seen_here = key_dir is not None and key_dir.is_dir()
        return cls(folder, pins_dir=None if key_dir is None else key_dir / "pins",
                   unsigned_readable=not seen_here and not published)

    def trust(self, key: NodeKey) -> None:
        """A key of this machine's own: its records verify under it whatever the folder says."""
        self._pinned[key.node] = key.public

    def publish(self, key: NodeKey) -> None:
        """Publish this node's public key, create-only; FolderError when the folder holds another key for it."""
        path = self.folder.public_key_file(key.node)
        if not write_json_create_only(path, _key_record(key.node, key.public)):
            published = self._read_published(key.node)
            if _raw(published) != _raw(key.public):
                raise FolderError(
                    f"{path} holds the key {fingerprint(published)}, not this machine's {key.fingerprint} for "
                    f"{key.node!r}: another machine runs as {key.node!r}, or this machine lost its key "
                    f"({key.path}); pick another NODE_ID")
        self.trust(key)

    def public_key(self, node: str) -> Ed25519PublicKey:
        """The key `node`'s records must verify under; UnknownSigner while none is published, OSError for a Drive
        hiccup."""
        pinned = self._pinned.get(node)
        if pinned is not None:
            return pinned
        pinned = self._pinned_on_disk(node) if node == COORDINATOR else None
        if pinned is None:
            pinned = self._read_published(node)
            if node == COORDINATOR and self.pins_dir is not None:
                pinned = self._pin_on_disk(node, pinned)
        if len(self._pinned) >= MAX_PINNED:
            del self._pinned[next(iter(self._pinned))]
        self._pinned[node] = pinned
        return pinned

    def pinned(self, node: str) -> Ed25519PublicKey | None:
        """The key this process pinned for `node`, without looking at any file; None while none is."""
        return self._pinned.get(node)

    def verify(self, record: dict[str, Any], node: str, where: str) -> dict[str, Any]:
        """The record without its signature when it is `node`'s; RejectedFile (UnknownSigner) otherwise."""
        if record.get(SIGNATURE_KEY) is None and self.unsigned_readable and record.get("schema") == 1:
            return record
        signature = record.get(SIGNATURE_KEY)
        if not isinstance(signature, str) or len(signature) > 200:
            _verified(record, None, node, where)        # raises: not signed, before any key is looked up
        return _verified(record, self.public_key(node), node, where)

    def coordinator_conflict(self) -> str | None:
        """One line when the folder's coordinator key is not the one this machine pinned; None otherwise."""
        if self.pins_dir is None:
            return None
        pinned = self._pinned_on_disk(COORDINATOR)
        try:
            published = self._read_published(COORDINATOR)
        except (RejectedFile, OSError):     # none yet, or unreadable now: nothing to compare
            return None
        if pinned is None or _raw(pinned) == _raw(published):
            return None
        where = self.folder.public_key_file(COORDINATOR)
        return (f"the experiment's coordinator key {fingerprint(published)} ({where}) is not the "
                f"{fingerprint(pinned)} this machine pinned when it joined: another coordinator took the experiment; "
                f"if you trust it, delete {self._pin_file(COORDINATOR)}")

    def _read_published(self, node: str) -> Ed25519PublicKey:
        """The folder's key of `node`; UnknownSigner while there is none, OSError for a Drive hiccup (the caller
        reads again later, as for any file)."""
        path = self.folder.public_key_file(node)
        try:
            record = read_json_bounded(path, KEY_BYTES, require_checksum=True)
        except FileNotFoundError:
            raise UnknownSigner(f"{path}: no public key of {node!r} published (yet)") from None
        return _public_from(record, node, str(path))

    def _pin_file(self, node: str) -> Path:
        return self.pins_dir / f"{node}.pub"

    def _pinned_on_disk(self, node: str) -> Ed25519PublicKey | None:
        if self.pins_dir is None:
            return None
        path = self._pin_file(node)
        try:
            record = read_json_bounded(path, KEY_BYTES, require_checksum=True)
        except FileNotFoundError:
            return None
        return _public_from(record, node, str(path))

    def _pin_on_disk(self, node: str, public: Ed25519PublicKey) -> Ed25519PublicKey:
        """Pin `public` in this machine's key folder unless a key is pinned already: the pinned one wins."""
        path = _private_dir(self.pins_dir) / f"{node}.pub"
        record = _key_record(node, public)
        data = json.dumps({**record, CHECKSUM_KEY: record_checksum(record)}).encode("utf-8")
        if _create_private_file(path, data):
            log.info("pinned %s's public key %s in %s", node, fingerprint(public), path)
            return public
        pinned = self._pinned_on_disk(node)
        if pinned is not None and _raw(pinned) != _raw(public):
            warn_once(f"{self.folder.public_key_file(node)}: not the key pinned in {path}; the pinned one is trusted")
        return pinned or public


T = TypeVar("T")


def signed_lines(parse: Callable[[dict[str, Any], str], T], node: str,
                 keyring: KeyRing) -> Callable[[dict[str, Any], str], T]:
    """A parser for `node`'s own log (metrics/<node>/metrics.jsonl, eval.jsonl): a line counts only when `node`
    signed it and it speaks for `node`; any other is refused (RejectedFile), so skipped and counted as bad.
    RejectedFile at once for a folder name that is no node name (it would become a key's path)."""
    check_node_name(node)

    def parse_signed(record: dict[str, Any], where: str) -> T:
        row = parse(keyring.verify(record, node, where), where)
        if getattr(row, "node", node) != node:
            raise RejectedFile(f"{where}: a line of {row.node!r} in {node!r}'s file; skipped")
        return row

    return parse_signed
