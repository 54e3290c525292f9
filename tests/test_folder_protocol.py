"""The shared folder is untrusted: bad files are skipped and counted, never trusted, never a crash."""

import json
import threading

import pytest

from workers.shared_folder.exchange import live_workers
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import read_json_bounded, record_checksum, write_json_atomic
from workers.shared_folder.jsonl import append_jsonl, read_jsonl
from workers.shared_folder.rejections import RejectedFile, check_node_name
from workers.shared_folder.protocol import Heartbeat, RolloutFile, RoundMetrics, RoundState

from tests.helpers import group
from tests.helpers import node_exchange, node_key, viewer, warnings_naming, write_as


def sealed(record: dict) -> dict:
    """A hand-made record with a valid checksum, so the check under test is the one that rejects it."""
    return {**record, "sha256": record_checksum(record)}


@pytest.fixture
def folder(tmp_path):
    return ExperimentFolder(tmp_path / "experiments" / "exp").create()


def test_atomic_write_leaves_no_temp_files_and_round_trips(folder):
    path = folder.round_state_file(1)
    state = RoundState(round=1, max_rounds=3, started_at=1.0, reason="start")
    write_json_atomic(path, state.to_json())
    assert RoundState.from_json(read_json_bounded(path)) == state
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_layout_matches_the_seeds(folder):
    for sub in ("state", "peers", "rollouts", "rewards", "checkpoints", "logs", "metrics"):
        assert (folder.root / sub).is_dir()
    assert folder.rollout_file(3, "worker-1").relative_to(folder.root).as_posix() == \
        "rollouts/round_3/stage_0/worker-1.json"


@pytest.mark.parametrize("name", ["../../etc", "a/b", "", ".", "..", "x" * 65, "-lead", "bad name"])
def test_unsafe_node_names_never_become_paths(name):
    with pytest.raises(RejectedFile):
        check_node_name(name)


def test_truncated_oversized_and_wrong_typed_files_are_rejected(tmp_path):
    good = {"schema": 1, "round": 2, "max_rounds": 3, "started_at": 1.0, "reason": "x"}
    truncated = tmp_path / "t.json"
    truncated.write_text(json.dumps(good)[:-5])
    with pytest.raises(RejectedFile, match="not valid JSON"):
        read_json_bounded(truncated)
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(5 * 1024 * 1024)
    with pytest.raises(RejectedFile, match="over the"):
        read_json_bounded(big)
    with pytest.raises(RejectedFile, match="'round' must be int"):
        RoundState.from_json({**good, "round": "2"})
    with pytest.raises(RejectedFile, match="schema version 99"):
        RoundState.from_json({**good, "schema": 99})
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(RejectedFile, match="expected a JSON object"):
        read_json_bounded(listing)


def test_peer_rollouts_skip_bad_files_and_own_and_count_them(folder, caplog):
    writer = {n: node_exchange(folder, n) for n in ("w-1", "w-2", "w-3")}
    writer["w-1"].publish_rollouts(1, [group()])
    writer["w-2"].publish_rollouts(1, [group(), group()])
    stage = folder.rollout_dir(1)
    (stage / "w-4.json").write_text('{"schema": 1, "node": "w-4", "round"')                 # truncated
    bad_types = RolloutFile(node="w-5", round=1, created_at=0.0, groups=(group(),)).to_json()
    bad_types["groups"][0]["rewards"] = ["high"] * 4
    (stage / "w-5.json").write_text(json.dumps(sealed(node_key(folder, "w-5").sign(bad_types))))
    liar = RolloutFile(node="w-2", round=1, created_at=0.0, groups=(group(),)).to_json()
    (stage / "w-6.json").write_text(json.dumps(sealed(node_key(folder, "w-6").sign(liar))))  # claims to be w-2
    (stage / "..json").write_text("{}")
    reader = writer["w-3"]
    writer["w-3"].publish_rollouts(1, [group()])
    found = reader.peer_rollouts(1)
    assert sorted(found) == ["w-1", "w-2"]
    assert len(found["w-2"]) == 2
    assert reader.rejected == 3
    assert reader.peer_rollouts(1).keys() == found.keys() and reader.rejected == 3     # counted once each
    for why in ("not valid JSON", "'rewards' must hold finite numbers", "which its path contradicts"):
        assert caplog.text.count(why) == 1, why


def test_wait_for_peers_is_bounded_by_its_timeout(folder):
    exchange = node_exchange(folder, "w-1")
    node_exchange(folder, "w-2").publish_rollouts(1, [group()])
    found = exchange.wait_for_peers(1, {"w-2", "w-dead"}, timeout_s=0.5, stop=threading.Event())
    assert list(found) == ["w-2"]


