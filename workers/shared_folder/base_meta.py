"""The experiment's warmed-up base (base/ in the folder) as a reader sees it: its meta.json, signed by the
experiment's coordinator with the SHA-256 of its weights, read without loading the learning code that makes the
base (workers.warmup).

Every new worker starts from the base, so a base a peer planted would be every new worker's start: only the
coordinator, whose key the workers pin, signs one. A base from an rl-swarm before signed bases has no signature;
it is still taken by a node whose key is from before signed files too (NodeKey.predates_signed_files: that node
may have started from it), never by a node whose key signs its files, nor by the coordinator of such a key.
"""

import logging
from typing import Any

from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import SIGNATURE_KEY, read_json_bounded
from workers.shared_folder.rejections import RejectedFile
from workers.shared_folder.signing import COORDINATOR, KeyRing, NodeKey

log = logging.getLogger(__name__)

BASE_META_SCHEMA = 2     # base/meta.json's own version: 2 signed by the coordinator with its weights' SHA-256
BASE_WEIGHTS = "model.safetensors"
META_BYTES = 64 * 1024


def sign_base_meta(record: dict[str, Any], weights_sha256: str, key: NodeKey) -> dict[str, Any]:
    """base/meta.json for weights of that SHA-256, signed by the experiment's coordinator `key`."""
    return key.sign({**record, "schema": BASE_META_SCHEMA, "files": {BASE_WEIGHTS: weights_sha256}})


def signed_base_meta(folder: ExperimentFolder, keyring: KeyRing, unsigned_ok: bool = False) -> dict[str, Any] | None:
    """The base's meta.json when the experiment's coordinator signed it (`files` names its weights' SHA-256, for
    the loader to check); None when there is no base. RejectedFile, one line starting with the base's folder,
    for one that is unreadable, unsigned (unless `unsigned_ok`), or signed by another key. OSError for a Drive
    hiccup."""
    path = folder.base_dir / "meta.json"
    try:
        record = read_json_bounded(path, max_bytes=META_BYTES)
    except FileNotFoundError:
        return None
    except RejectedFile as error:
        raise RejectedFile(f"{folder.base_dir}: its meta.json cannot be read ({error})") from error
    if SIGNATURE_KEY not in record:
        if not unsigned_ok:
            raise RejectedFile(f"{folder.base_dir}: its meta.json is not signed by the experiment's coordinator "
                               "(a peer's, or made by an rl-swarm before signed bases)")
        log.warning("%s: its meta.json is not signed (made by an rl-swarm before signed bases); used, as this "
                    "node's key is as old", folder.base_dir)
        return record
    try:
        body = keyring.verify(record, COORDINATOR, str(path))
    except RejectedFile as error:
        raise RejectedFile(f"{folder.base_dir}: its meta.json is not the experiment's coordinator's "
                           f"({str(error).removeprefix(f'{path}: ').removesuffix('; skipped')})") from error
    files = body.get("files")
    if not isinstance(files, dict) or not isinstance(files.get(BASE_WEIGHTS), str):
        raise RejectedFile(f"{folder.base_dir}: its meta.json names no SHA-256 of its weights")
    return body
