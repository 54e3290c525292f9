"""A hostile shared folder for the tests of issue 17: one entry of each kind its readers must skip, and an
experiment with a file outside it for a planted link to point at."""

import json
import os
import subprocess
import sys
from pathlib import Path

from configs_env import SwarmConfig
from tests.helpers import rollouts_record
from workers.shared_folder.folder import ExperimentFolder


def sealed(record: dict) -> str:
    """A record as write_json_atomic seals it: a forger can compute the checksum too."""
    from workers.shared_folder.json_records import record_checksum

    return json.dumps({**record, "sha256": record_checksum(record)})


# what each planted kind holds, where it is a file; the reader's refusal names the reason after the colon
HOSTILE_TEXT = {
    "empty file": "",
    "1e999": '{"schema": 1, "round": 1e999}',
    "400-digit integer": '{"schema": 1, "round": ' + "9" * 400 + "}",
    "nested 10000 deep": "[" * 10_000 + "]" * 10_000,
    "NaN": '{"schema": 1, "round": NaN}',
}
HOSTILE_REASON = {"FIFO": "a FIFO", "socket": "a socket", "symlink to a file outside": "a symbolic link",
                  "directory": "a directory", "empty file": "not valid JSON", "oversized": "over the",
                  "1e999": "beyond a float's range", "400-digit integer": "beyond a float's range",
                  "nested 10000 deep": "nested deeper than 64 levels", "NaN": "NaN is not a number"}


def plant_entry(path: Path, kind: str, outside: Path, max_bytes: int = 4 * 1024 * 1024) -> Path:
    """One hostile entry of `kind` (a key of HOSTILE_REASON) at `path`; `outside` is what a planted link points at."""
    import socket

    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "FIFO":
        os.mkfifo(path)
    elif kind == "socket":       # bound by its short relative name: a socket's path is limited to ~100 bytes
        here = os.getcwd()
        os.chdir(path.parent)
        try:
            with socket.socket(socket.AF_UNIX) as server:
                server.bind(path.name)
        finally:
            os.chdir(here)
    elif kind == "symlink to a file outside":
        path.symlink_to(outside)
    elif kind == "directory":
        path.mkdir()
    elif kind == "oversized":
        path.write_text('{"pad": "' + "x" * max_bytes + '"}')
    else:
        path.write_text(HOSTILE_TEXT[kind])
    return path


def plant_hostile(directory: Path, outside: Path, max_bytes: int = 4 * 1024 * 1024) -> dict[str, Path]:
    """Every hostile kind in `directory`, as hostile-<n>.json (names a node could have), by kind."""
    return {kind: plant_entry(directory / f"hostile-{n}.json", kind, outside, max_bytes)
            for n, kind in enumerate(HOSTILE_REASON, start=1)}


# what a planted link points at: a record a reader would accept, were it to follow the link
OUTSIDE_TEXT = sealed(rollouts_record("outsider"))


def hostile_experiment(tmp_path: Path) -> tuple[SwarmConfig, ExperimentFolder, Path]:
    """An experiment of 2 rounds, and the file outside it that holds OUTSIDE_TEXT."""
    cfg = SwarmConfig.from_env({"GDRIVE_PATH": str(tmp_path / "drive"), "MAX_ROUNDS": "2",
                                "RL_SWARM_CACHE": str(tmp_path / "cache")})
    folder = ExperimentFolder(cfg.experiment_dir).create()
    outside = tmp_path / "outside.json"
    outside.write_text(OUTSIDE_TEXT)
    return cfg, folder, outside


def dead_pid() -> int:
    """The pid of a process that has exited: a killed writer's, in the name of what it left."""
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait(timeout=60)
    return finished.pid