def test_generation_frequency_parts_are_read_as_one_node(folder):
    exchange = node_exchange(folder, "w-2")
    exchange.publish_rollouts(1, [group()], part=0)
    exchange.publish_rollouts(1, [group()], part=1)
    assert len(node_exchange(folder, "w-1").peer_rollouts(1)["w-2"]) == 2


def test_heartbeats_tell_alive_from_gone(folder):
    now = 1000.0
    for node, age, status in (("w-1", 1, "training"), ("w-2", 500, "training"), ("w-3", 1, "stopped")):
        node_exchange(folder, node).write_heartbeat(Heartbeat(node=node, role="worker", pid=1, host="h", instance="i",
                                                         status=status, round=1, started_at=0,
                                                         updated_at=now - age))
    beats = node_exchange(folder, "w-1").read_heartbeats()
    assert live_workers(beats, peer_timeout=120, now=now) == {"w-1"}


def test_a_torn_last_line_is_skipped_and_swallows_no_line_appended_after_it(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"round": 1})
    with open(path, "a") as f:
        f.write('{"round": 2, "rew')
    assert list(read_jsonl(path)) == [{"round": 1}]
    # the restarted writer appends after the torn line: the torn one stays one bad line, the new one is read
    append_jsonl(path, {"round": 2})
    lines = read_jsonl(path)
    assert list(lines) == [{"round": 1}, {"round": 2}] and len(lines.bad) == 1


