"""A slow, flaky Drive (DRIVE_SIM_LAG, DRIVE_SIM_FAIL_RATE): late files are waited for, failed calls retried."""

import errno
import json
import os
import time
from pathlib import Path

import pytest

import workers.shared_folder.retries as retries_module
from tests.helpers import Up, metrics_rows, run_up, swarm_env
from tests.helpers import group
from workers.shared_folder import drive_sim
from workers.shared_folder.drive_sim import simulate_drive
from workers.shared_folder.hostile import plant_hostile_files
from workers.shared_folder.exchange import read_heartbeats
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import read_json_bounded, write_json_atomic
from workers.shared_folder.safe_io import list_folder
from workers.shared_folder.protocol import Heartbeat
from tests.helpers import keyring, node_exchange


@pytest.fixture
def folder(tmp_path):
    folder = ExperimentFolder(tmp_path / "experiments" / "exp").create()
    yield folder
    simulate_drive(folder.root, 0, 0)


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_a_peers_new_file_shows_up_only_after_the_lag_while_own_writes_show_at_once(folder):
    theirs = node_exchange(folder, "w-1").publish_rollouts(1, [group()])    # before this process simulates: a peer's
    simulate_drive(folder.root, lag_s=1.0, fail_rate=0.0)
    os.utime(theirs)                                                         # ... written just now
    written = time.time()
    reader = node_exchange(folder, "w-2")
    mine = reader.publish_rollouts(1, [group()])
    assert list_folder(folder.rollout_dir(1)) == [mine]
    with pytest.raises(FileNotFoundError):
        read_json_bounded(theirs)
    assert reader.peer_rollouts(1) == {}
    wait_until(lambda: "w-1" in reader.peer_rollouts(1), timeout=5)
    assert time.time() - written >= 0.9
    assert reader.rejected == 0                                          # late is not bad


def test_a_stale_listing_misses_a_peers_new_file_and_still_shows_a_deleted_one_until_it_refreshes(folder):
    peer = node_exchange(folder, "w-1")
    gone = peer.publish_rollouts(1, [group()])
    simulate_drive(folder.root, lag_s=0.0, fail_rate=0.0, stale_s=1.0)
    reader = node_exchange(folder, "w-2")
    assert list_folder(folder.rollout_dir(1)) == [gone]                  # the listing is refreshed now
    refreshed = time.monotonic()
    gone.unlink()
    # a peer's file written since: readable by name at once (no lag), but the listing does not show it yet
    late = folder.rollout_dir(1) / "w-3.json"
    write_json_atomic(late, {"round": 1})
    drive_sim._active.visible_at.pop(str(late), None)                     # as if another process wrote it
    mine = reader.publish_rollouts(1, [group()])                           # own writes are listed at once
    assert list_folder(folder.rollout_dir(1)) == sorted([gone, mine])
    assert reader.peer_rollouts(1) == {}                                    # the deleted file is skipped, no error
    assert reader.rejected == 0
    wait_until(lambda: list_folder(folder.rollout_dir(1)) == sorted([late, mine]), timeout=5)
    assert time.monotonic() - refreshed >= 0.9


def test_simulated_failures_are_retried_or_read_on_the_next_poll_never_counted_as_bad_files(folder, monkeypatch):
    monkeypatch.setattr(retries_module.time, "sleep", lambda s: None)
    simulate_drive(folder.root, lag_s=0.0, fail_rate=0.2, seed=3)
    writer, reader = node_exchange(folder, "w-1"), node_exchange(folder, "w-2")
    for round_ in range(1, 21):
        writer.publish_rollouts(round_, [group()])          # with_retries: 4 attempts
    missing = set(range(1, 21))
    for _ in range(50):                                         # polls, as wait_for_peers does
        missing = {r for r in missing if "w-1" not in reader.peer_rollouts(r)}
    assert missing == set() and reader.rejected == 0
    assert drive_sim.failures() > 0
    errors = []
    for _ in range(500):
        try:
            list_folder(folder.rollout_dir(1))
        except OSError as exc:
            errors.append(exc)
    assert 60 <= len(errors) <= 140                             # ~20% of 500
    assert {(e.errno, e.strerror) for e in errors} == {(errno.EIO, "simulated Drive failure")}


def test_heartbeats_are_read_whole_or_not_at_all(folder, monkeypatch):
    """A partial answer would look like nodes that left; the coordinator would stop waiting for them."""
    monkeypatch.setattr(retries_module.time, "sleep", lambda s: None)
    for node in ("w-1", "w-2", "w-3"):
        node_exchange(folder, node).write_heartbeat(Heartbeat(node=node, role="worker", pid=1, host="h", instance="i",
                                                         status="training", round=1, started_at=0,
                                                         updated_at=0))
    simulate_drive(folder.root, lag_s=0.0, fail_rate=0.5, seed=5)
    answers = failures = 0
    for _ in range(200):
        try:
            beats = read_heartbeats(folder, keyring(folder))
        except OSError:
            failures += 1
            continue
        answers += 1
        assert sorted(beats) == ["w-1", "w-2", "w-3"]
    assert answers > 50 and failures > 5


