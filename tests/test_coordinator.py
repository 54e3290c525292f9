"""The coordinator advances when every live worker is done, or after its interval once someone is."""

import threading
import time

import pytest

from configs_env import SwarmConfig
from swarm_supervisor.coordinator import Coordinator
from workers.shared_folder.folder import ExperimentFolder
from tests.helpers import keyring, node_exchange, node_key, write_as
from workers.shared_folder.exchange import read_round_state


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
    coordinator = Coordinator(cfg, folder, stop, lambda: set(workers), node_key(folder, "coordinator"))
    yield cfg, folder, coordinator, workers
    stop.set()
    if coordinator.is_alive():
        coordinator.join(timeout=5)


def finish(folder, round_, node):
    write_as(folder, node, folder.reward_file(round_, node), {"node": node, "round": round_})
    write_as(folder, node, folder.rollout_file(round_, node), {"node": node})


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
    assert read_round_state(folder, keyring(folder), 3).run_first_round == 1       # one run, begun at round 1
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
        write_as(folder, "coordinator", folder.round_state_file(round_), {"schema": 1, "round": round_,
                                                                         "max_rounds": 3, "started_at": 0,
                                                                         "reason": "x"})
    stop = threading.Event()
    coordinator = Coordinator(cfg, folder, stop, lambda: set(workers), node_key(folder, "coordinator"))
    coordinator.start()
    try:
        wait_until(lambda: coordinator.round == 2)
        for node in workers:
            finish(folder, 2, node)
        wait_until(lambda: folder.state_rounds() == [1, 2, 3])
        # round 3 begins this run: the pace leaves out the time from round 2's start to its (the downtime)
        assert read_round_state(folder, keyring(folder), 3).run_first_round == 3
    finally:
        stop.set()
        coordinator.join(timeout=5)


def beat(node: str, age_s: float, status: str = "training", instance: str = "i"):
    from workers.shared_folder.protocol import Heartbeat

    now = time.time()
    return Heartbeat(node=node, role="worker", pid=1, host="h", instance=instance, status=status, round=1,
                     started_at=now - 100, updated_at=now - age_s)


def test_a_worker_is_alive_late_or_gone_by_its_heartbeat_and_only_gone_ones_are_not_waited_for():
    from workers.shared_folder.exchange import live_workers, liveness

    beats = {"w-1": beat("w-1", 2), "w-2": beat("w-2", 40), "w-3": beat("w-3", 130), "w-4": beat("w-4", 1, "done")}
    assert {n: liveness(b, peer_timeout=120) for n, b in beats.items()} == \
        {"w-1": "alive", "w-2": "late", "w-3": "gone", "w-4": "gone"}
    assert live_workers(beats, peer_timeout=120) == {"w-1", "w-2"}


