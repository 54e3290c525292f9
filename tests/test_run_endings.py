"""What `rl-swarm up` says of its own workers: while a resumed run starts, that they are starting (not what the run
before left in the folder)."""

import time

from configs_env import SwarmConfig
from swarm_supervisor.dashboard import status_line
from swarm_supervisor.handles import WorkerHandle
from swarm_supervisor.status import SwarmReader
from tests.helpers import node_exchange, viewer
from workers.processes import WorkerSpec
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.protocol import Heartbeat


class Process:
    """A worker process as the supervisor holds it; after SIGTERM it exits with `on_terminate` (None: it hangs on)."""

    def __init__(self, pid: int, exitcode: int | None = None, on_terminate: int | None = 0):
        self.pid, self.exitcode, self.on_terminate = pid, exitcode, on_terminate

    def is_alive(self) -> bool:
        return self.exitcode is None

    def terminate(self) -> None:
        if self.is_alive():
            self.exitcode = self.on_terminate

    def kill(self) -> None:
        if self.is_alive():
            self.exitcode = -9

    def join(self, timeout: float | None = None) -> None:
        pass


def beats(folder: ExperimentFolder, node: str, status: str, round_: int, pid: int, age_s: float = 0.0,
          role: str = "worker", instance: str = "i") -> None:
    at = time.time() - age_s
    node_exchange(folder, node).write_heartbeat(Heartbeat(node=node, role=role, pid=pid, host="h", instance=instance,
                                                          status=status, round=round_, started_at=at, updated_at=at))


def spec(cfg: SwarmConfig, node: str) -> WorkerSpec:
    return WorkerSpec(cfg=cfg, node=node, index=0, model_name="tiny", device="cpu", parent_pid=1)


def test_a_resumed_swarm_shows_its_workers_starting_not_what_the_run_before_left(tmp_path):
    folder = ExperimentFolder(tmp_path / "drive" / "experiments" / "e2e").create()
    beats(folder, "coordinator", "stopped", 12, pid=100, age_s=3600, role="coordinator", instance="before")
    beats(folder, "worker-1", "stopped", 12, pid=101, age_s=3600)
    beats(folder, "worker-2", "training", 13, pid=102, age_s=40)       # killed mid-round a moment ago: late
    cfg = viewer(folder)
    handles = [WorkerHandle(spec(cfg, "worker-1"), Process(201)), WorkerHandle(spec(cfg, "worker-2"), Process(202))]
    reader = SwarmReader(folder, cfg, "tiny", "cpu")
    swarm = reader.view(handles, own_coordinator="now")
    assert [(row.node_id, row.status, row.round, row.liveness) for row in swarm.nodes] == \
        [("coordinator", "starting", None, None), ("worker-1", "starting", None, None),
         ("worker-2", "starting", None, None)]
    line = status_line(swarm)
    assert "starting" in line and "stopped" not in line and "late" not in line, line
    # once this run's processes beat, they show as they say
    beats(folder, "coordinator", "running", 12, pid=300, role="coordinator", instance="now")
    beats(folder, "worker-1", "generating", 13, pid=201)
    swarm = reader.view(handles, own_coordinator="now")
    assert [(row.status, row.round) for row in swarm.nodes] == [("running", 12), ("generating", 13), ("starting", None)]
    assert swarm.phase == "running" and "ETA" in status_line(swarm)