def test_a_slow_heartbeat_write_never_holds_up_a_round_and_the_last_beat_is_written_before_the_worker_leaves(
        folder, monkeypatch):
    """A round changes its stage beat three times; with the folder taking seconds a write, the round goes on at
    once and the folder gets the newest beat when it can; a last status is written before `update` returns."""
    import threading

    from workers.heartbeat import Heartbeats
    from workers.shared_folder.protocol import Status

    exchange = node_exchange(folder, "w-1")
    folder_back, written = threading.Event(), []
    write = exchange.write_heartbeat

    def slow_write(beat: Heartbeat) -> None:
        folder_back.wait(10)           # a Drive write in a bad minute
        write(beat)
        written.append(beat.status)

    monkeypatch.setattr(exchange, "write_heartbeat", slow_write)
    beats = Heartbeats(exchange, Heartbeat.first("w-1", "worker", Status.WAITING), lambda: [])
    beats.start()
    started = time.monotonic()
    for stage in (Status.GENERATING, Status.FETCHING, Status.TRAINING):
        beats.update(status=stage, round=1)
    assert time.monotonic() - started < 1.0 and not written          # the round did not wait for the folder
    folder_back.set()
    wait_until(lambda: written and written[-1] == Status.TRAINING, timeout=10)
    assert read_heartbeats(folder, keyring(folder))["w-1"].status == Status.TRAINING
    beats.stop()
    beats.update(status=Status.DONE, round=1)
    assert written[-1] == Status.DONE
    assert read_heartbeats(folder, keyring(folder))["w-1"].status == Status.DONE


def test_checkpoints_base_and_logs_stay_outside_the_simulation(folder):
    outside = [folder.checkpoint_dir("w-1") / "round_000001" / "meta.json", folder.root / "base" / "meta.json",
               folder.log_dir("w-1") / "x.json", folder.config_file]
    for path in outside:
        write_json_atomic(path, {"round": 1})
        os.utime(path)
    simulate_drive(folder.root, lag_s=100.0, fail_rate=0.5, seed=1)
    for _ in range(20):
        for path in outside:
            assert read_json_bounded(path) == {"round": 1}
    assert drive_sim.failures() == 0


@pytest.mark.slow
def test_a_swarm_on_a_slow_flaky_drive_full_of_hostile_files_completes_every_round_and_keeps_every_file(
        tmp_path: Path):
    env = swarm_env(tmp_path, NUM_WORKERS="3", DRIVE_SIM_LAG="1", DRIVE_SIM_STALE="1", DRIVE_SIM_FAIL_RATE="0.05",
                    WARMUP_STEPS="0", EVAL_SIZE="0")
    exp = tmp_path / "drive" / "experiments" / "e2e"
    planted = plant_hostile_files(exp, round_=1)
    result = run_up(env, timeout=240)
    nodes = ["worker-1", "worker-2", "worker-3"]
    # the swarm finished; TEST_MODE's own `rl-swarm validate` then names the planted files, and nothing else
    assert "rl-swarm: finished" in result.stdout, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    [readable] = [line for line in lines if "readable files" in line]
    assert readable.startswith("FAIL  readable files: 8 unreadable"), readable    # the unknown task parses
    assert lines[-1].endswith("1 FAILED") and result.returncode == 1
    for round_ in (1, 2, 3):
        for node in nodes:
            rollouts = read_json_bounded(exp / "rollouts" / f"round_{round_}" / "stage_0" / f"{node}.json",
                                         require_checksum=True)
            assert len(rollouts["groups"]) == 4
            assert read_json_bounded(exp / "rewards" / f"round_{round_}" / f"{node}.json",
                                     require_checksum=True)["round"] == round_
    for node in nodes:
        rows = metrics_rows(exp, node)
        assert {r["round"] for r in rows} == {1, 2, 3}
        # a peer's rollouts arrive a second late and some reads fail, yet every worker waited for them all
        assert all(r["external_available"] == 8 for r in rows)
        log = (exp / "logs" / node / "worker.log").read_text()
        for kind, path in planted.items():
            if kind == "unknown task":        # a well-formed file: the group in it is what is refused
                assert log.count("rollouts of hostile-6, group 0: task 'no_such_task' is not in this worker's "
                                 "TASKS") == 1, node
            elif kind != "bad heartbeat":     # the coordinator and dashboard read peers/ too; workers need not
                assert log.count(f"rejected {path}") == 1, (node, kind)     # one line, naming the file
    injected = sum(log.read_text().count(f"{drive_sim.FAILURE} injected") for log in (exp / "logs").rglob("*.log"))
    assert injected > 0
    assert json.loads((exp / "state" / "finished.json").read_text())["rounds"] == 3
    assert "rejected files" in result.stdout       # the dashboard counted them


