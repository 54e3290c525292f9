"""Every machine's supervisor files, read together: the coordinator's machine's logs/supervisor/ and the
logs/supervisor-<NODE_ID>/ of each machine that joined (ExperimentFolder.supervisor_dir), for `status`,
`experiments` and the plots. Each file has one writer, its machine; a reader takes from it only what that machine
may say (runs_on: its own workers' restarts and memory).
"""

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

from swarm_supervisor.readable import plain
from workers.shared_folder.folder import ExperimentFolder, runs_on
from workers.shared_folder.jsonl import read_jsonl, read_jsonl_last
from workers.shared_folder.protocol import EVENT_RESTART
from workers.shared_folder.rejections import RejectedFile, warn_once

log = logging.getLogger(__name__)
T = TypeVar("T")

FUTURE_S = 300.0       # an event dated further ahead than this is a wrong clock's, or a peer's crowding the others


def supervisor_records(folder: ExperimentFolder, file_of: Callable[[str | None], Path],
                       parse: Callable[[dict, str], T] = lambda row, _: row, last_bytes: int | None = None
                       ) -> tuple[list[tuple[str | None, T]], list[str]]:
    """Each machine's records in the file `file_of` names for it (ExperimentFolder.events_file_of,
    monitor_file_of), with the machine (None: the coordinator's; a NODE_ID: one that joined), and a line per file
    that could not be read (each logged once). last_bytes: only the newest records, within that many bytes."""
    machines: list[str | None] = [None]
    problems = []
    try:
        machines += folder.joined_machines()
    except OSError as exc:      # a Drive hiccup: the coordinator's machine alone
        problems.append(f"supervisor folders of machines that joined not listed: {exc}")
    records = []
    for machine in machines:
        path = file_of(machine)
        try:
            found = read_jsonl(path, parse) if last_bytes is None else read_jsonl_last(path, last_bytes, parse)
        except (RejectedFile, OSError) as exc:
            problems.append(str(exc))
            continue
        records.extend((machine, record) for record in found)
    for problem in problems:
        warn_once(problem)
    return records, problems


def supervisor_events(folder: ExperimentFolder, last_bytes: int | None = None
                      ) -> tuple[list[dict[str, Any]], list[str]]:
    """Every machine's events, oldest first, each with its "machine" (None: the coordinator's) and once (an
    event written twice by a retried append has one id); a fact about a worker (its restart, its failure) only from
    the machine that runs it (runs_on), and none dated in the future (a wrong clock, or a peer crowding out the
    others). And a line per file that could not be read."""
    records, problems = supervisor_records(folder, folder.events_file_of, last_bytes=last_bytes)
    latest = time.time() + FUTURE_S
    rows, seen = [], set()
    for machine, row in records:
        when, node, said = row.get("time"), row.get("node"), row.get("id")
        if not isinstance(when, (int, float)) or isinstance(when, bool) or not -1 < when <= latest:
            continue
        if isinstance(node, str) and not runs_on(machine, node):
            continue
        if isinstance(said, str):
            if said in seen:
                continue
            seen.add(said)
        rows.append({**row, "machine": machine})
    rows.sort(key=lambda row: row["time"])
    return rows, problems


def restarted_node(machine: str | None, row: dict[str, Any]) -> str | None:
    """The worker whose restart an event of `machine` records, when that machine may say so (runs_on)."""
    node = row.get("node")
    if row.get("kind") != EVENT_RESTART or not isinstance(node, str) or not runs_on(machine, node):
        return None
    return node


def count_restarts(folder: ExperimentFolder) -> int:
    """Worker restarts the supervisors recorded (events of kind "restart"; the coordinator machine's older files:
    by their sentence)."""
    rows, _ = supervisor_events(folder)
    return sum(restarted_node(row["machine"], row) is not None or (row["machine"] is None and "kind" not in row and
               "restarting from its last checkpoint" in str(row.get("event", ""))) for row in rows)


EVENTS_READ_BYTES = 64 * 1024     # of each machine's events.jsonl, by `status` and the notebooks' refreshes


def read_events(folder: ExperimentFolder, last: int = 8) -> list[str]:
    """The supervisors' newest events, for `rl-swarm status`: a machine that joined names itself ("[colab2] ..."),
    and files that could not be read are one line."""
    rows, problems = supervisor_events(folder, last_bytes=EVENTS_READ_BYTES)
    out = [plain(f"{len(problems)} supervisor file(s) not read: {problems[0][:200]}")] if problems else []
    for row in rows[-last:]:
        if isinstance(row.get("event"), str):
            said = f"[{row['machine']}] " if row["machine"] else ""
            out.append(time.strftime("%H:%M:%S ", time.localtime(row["time"])) + said + plain(row["event"][:200]))
    return out


def _mib(value: object) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return float(value) if ok else None


@dataclass(frozen=True)
class RecordedSample:
    """A line of a machine's monitor.jsonl (ExperimentFolder.monitor_file_of): per node (GPU MiB, RSS MiB), and the
    device's memory."""

    time: float
    nodes: dict[str, tuple[float | None, float | None]]
    device_used_mib: float | None
    device_total_mib: float | None

    @classmethod
    def from_json(cls, record: dict, where: str) -> "RecordedSample":
        when, nodes = record.get("time"), record.get("nodes")
        if _mib(when) is None or not isinstance(nodes, dict):
            raise RejectedFile(f"{where}: not a monitor sample (time and nodes)")
        return cls(time=float(when), nodes={str(node): (_mib(v.get("gpu_mib")), _mib(v.get("rss_mib")))
                                            for node, v in nodes.items() if isinstance(v, dict)},
                   device_used_mib=_mib(record.get("device_used_mib")),
                   device_total_mib=_mib(record.get("device_total_mib")))

    def of_machine(self, machine: str | None) -> "RecordedSample":
        """The sample without the nodes that machine does not run (runs_on)."""
        return replace(self, nodes={node: v for node, v in self.nodes.items() if runs_on(machine, node)})
