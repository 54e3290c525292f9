"""An experiment folder for the tests of signed records, and a worker's heartbeat to sign into it."""

import time
from pathlib import Path

from configs_env import SwarmConfig
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.protocol import Heartbeat, Status

EXPERIMENT = "e2e"


def signed_experiment(tmp_path: Path) -> tuple[SwarmConfig, ExperimentFolder]:
    cfg = SwarmConfig(gdrive_path=tmp_path / "drive", experiment_name=EXPERIMENT, cache_dir=tmp_path / "cache",
                      max_rounds=3)
    return cfg, ExperimentFolder(cfg.experiment_dir).create()


def beat(node: str, status: str = Status.WAITING) -> Heartbeat:
    now = time.time()
    return Heartbeat(node=node, role="worker", pid=1, host="h", instance="i", status=status, round=1,
                     started_at=now, updated_at=now)