def test_the_coordinator_says_when_a_worker_turns_late_gone_and_alive_again(tmp_path, monkeypatch):
    import swarm_supervisor.coordinator as coordinator_module

    monkeypatch.setattr(coordinator_module, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(coordinator_module, "LIVENESS_READ_S", 0.05)
    cfg = SwarmConfig.from_env({"GDRIVE_PATH": str(tmp_path), "MAX_ROUNDS": "3", "NUM_WORKERS": "2",
                                "PEER_TIMEOUT": "4"})
    folder = ExperimentFolder(cfg.experiment_dir).create()
    events: list[str] = []
    stop = threading.Event()
    coordinator = Coordinator(cfg, folder, stop, lambda: set(), node_key(folder, "coordinator"),
                              on_event=events.append)
    exchange = node_exchange(folder, "w-1")
    exchange.write_heartbeat(beat("w-1", 0))
    coordinator.start()
    try:
        wait_until(lambda: coordinator.round == 1)
        exchange.write_heartbeat(beat("w-1", 1.5))        # a quarter of PEER_TIMEOUT without a beat
        wait_until(lambda: any("w-1 is late" in e for e in events))
        exchange.write_heartbeat(beat("w-1", 5))
        wait_until(lambda: any("w-1 is gone (no heartbeat for 5s): rounds no longer wait for it" in e
                               for e in events))
        exchange.write_heartbeat(beat("w-1", 0))
        wait_until(lambda: any("w-1 is alive again" in e for e in events))
        exchange.write_heartbeat(beat("w-1", 0, status="done"))    # a normal exit is no news
        time.sleep(0.3)
        exchange.write_heartbeat(beat("w-1", 0, instance="restarted"))   # nor a new process (resume, restart)
        time.sleep(0.3)
    finally:
        stop.set()
        coordinator.join(timeout=5)
    assert [e.split(":")[0].split(" (")[0] for e in events if "w-1" in e] == \
        ["w-1 is late", "w-1 is gone", "w-1 is alive again"]


def test_archiving_old_rollouts_never_follows_a_link_a_peer_planted_in_the_archive(swarm, tmp_path):
    """archives/ is in the shared folder too: a link planted there must not have the coordinator delete a folder
    of this machine that bears a round's name, nor move the swarm's rollouts out of the shared folder."""
    cfg, folder, coordinator, _ = swarm
    outside = tmp_path / "this-machine"
    (outside / "round_1").mkdir(parents=True)
    (outside / "round_1" / "precious.txt").write_text("not the swarm's")
    archive = cfg.gdrive_path / "archives" / cfg.experiment_name
    archive.mkdir(parents=True)
    (archive / "rollouts").symlink_to(outside)
    write_as(folder, "w-1", folder.rollout_file(1, "w-1"), {"node": "w-1"})
    coordinator.round = 3
    coordinator.retire_old_rollouts()
    assert (outside / "round_1" / "precious.txt").read_text() == "not the swarm's"
    assert sorted(p.name for p in outside.iterdir()) == ["round_1"]
    assert not (archive / "rollouts").is_symlink()
    assert (archive / "rollouts" / "round_1" / "stage_0" / "w-1.json").is_file()
    assert not folder.rollout_dir(1).exists()
    # a round archived again (an experiment started anew under its name) replaces the archived one, nothing left
    write_as(folder, "w-2", folder.rollout_file(1, "w-2"), {"node": "w-2"})
    coordinator.retire_old_rollouts()
    assert [p.name for p in (archive / "rollouts").iterdir()] == ["round_1"]
    assert [p.name for p in (archive / "rollouts" / "round_1" / "stage_0").iterdir()] == ["w-2.json"]


def test_a_coordinator_killed_mid_archive_has_its_next_start_finish_what_it_left_aside(swarm, tmp_path):
    """Archiving round N again renames the archived round_N aside (`.round_N.<writer>.old`), moves the new one in,
    then removes the old: a kill between those left the hidden folder in archives/ for good."""
    from tests.hostile_files import dead_pid
    from workers.shared_folder.leftovers import writer_tag

    cfg, folder, coordinator, _ = swarm
    archive = cfg.gdrive_path / "archives" / cfg.experiment_name / "rollouts"
    killed = writer_tag().replace(writer_tag().split("@")[0], str(dead_pid()))
    for name in ("round_1", f".round_1.{killed}.a1b2c3d4.old", f".round_2.{killed}.e5f6a7b8.old"):
        (archive / name / "stage_0").mkdir(parents=True)
        (archive / name / "stage_0" / "w-1.json").write_text(name)
    outside = tmp_path / "this-machine"
    outside.mkdir()
    (outside / "notes.txt").write_text("kept")
    (archive / f".round_3.{killed}.c9d0e1f2.old").symlink_to(outside)     # a peer's
    coordinator.start()
    wait_until(lambda: folder.state_rounds() == [1])
    # round 1 was moved in before the kill: the old one goes; round 2 was not: the archived one is back
    assert sorted(p.name for p in archive.iterdir()) == ["round_1", "round_2"]
    assert (archive / "round_1" / "stage_0" / "w-1.json").read_text() == "round_1"
    assert (archive / "round_2" / "stage_0" / "w-1.json").read_text().startswith(".round_2.")
    assert (outside / "notes.txt").read_text() == "kept"