ROUNDS = 40     # after the folder is back, rounds of ~0.15 s each must outlast the supervisor's look (every 2 s)


@pytest.fixture(scope="module")
def dropped_mount(tmp_path_factory, start_from_base) -> tuple[Path, int, str, list[Path] | None]:
    """One swarm whose mount drops for 60 s twice, the two ways Colab's Drive does: in round 2 the folder vanishes;
    once the supervisor has seen it back, a round later, every call on it fails with ENOTCONN ("Transport endpoint
    is not connected", DRIVE_SIM_HANGUP). One swarm for both (a swarm's start is ~30 s of CPU); returns its folder,
    exit code, output, and what stood in the folder's place while it had vanished (None: nothing rebuilt it on the
    local disk)."""
    tmp_path = tmp_path_factory.mktemp("dropped-mount")
    hangup = tmp_path / "mount-hung-up"
    env = swarm_env(tmp_path, NUM_WORKERS="2", MAX_ROUNDS=str(ROUNDS), COORDINATOR_ROUND_INTERVAL="300",
                    DRIVE_SIM_HANGUP=str(hangup))
    exp = tmp_path / "drive" / "experiments" / "e2e"
    start_from_base(exp)
    away = tmp_path / "mount-dropped"
    up = Up(env, tmp_path / "up.out")

    def reached(round_: int) -> None:
        wait_until(lambda: (exp / "state" / f"round_{round_:06d}.json").exists() or up.poll() is not None,
                   timeout=400)
        assert up.poll() is None, up.output()

    try:
        reached(2)
        exp.rename(away)
        # the mount's minute away (issue #19 asks for 60 s); nothing to wait on: the point is that time passes,
        # longer than a write's retries and the round's wait for peers together
        time.sleep(60)
        rebuilt = sorted(exp.rglob("*"))[:10] if exp.exists() else None
        if rebuilt is not None:
            exp.rename(tmp_path / "rebuilt")
        away.rename(exp)
        # the supervisor sees the folder back before it goes again: two outages, not one of two minutes. The
        # rounds race on meanwhile (seen in CI: rounds 3 to 6 in 0.5 s), so the second drop follows the look
        wait_until(lambda: "is back after" in ExperimentFolder(exp).events_file.read_text()
                   or up.poll() is not None, timeout=120)
        reached(ExperimentFolder(exp).state_rounds()[-1] + 1)
        hangup.touch()
        time.sleep(60)
        hangup.unlink()
        output = up.wait(timeout=400)
    finally:
        up.kill()
    return exp, up.returncode, output, rebuilt


@pytest.mark.parametrize("drop, nth", [("vanished", 0), ("hung up", 1)], ids=["vanished", "hung up"])
def test_a_drive_mount_dropped_for_a_minute_mid_run_loses_no_record(dropped_mount, drop, nth):
    """The workers keep their records, nothing rebuilds the folder on the local disk, the supervisor says so, and
    every round lands."""
    exp, code, output, rebuilt = dropped_mount
    assert code == 0, output
    if drop == "vanished":
        assert rebuilt is None, f"the folder was rebuilt while the mount was away: {rebuilt}"
    for node in ("worker-1", "worker-2"):
        assert sorted({row["round"] for row in metrics_rows(exp, node)}) == list(range(1, ROUNDS + 1))
        assert all(ExperimentFolder(exp).reward_file(r, node).exists() for r in range(1, ROUNDS + 1))
    events = [json.loads(line)["event"] for line in ExperimentFolder(exp).events_file.read_text().splitlines()]
    # the supervisor noticed both ends of each outage, and the line it could not write while the folder was away
    # was written when the folder came back, before the line that says so (a hang-up's simulation leaves logs/
    # writable, so only the vanished folder makes that line wait)
    outage = [event for event in events if event.startswith("the shared folder")]
    assert len(outage) == 4 and "is gone" in outage[2 * nth] and "is back after" in outage[2 * nth + 1], \
        (events, output, (exp / "logs" / "supervisor" / "supervisor.log").read_text()[-4000:])
    if drop == "hung up":       # the workers met the hang-up itself, not a missing file
        assert any("Transport endpoint is not connected" in (exp / "logs" / node / "worker.log").read_text()
                   for node in ("worker-1", "worker-2"))
