"""What a round costs outside its work: a worker's waits and writes stay cheap however long the run and however
fast its rounds (the milliseconds themselves are in bench/NOTES.md)."""

import os
import threading
import time

import pytest

from configs_env import SwarmConfig
from tests.helpers import keyring, node_exchange, write_as
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.protocol import Heartbeat, RoundState, Status


@pytest.fixture
def folder(tmp_path):
    return ExperimentFolder(tmp_path / "drive" / "experiments" / "e")


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout}s"
        time.sleep(0.01)


def settles(predicate, timeout: float) -> bool:
    """Whether `predicate` holds within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def round_found(worker, at_least: int, timeout: float = 20) -> int:
    """The round the worker's wait for a round >= at_least returns, waited for at most `timeout` seconds (a
    worker that finds none waits for minutes before it gives up on the coordinator)."""
    found = []
    waiting = threading.Thread(target=lambda: found.append(worker.wait_for_round(at_least)), daemon=True)
    waiting.start()
    waiting.join(timeout)
    if waiting.is_alive():
        worker.stop.set()
        waiting.join(5)
    assert found and found[0] is not None, f"no round >= {at_least} found in {timeout}s"
    return found[0].round


def waiting_worker(folder: ExperimentFolder, monkeypatch, rounds: range):
    """A worker of a swarm whose coordinator started `rounds`, its look at state/ counted at every poll."""
    import workers.worker as worker_module
    from workers.worker import Worker, WorkerSpec

    for round_ in rounds:
        write_as(folder, "coordinator", folder.round_state_file(round_),
                 RoundState(round_, 10_000, time.time(), "all workers done").to_json())
    cfg = SwarmConfig.from_env({"GDRIVE_PATH": str(folder.root.parent.parent), "EXPERIMENT_NAME": folder.root.name,
                                "RL_SWARM_CACHE": str(folder.root.parent.parent / "cache"), "MAX_ROUNDS": "10000"})
    monkeypatch.setattr(worker_module, "ROUND_POLL_S", 0.01)
    worker = Worker(WorkerSpec(cfg=cfg, node="w-1", index=0, model_name="m", device="cpu",
                               parent_pid=os.getppid()), threading.Event())
    counts = {"listings": 0, "polls": 0}
    listing, poll = worker.folder.state_rounds, worker.exchange.doorbell.wait

    def counted(key, call):
        def wrapped(*args):
            counts[key] += 1
            return call(*args)
        return wrapped

    monkeypatch.setattr(worker.folder, "state_rounds", counted("listings", listing))
    monkeypatch.setattr(worker.exchange.doorbell, "wait", counted("polls", poll))
    return worker, counts


def test_a_worker_waiting_for_its_next_round_lists_the_round_states_once_a_round_not_at_every_poll(folder,
                                                                                                      monkeypatch):
    """state/ holds a file per round (2000 of them at the end of a default run): listing it at every wake-up cost
    a waiting worker O(rounds) each time, several times a round. It looks at the one file it waits for instead."""
    worker, counts = waiting_worker(folder, monkeypatch, range(1, 51))
    found = []
    waiting = threading.Thread(target=lambda: found.append(worker.wait_for_round(51)))
    waiting.start()
    try:
        wait_until(lambda: counts["polls"] >= 30, 10, "30 polls of the waiting worker")
        write_as(folder, "coordinator", folder.round_state_file(51),
                 RoundState(51, 10_000, time.time(), "all workers done").to_json())
        waiting.join(timeout=10)
    finally:
        worker.stop.set()
        waiting.join(timeout=5)
    assert found and found[0].round == 51
    assert counts["listings"] <= 3, f"{counts['listings']} listings of state/ in {counts['polls']} polls"


def test_a_round_state_a_peer_deleted_does_not_hide_the_later_rounds(folder, monkeypatch):
    """The look at one file is a shortcut, not the rule: state/ is still listed every LIST_ROUNDS_S, so a worker
    waiting for round 2 whose file a peer removed finds round 3 the coordinator wrote after it."""
    import workers.worker as worker_module

    worker, counts = waiting_worker(folder, monkeypatch, range(1, 4))
    os.unlink(folder.round_state_file(2))
    monkeypatch.setattr(worker_module, "LIST_ROUNDS_S", 0.05)
    assert round_found(worker, 2) == 3


def test_a_worker_far_behind_the_coordinator_starts_at_its_newest_round(folder, monkeypatch):
    """A worker restarted from an old checkpoint waits for round 2 while the swarm is at round 40: it plays round
    40, found by the listing once more rounds than a poll looks at one by one are there."""
    worker, _ = waiting_worker(folder, monkeypatch, range(1, 41))
    assert round_found(worker, 2) == 40
    assert round_found(worker, 39) == 40


def test_a_run_longer_than_a_listing_still_finds_its_newest_round(folder, monkeypatch):
    """A reader takes 2048 round states (a bound against a peer flooding state/), and took the first 2048 names:
    past round 2048 a view said round 2048, and a worker restarted far behind waited for ever. Both find the
    newest round."""
    from workers.shared_folder.exchange import newest_signed_round
    from workers.shared_folder.safe_io import MAX_LISTED

    newest = MAX_LISTED + 52
    worker, _ = waiting_worker(folder, monkeypatch, range(1, newest + 1))
    rounds = folder.state_rounds()          # the run's first rounds (its start, its pace) and its newest
    assert rounds == [*range(1, 17), *range(newest - MAX_LISTED + 17, newest + 1)]
    assert newest_signed_round(folder, keyring(folder)).round == newest
    assert round_found(worker, 5) == newest


def test_a_fast_rounds_stages_reach_the_folder_as_a_few_writes_the_newest_last(folder):
    """A round of a tenth of a second changes a worker's stage five times; each beat written was a signed, synced
    file that every peer then verified. The heartbeat thread writes the newest beat at most every BEAT_GAP_S."""
    from workers.heartbeat import BEAT_GAP_S, Heartbeats

    exchange = node_exchange(folder, "w-1")
    written: list[tuple[str, int]] = []
    write = exchange.write_heartbeat

    def counted_write(beat: Heartbeat) -> None:
        write(beat)
        written.append((beat.status, beat.round))

    exchange.write_heartbeat = counted_write
    beats = Heartbeats(exchange, Heartbeat.first("w-1", "worker", Status.WAITING), lambda: [])
    beats.start()
    stages = [Status.GENERATING, Status.FETCHING, Status.TRAINING, Status.WAITING] * 3
    started = time.monotonic()
    for number, stage in enumerate(stages):
        beats.update(status=stage, round=1 + number // 4)
        # an unthrottled thread writes each change before the next one comes
        settles(lambda number=number: len(written) > number, 0.05)
    elapsed = time.monotonic() - started
    wait_until(lambda: written and written[-1] == (Status.WAITING, 3), 5, "the newest beat written")
    beats.stop()
    # a write at once, then one per BEAT_GAP_S while the changes came, then the newest
    assert len(written) <= min(len(stages) - 1, 2 + elapsed / BEAT_GAP_S), (elapsed, written)
    beat = node_exchange(folder, "w-2").read_heartbeats()["w-1"]
    assert (beat.status, beat.round) == (Status.WAITING, 3)


def test_a_worker_reading_its_peers_heartbeats_each_round_verifies_only_those_that_changed(folder, monkeypatch):
    """A worker reads every heartbeat once a round (who stopped?); most are the bytes it verified the round before.
    Those are not parsed and verified again; a beat changed in any byte is, even at the same size and time."""
    from workers.shared_folder.signing import KeyRing

    peers = {node: node_exchange(folder, node) for node in ("w-2", "w-3", "w-4")}
    for node, exchange in peers.items():
        exchange.write_heartbeat(Heartbeat.first(node, "worker", Status.TRAINING))
    reader = node_exchange(folder, "w-1")
    verified = []
    verify = KeyRing.verify
    monkeypatch.setattr(KeyRing, "verify", lambda self, record, node, where: verified.append(node)
                        or verify(self, record, node, where))
    assert sorted(reader.read_heartbeats()) == ["w-2", "w-3", "w-4"]
    assert sorted(reader.read_heartbeats()) == ["w-2", "w-3", "w-4"]
    assert sorted(verified) == ["w-2", "w-3", "w-4"]            # the second read verified none again
    peers["w-3"].write_heartbeat(Heartbeat.first("w-3", "worker", Status.DONE))
    assert reader.read_heartbeats()["w-3"].status == Status.DONE and verified[-1] == "w-3"
    path = folder.heartbeat_file("w-2")                         # forged in place: same size, same time
    info, data = path.stat(), path.read_bytes()
    path.write_bytes(data.replace(b'"training"', b'"stopped!"'))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert "w-2" not in reader.read_heartbeats() and reader.rejected == 1
