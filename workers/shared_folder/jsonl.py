"""The swarm's append-only logs in the shared folder (metrics, held-out evaluations, events, monitor samples):
one appender and one bounded reader for all of them.

A line is a record only when it is a JSON object within bounded_json's limits that its parser accepts; any
other line is warned about, counted and skipped, and the reading goes on.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

from workers.shared_folder.json_records import parse_json
from workers.shared_folder.rejections import RejectedFile, warn_once
from workers.shared_folder.appends import append_line
from workers.shared_folder.safe_io import file_size, read_from, read_whole

log = logging.getLogger(__name__)

MAX_JSONL_BYTES = 64 * 1024 * 1024
T = TypeVar("T")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append the record as one whole line, synced (appends.append_line): a crash can only tear the last line."""
    append_line(path, (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8"))


@dataclass(frozen=True)
class JsonLines(Generic[T]):
    """What one read of a JSONL file found: its valid records, a line per bad line, where the next read starts."""

    records: list[T]
    bad: list[str]          # "<where>: why", one per skipped line (each was also logged)
    end: int                # the byte offset after the last line read

    def __iter__(self) -> Iterator[T]:
        return iter(self.records)


def _as_record(record: dict[str, Any], where: str) -> dict[str, Any]:
    return record


def read_jsonl(path: Path, parse: Callable[[dict[str, Any], str], T] = _as_record,
               max_bytes: int = MAX_JSONL_BYTES) -> JsonLines[T]:
    """Every line of a JSONL file parsed by `parse` (an object per line); nothing while the file is missing.

    A bad line (not JSON, not an object, refused by `parse`) is logged, counted in `bad` and skipped.
    RejectedFile when the file is not a regular file or is over `max_bytes`; OSError for a Drive hiccup.
    """
    try:
        data = read_whole(path, max_bytes)
    except FileNotFoundError:
        return JsonLines([], [], 0)
    return _parse_lines(data, 0, str(path), parse)


def read_jsonl_tail(path: Path, offset: int, parse: Callable[[dict[str, Any], str], T] = _as_record,
                    max_bytes: int = 1024 * 1024) -> JsonLines[T]:
    """The whole lines after `offset` of a growing JSONL file, at most `max_bytes` of them a call.

    A torn last line waits for its newline (the next call starts at `end`); a line longer than `max_bytes`
    is skipped as bad rather than waited for. Raises as read_jsonl, and FileNotFoundError while it is missing.
    """
    chunk = read_from(path, offset, max_bytes)
    complete = chunk[: chunk.rfind(b"\n") + 1]
    if not complete and len(chunk) == max_bytes:
        why = f"{path} at byte {offset}: a line over {max_bytes} bytes; skipped"
        log.warning("%s", why)
        return JsonLines([], [why], offset + len(chunk))
    return _parse_lines(complete, offset, str(path), parse)


def read_jsonl_last(path: Path, max_bytes: int, parse: Callable[[dict[str, Any], str], T] = _as_record
                    ) -> JsonLines[T]:
    """The whole lines within the last `max_bytes` of a JSONL file (all of a shorter one): the newest records of
    a log that may be long, at a bounded cost. Nothing while the file is missing; raises as read_jsonl."""
    try:
        start = max(0, file_size(path) - max_bytes)
        chunk = read_from(path, start, max_bytes)
    except FileNotFoundError:
        return JsonLines([], [], 0)
    if start:       # the first line was cut by the window: it starts after the first newline
        cut = chunk.find(b"\n") + 1
        chunk, start = (chunk[cut:], start + cut) if cut else (b"", start + len(chunk))
    return _parse_lines(chunk[: chunk.rfind(b"\n") + 1], start, str(path), parse)


def _parse_lines(data: bytes, offset: int, name: str, parse: Callable[[dict[str, Any], str], T]) -> JsonLines[T]:
    """Lines are named by number when read from the start, else by byte offset."""
    records: list[T] = []
    bad: list[str] = []
    position = offset
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()                 # the newline that ends the last line
    for number, raw in enumerate(lines, start=1):
        where = f"{name} line {number}" if offset == 0 else f"{name} at byte {position}"
        position += len(raw) + 1
        try:
            record = parse_json(raw, where)
            if not isinstance(record, dict):
                raise RejectedFile(f"{where}: expected a JSON object, got {type(record).__name__}; skipped")
            records.append(parse(record, where))
        except RejectedFile as error:
            warn_once(str(error))       # once: a whole log is read again by each `validate` or refresh
            bad.append(str(error))
    return JsonLines(records, bad, offset + len(data))
