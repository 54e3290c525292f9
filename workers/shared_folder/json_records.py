"""JSON records in the shared folder: parsed within bounds, sealed with a checksum, written whole, read back checked.

Every record a node writes carries the SHA-256 of its canonical JSON, so a half-synced or edited file is skipped
rather than trusted; signing signs the same canonical text. The bytes go through safe_io.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

from workers.shared_folder import bounded_json
from workers.shared_folder.safe_io import RejectedFile, read_whole, write_atomic, write_create_only

MAX_RECORD_BYTES = 4 * 1024 * 1024     # a round's rollouts of one node: I*G completions, far below this
CHECKSUM_KEY = "sha256"
SIGNATURE_KEY = "signature"     # the writer's Ed25519 signature over the rest (workers.shared_folder.signing)


def canonical_json(record: dict[str, Any], without: tuple[str, ...] = (CHECKSUM_KEY,)) -> bytes:
    """The record without the `without` keys, serialised canonically (sorted keys, no spaces, ASCII): what
    its checksum and its signature cover, the same text on both sides whatever the key order, float
    spelling or escapes in the file."""
    body = {key: value for key, value in record.items() if key not in without}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def record_checksum(record: dict[str, Any]) -> str:
    """SHA-256 of the record without its checksum key (a signature included): a half-synced file fails it."""
    return hashlib.sha256(canonical_json(record)).hexdigest()


def _sealed_bytes(record: dict[str, Any]) -> bytes:
    # the round trip turns tuples into lists and non-string keys into strings, exactly as a reader sees them
    body = json.loads(json.dumps({k: v for k, v in record.items() if k != CHECKSUM_KEY}, allow_nan=False))
    sealed = {**body, CHECKSUM_KEY: record_checksum(body)}
    return json.dumps(sealed, separators=(",", ":"), allow_nan=False).encode("utf-8")


def write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one (safe_io.write_atomic); the record gains a
    checksum."""
    write_atomic(path, _sealed_bytes(record))


def write_json_create_only(path: Path, record: dict[str, Any]) -> bool:
    """Write the sealed record at `path` only if nothing is there (safe_io.write_create_only): True when this
    call created it, False when a file was there already (it is left as it is)."""
    return write_create_only(path, _sealed_bytes(record))


def parse_json(data: bytes, where: str) -> Any:
    """The JSON value of `data`, bounded (see bounded_json); RejectedFile naming `where` and why when refused."""
    try:
        return bounded_json.loads(data.decode("utf-8"))
    except bounded_json.RefusedJSON as exc:
        raise RejectedFile(f"{where}: {exc}; skipped") from exc
    except ValueError as exc:         # bad UTF-8 or JSON, an empty file
        raise RejectedFile(f"{where}: not valid JSON ({exc.__class__.__name__}: {str(exc)[:80]}); skipped") from exc


def read_json_bounded(path: Path, max_bytes: int = MAX_RECORD_BYTES, *,
                      require_checksum: bool = False) -> dict[str, Any]:
    """One JSON object from the folder, its checksum checked and removed.

    Raises FileNotFoundError while the file is missing (or not synced yet), OSError for a Drive hiccup
    (the caller tries again later), and RejectedFile naming the file and why when it is bad: not a regular
    file (a link, FIFO, directory...), over `max_bytes`, not JSON, beyond bounded_json's limits, or not an
    object. A record without a checksum is accepted only when require_checksum is False (files not
    written by write_json_atomic, such as checkpoint meta files).
    """
    return sealed_record(read_whole(path, max_bytes), path, require_checksum=require_checksum)


def sealed_record(data: bytes, path: Path, *, require_checksum: bool = False) -> dict[str, Any]:
    """read_json_bounded's object from bytes already read from `path`."""
    record = parse_json(data, str(path))
    if not isinstance(record, dict):
        raise RejectedFile(f"{path}: expected a JSON object, got {type(record).__name__}; skipped")
    claimed = record.pop(CHECKSUM_KEY, None)
    if claimed is None:
        if require_checksum:
            raise RejectedFile(f"{path}: no checksum (written by an older rl-swarm or by hand); skipped")
        return record
    try:
        intact = isinstance(claimed, str) and claimed == record_checksum(record)
    except (ValueError, RecursionError):     # NaN or a nesting no writer produces: not what was sealed
        intact = False
    if not intact:
        raise RejectedFile(f"{path}: checksum mismatch (half-synced or edited); skipped")
    return record