def test_an_append_that_fails_part_way_leaves_no_torn_line_for_its_retry(tmp_path, monkeypatch):
    """A full disk fails a metrics line after part of it is written: the part is cut off, so the retry once there
    is room adds the line whole and no reader sees a bad one."""
    import errno
    import os

    from workers.shared_folder import appends

    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"round": 1})

    def disk_fills(fd, data):
        os.write(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(appends, "write_all", disk_fills)
        with pytest.raises(OSError, match="No space"):
            append_jsonl(path, {"round": 2, "reward_mean": 0.5})
    after_failure = read_jsonl(path)
    assert list(after_failure) == [{"round": 1}] and not after_failure.bad
    append_jsonl(path, {"round": 2, "reward_mean": 0.5})
    lines = read_jsonl(path)
    assert list(lines) == [{"round": 1}, {"round": 2, "reward_mean": 0.5}] and not lines.bad


def test_metrics_row_round_trips_and_rejects_bad_fields():
    row = RoundMetrics(node="w-1", round=1, reward_mean=0.5, accuracy=0.25, loss=0.1, local_groups=2,
                       external_groups=2, external_available=6, zero_advantage_groups=0, completions=8,
                       mean_completion_tokens=9.5, generate_s=1.0, fetch_s=0.1, train_s=0.2, round_s=1.3)
    assert RoundMetrics.from_json(json.loads(json.dumps(row.to_json()))) == row
    with pytest.raises(RejectedFile):
        RoundMetrics.from_json({**row.to_json(), "node": "../x"})
    with pytest.raises(RejectedFile):
        RoundMetrics.from_json({**row.to_json(), "loss": True})
    # finite, yet beyond any honest value: a peer's 1e308 crashed `status` (its sparkline's scale) and the
    # table's confidence interval (an overflow squaring it)
    for field_name, huge in (("reward_mean", 1e308), ("round_s", -1e300), ("completions", 10**400)):
        with pytest.raises(RejectedFile, match="beyond"):
            RoundMetrics.from_json({**row.to_json(), field_name: huge})
    with pytest.raises(RejectedFile):
        RoundMetrics.from_json({**row.to_json(), "task_rewards": {"chain_sum": 1e308}})


def test_a_drive_hiccup_is_retried_with_backoff_and_a_dead_drive_is_reported(folder, monkeypatch, caplog):
    import workers.shared_folder.exchange as exchange_module
    import workers.shared_folder.retries as retries_module

    monkeypatch.setattr(retries_module.time, "sleep", lambda s: None)
    real_write, failures = exchange_module.write_json_atomic, []

    def flaky(path, record):
        if len(failures) < 2:
            failures.append(path)
            raise OSError(5, "Input/output error")
        real_write(path, record)

    monkeypatch.setattr(exchange_module, "write_json_atomic", flaky)
    path = node_exchange(folder, "w-1").publish_rollouts(1, [group()])
    assert path.exists() and len(failures) == 2
    assert "retry 2/3" in caplog.text

    def dead(path, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exchange_module, "write_json_atomic", dead)
    with pytest.raises(OSError):
        node_exchange(folder, "w-1").publish_rollouts(2, [group()])


def test_retry_waits_double_and_are_spread_so_nodes_do_not_retry_in_step():
    import random

    from workers.shared_folder.retries import backoff_s

    rng = random.Random(3)
    waits = {attempt: [backoff_s(attempt, 0.5, rng) for _ in range(200)] for attempt in (1, 2, 3)}
    for attempt, drawn in waits.items():
        nominal = 0.5 * 2 ** (attempt - 1)
        assert 0.5 * nominal <= min(drawn) < 0.6 * nominal and 1.4 * nominal < max(drawn) <= 1.5 * nominal
    assert sum(waits[3]) / 200 == pytest.approx(2 * sum(waits[2]) / 200, rel=0.1)


def test_rejected_files_reach_the_dashboard_through_heartbeats(folder):
    from swarm_supervisor.status import SwarmReader

    stage = folder.rollout_dir(1)
    stage.mkdir(parents=True)
    (stage / "w-9.json").write_text("{not json")
    exchange = node_exchange(folder, "w-1")
    exchange.peer_rollouts(1)
    exchange.write_heartbeat(Heartbeat(node="w-1", role="worker", pid=1, host="h", instance="i", status="training",
                                       round=1, started_at=0, updated_at=0,
                                       rejected=exchange.rejected))
    view = SwarmReader(folder, viewer(folder), "m", "cpu").view()
    assert view.rejected_files == 1


# -- checksums: a file that is valid JSON but not what its writer wrote is never trusted ------------

def test_every_record_carries_a_checksum_that_the_reader_checks_and_removes(folder):
    path = folder.round_state_file(1)
    state = RoundState(round=1, max_rounds=3, started_at=1.5, reason="start", nodes=("w-1",))
    write_json_atomic(path, state.to_json())
    on_disk = json.loads(path.read_text())
    assert on_disk["sha256"] == record_checksum(on_disk)
    record = read_json_bounded(path, require_checksum=True)
    assert "sha256" not in record and RoundState.from_json(record) == state
    # another tool re-serialising it (key order, spacing, escapes) changes no value, so it still passes
    path.write_text(json.dumps(dict(reversed(list(on_disk.items()))), indent=2, ensure_ascii=False))
    assert RoundState.from_json(read_json_bounded(path, require_checksum=True)) == state


def test_a_rollout_file_edited_by_hand_is_rejected_counted_and_never_trusted(folder, caplog):
    path = node_exchange(folder, "w-1").publish_rollouts(1, [group(), group()])
    record = json.loads(path.read_text())
    record["groups"][1]["completions"][2] = "<answer>3</answer>"      # still valid JSON, still well-typed
    path.write_text(json.dumps(record))
    reader = node_exchange(folder, "w-2")
    assert reader.peer_rollouts(1) == {}
    assert reader.rejected == 1 and warnings_naming(caplog, path) == 1
    assert caplog.text.count("checksum mismatch (half-synced or edited); skipped") == 1
    assert reader.peer_rollouts(1) == {} and reader.rejected == 1     # skipped, not warned about again


def test_a_record_without_a_checksum_is_rejected_where_the_protocol_needs_one(folder):
    state = RoundState(round=1, max_rounds=3, started_at=1.0, reason="start").to_json()
    path = folder.round_state_file(1)
    path.write_text(json.dumps(state))
    with pytest.raises(RejectedFile, match="no checksum"):
        read_json_bounded(path, require_checksum=True)
    assert read_json_bounded(path) == state          # e.g. a checkpoint's meta.json, written without one
    rollouts = RolloutFile(node="w-1", round=1, created_at=0.0, groups=(group(),)).to_json()
    folder.rollout_dir(1).mkdir(parents=True)
    folder.rollout_file(1, "w-1").write_text(json.dumps(rollouts))
    reader = node_exchange(folder, "w-2")
    assert reader.peer_rollouts(1) == {} and reader.rejected == 1


def test_a_half_synced_rollout_file_is_skipped_then_read_once_its_sync_completes(folder):
    path = node_exchange(folder, "w-1").publish_rollouts(1, [group()])
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    reader = node_exchange(folder, "w-2")
    assert reader.peer_rollouts(1) == {} and reader.rejected == 1
    path.write_bytes(whole)
    assert len(reader.peer_rollouts(1)["w-1"]) == 1


def test_a_checksum_over_nan_or_absurd_nesting_is_a_rejection_not_a_crash(tmp_path):
    nan = tmp_path / "nan.json"
    nan.write_text('{"round": NaN, "sha256": "00"}')
    with pytest.raises(RejectedFile, match="NaN is not a number the swarm writes"):
        read_json_bounded(nan)
    deep = tmp_path / "deep.json"
    deep.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(RejectedFile, match="nested deeper than 64 levels"):
        read_json_bounded(deep)
    huge = tmp_path / "huge.json"
    huge.write_text('{"round": ' + "9" * 5000 + "}")
    with pytest.raises(RejectedFile, match="beyond a float's range"):
        read_json_bounded(huge)


# -- a folder that refuses writes: results wait in order, training goes on --------------------------

def test_writes_the_folder_refuses_wait_in_order_and_land_once_it_works_again(folder, monkeypatch):
    import workers.shared_folder.retries as retries_module
    from workers.shared_folder.exchange import Outbox

    monkeypatch.setattr(retries_module.time, "sleep", lambda s: None)
    down = [True]
    landed: list[str] = []

    def write(name: str) -> None:
        if down[0]:
            raise OSError(5, "Input/output error")
        landed.append(name)

    outbox = Outbox()
    assert not outbox.send("metrics line of round 1", lambda: write("metrics-1"))
    assert not outbox.send("rewards file of round 1", lambda: write("rewards-1"))
    assert len(outbox) == 2 and landed == []
    assert outbox.trouble == ("2 write(s) waiting for the folder (metrics line of round 1: Input/output error); "
                              "training goes on")
    down[0] = False
    assert outbox.send("metrics line of round 2", lambda: write("metrics-2"))
    assert landed == ["metrics-1", "rewards-1", "metrics-2"]            # the order a reader relies on
    assert len(outbox) == 0 and outbox.trouble is None


def test_an_outbox_that_never_drains_gives_up_instead_of_growing_forever(monkeypatch):
    import workers.shared_folder.retries as retries_module
    from workers.shared_folder.exchange import Outbox

    monkeypatch.setattr(retries_module.time, "sleep", lambda s: None)
    monkeypatch.setattr(Outbox, "MAX_WAITING", 3)

    def refused() -> None:
        raise OSError(28, "No space left on device")

    outbox = Outbox()
    for _ in range(3):
        outbox.send("a write", refused)
    with pytest.raises(OSError, match="3 writes have waited for the shared folder"):
        outbox.send("a write", refused)


def test_a_waiting_worker_retries_the_rewards_file_the_folder_refused_so_the_round_can_end(folder, monkeypatch):
    """Without its rewards file no round ends: a worker waiting for the next round keeps trying to write it."""
    import os
    import threading
    import time
    from functools import partial

    import workers.shared_folder.retries as retries_module
    import workers.worker as worker_module
    from configs_env import SwarmConfig
    from workers.shared_folder.protocol import RoundState
    from workers.worker import Worker, WorkerSpec

    monkeypatch.setattr(retries_module, "backoff_s", lambda *args: 0.0)
    monkeypatch.setattr(worker_module, "OUTBOX_RETRY_S", 0.05)
    cfg = SwarmConfig.from_env({"GDRIVE_PATH": str(folder.root.parent.parent), "EXPERIMENT_NAME": folder.root.name,
                                "RL_SWARM_CACHE": str(folder.root.parent.parent / "cache")})
    stop = threading.Event()
    worker = Worker(WorkerSpec(cfg=cfg, node="w-1", index=0, model_name="m", device="cpu",
                               parent_pid=os.getppid()), stop)
    down = [True]

    def flaky_write(path, record):
        if down[0]:
            raise OSError(5, "Input/output error")
        write_json_atomic(path, record)

    reward_file = folder.reward_file(1, "w-1")
    assert not worker.outbox.send("writing the rewards file", partial(flaky_write, reward_file, {"round": 1}))
    found = []
    waiting = threading.Thread(target=lambda: found.append(worker.wait_for_round(2)))
    waiting.start()
    try:
        time.sleep(0.3)
        assert not reward_file.exists() and "1 write(s) waiting for the folder" in worker.beat.note
        down[0] = False                                           # the Drive is back
        deadline = time.monotonic() + 5
        while not reward_file.exists():
            assert time.monotonic() < deadline, "the waiting worker never wrote its rewards file"
            time.sleep(0.02)
        write_as(folder, "coordinator", folder.round_state_file(2),
                 RoundState(2, 3, time.time(), "all workers done").to_json())
        waiting.join(timeout=5)
    finally:
        stop.set()
        waiting.join(timeout=5)
    assert found and found[0].round == 2 and worker.beat.note is None
