"""The coordinator advances when every live worker is done, or after its interval once someone is."""

import threading
import time

import pytest

from configs_env import SwarmConfig
from swarm_supervisor.coordinator import Coordinator
from workers.folder import ExperimentFolder, write_json_atomic


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def swarm(tmp_path):
    cfg = SwarmConfig.from_env({"GDRIVE_PATH": str(tmp_path), "MAX_ROUNDS": "3", "NUM_WORKERS": "2",
                                "COORDINATOR_ROUND_INTERVAL": "1", "ROLLOUT_CLEANUP_ENABLED": "true",
                                "ROLLOUT_KEEP_LAST_N_ROUNDS": "1", "ROLLOUT_ARCHIVE_OLD": "true"})
    folder = ExperimentFolder(cfg.experiment_dir).create()
    stop = threading.Event()
    workers = {"w-1", "w-2"}
    coordinator = Coordinator(cfg, folder, stop, lambda: set(workers))
    yield cfg, folder, coordinator, workers
    stop.set()
    if coordinator.is_alive():
        coordinator.join(timeout=5)


def finish(folder, round_, node):
    write_json_atomic(folder.reward_file(round_, node), {"node": node, "round": round_})
    write_json_atomic(folder.rollout_file(round_, 0, node), {"node": node})


def test_rounds_advance_when_all_workers_are_done_and_the_swarm_finishes(swarm):
    cfg, folder, coordinator, _ = swarm
    coordinator.start()
    wait_until(lambda: folder.state_rounds() == [1])
    finish(folder, 1, "w-1")
    time.sleep(0.3)
    assert folder.state_rounds() == [1]              # w-2 is alive and not done: wait
    finish(folder, 1, "w-2")
    wait_until(lambda: folder.state_rounds() == [1, 2])
    for node in ("w-1", "w-2"):
        finish(folder, 2, node)
    wait_until(lambda: folder.state_rounds() == [1, 2, 3])
    for node in ("w-1", "w-2"):
        finish(folder, 3, node)
    wait_until(coordinator.finished.is_set)
    assert folder.finished_file.exists()
    # ROLLOUT_KEEP_LAST_N_ROUNDS=1 keeps the current and the previous round; older ones are archived
    assert not (folder.root / "rollouts" / "round_1").exists()
    assert (cfg.gdrive_path / "archives" / cfg.experiment_name / "rollouts" / "round_1" / "stage_0").is_dir()
    assert (folder.root / "rollouts" / "round_2").exists()


def test_the_interval_moves_on_without_a_slow_worker_but_never_with_nobody_done(swarm):
    _, folder, coordinator, _ = swarm
    coordinator.start()
    wait_until(lambda: folder.state_rounds() == [1])
    time.sleep(1.3)
    assert folder.state_rounds() == [1]              # nobody done: an empty round teaches nothing
    finish(folder, 1, "w-1")
    wait_until(lambda: folder.state_rounds() == [1, 2], timeout=3)


def test_a_restarted_coordinator_resumes_at_its_last_round(swarm):
    cfg, folder, _, workers = swarm
    for round_ in (1, 2):
        write_json_atomic(folder.round_state_file(round_), {"schema": 1, "round": round_, "max_rounds": 3,
                                                           "started_at": 0, "reason": "x"})
    stop = threading.Event()
    coordinator = Coordinator(cfg, folder, stop, lambda: set(workers))
    coordinator.start()
    try:
        wait_until(lambda: coordinator.round == 2)
        for node in workers:
            finish(folder, 2, node)
        wait_until(lambda: folder.state_rounds() == [1, 2, 3])
    finally:
        stop.set()
        coordinator.join(timeout=5)
