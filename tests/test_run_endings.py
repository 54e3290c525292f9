"""What `rl-swarm up` says of its own workers: while a resumed run starts, that they are starting (not what the run
before left in the folder); when it ends, how each one ended (finished, stopped at round N, failed: why)."""

import time

from configs_env import SwarmConfig
from swarm_supervisor.dashboard import Dashboard, status_line
from swarm_supervisor.endings import endings, node_ranges
from swarm_supervisor.handles import WorkerHandle
from swarm_supervisor.reports import summary
from swarm_supervisor.status import NodeRow, SwarmReader
import swarm_supervisor.supervisor as supervisor_module
from swarm_supervisor.supervisor import Supervisor
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


def test_a_stopped_run_says_how_each_worker_ended_never_the_stage_it_was_in(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor_module, "SHUTDOWN_GRACE_S", 1.0)     # worker-2 hangs on: killed after it
    cfg = SwarmConfig.from_env({"GDRIVE_PATH": str(tmp_path / "drive"), "EXPERIMENT_NAME": "e2e",
                                "MAX_ROUNDS": "100", "RL_SWARM_CACHE": str(tmp_path / "cache")})
    nodes = ["worker-1", "worker-2", "worker-3", "worker-4", "worker-5"]
    supervisor = Supervisor(cfg, [spec(cfg, node) for node in nodes], run_coordinator=False, model_label="tiny",
                            device_label="cpu", dashboard=Dashboard(shown=False))
    folder = supervisor.folder.create()
    processes = [Process(201), Process(202, on_terminate=None), Process(203, exitcode=1),
                 Process(204, on_terminate=-15), Process(205)]
    for handle, process in zip(supervisor.handles, processes):
        handle.process = process
    supervisor.handles[2].failed, supervisor.handles[2].last_error = True, "RuntimeError: boom"
    beats(folder, "worker-1", "stopped", 12, pid=201)           # stopped as asked, its round 12 checkpointed
    beats(folder, "worker-2", "training", 12, pid=202)          # hangs on in round 13: killed after the grace
    beats(folder, "worker-3", "crashed", 7, pid=203)
    beats(folder, "worker-4", "training", 9, pid=104, age_s=3600)     # the run before's: this one never beat
    beats(folder, "worker-5", "done", 100, pid=205)
    supervisor.request_stop()
    supervisor._shutdown()
    printed = summary(supervisor, 1.0, 130)
    assert printed.splitlines()[1:] == [
        "  worker-1: stopped at round 12, reward -, held-out -, restarts 0",
        "  worker-2: stopped at round 12 (killed: it did not stop within 1s), reward -, held-out -, restarts 0",
        "  worker-3: failed at round 7: RuntimeError: boom, reward -, held-out -, restarts 0",
        "  worker-4: stopped while starting, reward -, held-out -, restarts 0",
        "  worker-5: finished at round 100, reward -, held-out -, restarts 0"]


def ended(node: str, status: str, round_: int | None, reward: float | None = None, error: str | None = None,
          **extra) -> NodeRow:
    return NodeRow(node_id=node, role="worker", status=status, round=round_, reward=reward, accuracy=None,
                   reward_trend=(), local_rollouts=None, external_rollouts=None, gpu_mib=None, ram_mib=None,
                   restarts=extra.pop("restarts", 0), heartbeat_age_s=None, last_error=error, **extra)


def test_a_stopped_swarm_of_24_workers_is_summed_up_in_a_line_per_way_of_ending():
    rows = [ended(f"worker-{i}", "stopped", 12 + i % 2, reward=0.25 * (i % 2), held_out_start=0.25, held_out=0.5,
                  restarts=1) for i in range(1, 21) if i != 7]
    rows.insert(6, ended("worker-7", "stopped", 12, error="killed: it did not stop within 30s"))
    rows += [ended("worker-21", "failed", 12, error="Traceback ...\nCUDA out of memory")]
    rows += [ended(f"worker-{i}", "stopped", None) for i in (22, 23, 24)]
    assert [f"{e.words()}, {e.numbers()}" for e in endings(rows)] == [
        "worker-1..6, 8..20: stopped at round 12-13, mean reward 0.118, mean held-out 25.0% -> 50.0%, restarts 19",
        "worker-7: stopped at round 12 (killed: it did not stop within 30s), reward -, held-out -, restarts 0",
        "worker-21: failed at round 12: CUDA out of memory, reward -, held-out -, restarts 0",
        "worker-22..24: stopped while starting, mean reward -, mean held-out -, restarts 0"]
    assert len(endings(rows[:8])) == 8          # a few workers: a line each
    # a worker of another machine, still running, whose heartbeat's status holds braces
    assert endings([ended("colab", "{0} {x}", 5)])[0].words() == "colab: {0} {x} at round 5"


def test_node_names_are_listed_in_runs():
    assert node_ranges([f"worker-{i}" for i in (1, 2, 3, 5, 7, 8)] + ["colab", "worker-9", "w01"]) == \
        "worker-1..3, 5, 7..8, colab, worker-9, w01"
