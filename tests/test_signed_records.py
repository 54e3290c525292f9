"""A record counts only when the node it speaks for signed it (issue 17, item 4): a forged round state,
finished.json, heartbeat, rollout or rewards file cannot end, skip or stall the swarm, nor speak for another
node; one coordinator per experiment; a joiner waits for the base; no folder link is followed; a flood costs a
reader a bounded time. What the views (status, experiments, validate) make of such a folder: test_signed_views.py."""

import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from configs_env import SwarmError
from swarm_supervisor.claim import CoordinatorClaim, Lease, coordinator_key
from swarm_supervisor.coordinator import Coordinator
from swarm_supervisor.resume import Resume
from tests.helpers import (coordinators_up, metrics_rows, node_exchange, node_key, peer_group, swarm_env,
                           wait_for, warnings_naming, write_as)
from tests.signed_folder import EXPERIMENT, beat, signed_experiment
from workers.learning.tasks import TaskMix
from workers.shared_folder import exchange as exchange_module
from workers.shared_folder.exchange import (newest_signed_round, read_finished, read_heartbeats, read_round_state,
                                            read_signed)
from workers.shared_folder.base_meta import sign_base_meta
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import read_json_bounded, write_json_atomic
from workers.shared_folder.rejections import FolderError, RejectedFile
from workers.shared_folder.safe_io import MAX_LISTED
from workers.shared_folder.hostile import forger, plant_forgeries
from workers.shared_folder.protocol import RoundState, Status
from workers.shared_folder.recorded_config import write_recorded_config
from workers.shared_folder.signing import COORDINATOR, KeyRing, NodeKey, UnknownSigner, local_key_dir



@pytest.fixture
def swarm(tmp_path):
    return signed_experiment(tmp_path)


# -- sign, verify, pin -------------------------------------------------------------------------------

def test_a_node_keeps_its_key_on_its_machine_and_what_it_signs_verifies_only_as_its_own(swarm):
    cfg, folder = swarm
    key_dir = local_key_dir(cfg.cache_dir, folder.root)
    key = NodeKey.load_or_create(key_dir, "w-1")
    assert NodeKey.load_or_create(key_dir, "w-1").fingerprint == key.fingerprint     # a restart keeps it
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600 and stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert not key_dir.is_relative_to(cfg.gdrive_path)             # never in the shared folder
    keys = KeyRing(folder)
    keys.publish(key)
    node_key(folder, "w-2")
    record = key.sign(beat("w-1").to_json())
    reader = KeyRing(folder)
    assert reader.verify(record, "w-1", "here") == beat_fields(record)
    with pytest.raises(RejectedFile, match="its signature is not 'w-2''s"):
        reader.verify(record, "w-2", "here")                       # w-1's word is not w-2's
    with pytest.raises(RejectedFile, match="its signature is not 'w-1''s"):
        reader.verify({**record, "status": Status.DONE}, "w-1", "here")      # edited after signing
    with pytest.raises(RejectedFile, match="not signed"):
        reader.verify(beat("w-1").to_json(), "w-1", "here")
    with pytest.raises(UnknownSigner):
        reader.verify(forger().sign(beat("w-9").to_json()), "w-9", "here")    # no key of w-9 published


def beat_fields(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "signature"}


def test_the_first_key_in_the_folder_wins_and_a_reader_keeps_the_key_it_pinned(swarm):
    _, folder = swarm
    real = node_key(folder, "w-2")
    reader = KeyRing(folder)
    assert reader.verify(real.sign({"a": 1}), "w-2", "here") == {"a": 1}       # pinned on first sight
    impostor = NodeKey("w-2", forger()._private)
    with pytest.raises(FolderError, match="holds the key .* not this machine's .* pick another NODE_ID"):
        KeyRing(folder).publish(impostor)                                    # create-only: never replaced
    folder.public_key_file("w-2").unlink()                                   # a forger with write access
    KeyRing(folder).publish(impostor)
    with pytest.raises(RejectedFile, match="its signature is not 'w-2''s"):
        reader.verify(impostor.sign({"a": 1}), "w-2", "here")                # the pinned key still decides


def test_a_worker_pins_the_coordinators_key_on_its_machine_and_names_a_replaced_one(swarm):
    cfg, folder = swarm
    coordinator = node_key(folder, COORDINATOR)
    pins = local_key_dir(cfg.cache_dir, folder.root) / "pins"
    KeyRing(folder, pins).verify(coordinator.sign({"round": 1}), COORDINATOR, "here")
    assert (pins / "coordinator.pub").exists()
    folder.public_key_file(COORDINATOR).unlink()
    other = NodeKey(COORDINATOR, forger()._private)
    KeyRing(folder).publish(other)
    restarted = KeyRing(folder, pins)                                        # next week, same machine
    conflict = restarted.coordinator_conflict()
    assert conflict and conflict.startswith("the experiment's coordinator key") and str(pins / "coordinator.pub") \
        in conflict and "\n" not in conflict
    with pytest.raises(RejectedFile, match="its signature is not 'coordinator''s"):
        restarted.verify(other.sign({"round": 1}), COORDINATOR, "here")


# -- forgeries read by the coordinator and the workers ----------------------------------------------

def test_forged_rounds_finished_json_heartbeats_rollouts_and_rewards_are_skipped_each_named_once(swarm, caplog):
    cfg, folder = swarm
    workers = {"w-1": node_exchange(folder, "w-1"), "w-2": node_exchange(folder, "w-2")}
    coordinator_exchange = node_exchange(folder, COORDINATOR)
    write_as(folder, COORDINATOR, folder.round_state_file(1), RoundState(1, 3, time.time(), "start").to_json())
    for node, exchange in workers.items():
        exchange.write_heartbeat(beat(node))
    [question] = TaskMix((("chain_sum", 1.0),), seed=1).sample(1, random.Random(0))
    workers["w-2"].publish_rollouts(2, [peer_group(question, ["1", "2"])])
    forged = plant_forgeries(folder.root, victim="w-2", later_round=2, far_round=99)
    keyring = coordinator_exchange.keyring
    for _ in range(2):                  # readers poll: the second look warns about nothing again
        assert read_finished(folder, keyring) is None
        assert newest_signed_round(folder, keyring).round == 1           # not the forged 2 or 99
        beats = read_heartbeats(folder, keyring)
        assert list(beats) == ["w-1"]         # the forger's "w-2 is done" replaced w-2's beat, and is not w-2's
        peers = workers["w-1"].peer_rollouts(2)
        assert list(peers) == ["w-2"] and len(peers["w-2"]) == 1             # its own, not the forger's
        assert workers["w-1"].finished() is None
    coordinator = Coordinator(cfg, folder, threading.Event(), lambda: {"w-1", "w-2"}, node_key(folder, COORDINATOR),
                              keyring)
    assert coordinator.done_nodes(2) == set()                                # w-2 did not say it is done
    for kind in ("finished.json", "far round state", "rollouts", "rewards", "heartbeat"):
        assert warnings_naming(caplog, forged[kind]) >= 1, kind
    assert "its signature is not 'w-2''s" in caplog.text and "its signature is not 'coordinator''s" in caplog.text


def test_a_waiting_worker_skips_forged_later_rounds_and_finished_json_and_plays_the_real_round(swarm):
    from workers.worker import Worker, WorkerSpec

    cfg, folder = swarm
    coordinator = node_key(folder, COORDINATOR)
    worker = Worker(WorkerSpec(cfg=cfg, node="w-1", index=0, model_name="m", device="cpu",
                               parent_pid=os.getppid()), threading.Event())
    plant_forgeries(folder.root, victim="w-2", later_round=2, far_round=3)
    for round_ in range(4, 4 + exchange_module.NEWEST_LOOKED + 4):         # more forged rounds than a look takes
        write_as(folder, "mallory", folder.round_state_file(round_),
                 RoundState(round_, 99, time.time(), "forged").to_json())
    write_json_atomic(folder.round_state_file(1), coordinator.sign(RoundState(1, 3, time.time(), "start").to_json()))
    state = worker.wait_for_round(1)
    assert state is not None and (state.round, state.reason) == (1, "start")


def test_a_forged_lease_or_a_crashed_ups_lease_does_not_block_a_resume_and_a_live_one_refuses(swarm):
    cfg, folder = swarm
    key, keyring = coordinator_key(cfg, folder)
    first = CoordinatorClaim(cfg, folder, key, keyring, "up")
    first.take()
    second = CoordinatorClaim(cfg, folder, key, keyring, "up")
    with pytest.raises(FolderError) as refused:
        second.take()
    assert str(refused.value).startswith(f"experiment {EXPERIMENT!r} already has a coordinator: `rl-swarm up` (pid "
                                         f"{os.getpid()}") and "join its swarm with `rl-swarm worker`" in \
        str(refused.value) and "\n" not in str(refused.value)
    # the first `up` was killed: its lease stays, its process is gone; the same machine's key resumes
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    crashed = Lease(**{**first.lease.__dict__, "pid": dead.pid})
    write_json_atomic(folder.coordinator_lease_file, key.sign({"schema": 1, **crashed.__dict__}))
    second.take()
    assert Lease.from_json(read_signed(folder.coordinator_lease_file, COORDINATOR, keyring), "lease").instance == \
        second.lease.instance
    write_json_atomic(folder.coordinator_lease_file, forger().sign({"schema": 1, **first.lease.__dict__}))
    CoordinatorClaim(cfg, folder, key, keyring, "up").take()                # a forged lease holds nothing


def test_a_deleted_or_forged_lease_or_a_dropped_mount_does_not_end_the_coordinator(swarm, monkeypatch):
    """Seen when merging with the dropped-mount work: a renewal that found no lease (the Drive mount gone for a
    minute) took it as another coordinator's and stopped the swarm. A peer deleting or forging the lease could do
    the same. Only a lease our own key signed for another `up` ends this one."""
    monkeypatch.setattr("swarm_supervisor.claim.RENEW_S", 0.05)
    cfg, folder = swarm
    key, keyring = coordinator_key(cfg, folder)
    claim = CoordinatorClaim(cfg, folder, key, keyring, "up")

    def ours() -> bool:
        try:
            return Lease.from_json(read_signed(folder.coordinator_lease_file, COORDINATOR, keyring),
                                   "lease").instance == claim.lease.instance
        except (OSError, UnknownSigner, RejectedFile):
            return False

    def until(predicate, what: str) -> None:
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    with claim.held():
        folder.coordinator_lease_file.unlink()
        until(ours, "the deleted lease written again")
        write_json_atomic(folder.coordinator_lease_file, forger().sign({"schema": 1, **claim.lease.__dict__}))
        until(ours, "the forged lease replaced")
        moved = folder.root.with_name("away")
        folder.root.rename(moved)                       # the mount drops...
        time.sleep(0.5)
        moved.rename(folder.root)                       # ...and comes back
        until(ours, "the lease renewed after the mount came back")
        assert claim.lost is None
        # another `up` with our key renews its lease as this one does: a renewal in flight may overwrite one
        # write of it (read, then write), not the next
        other = Lease(**{**claim.lease.__dict__, "instance": "another-up"})

        def other_renews() -> bool:
            if claim.lost is None:
                write_json_atomic(folder.coordinator_lease_file, key.sign({"schema": 1, **other.__dict__}))
            return claim.lost is not None

        until(other_renews, "the claim lost to an `up` with our key")


def test_an_up_with_another_machines_key_is_refused_and_so_is_an_experiment_of_unsigned_records(swarm, tmp_path):
    cfg, folder = swarm
    key, keyring = coordinator_key(cfg, folder)
    CoordinatorClaim(cfg, folder, key, keyring, "up").take()
    elsewhere = cfg.with_overrides(cache_dir=tmp_path / "another-machine")
    other_key, other_ring = coordinator_key(elsewhere, folder)
    with pytest.raises(FolderError, match=f"experiment {EXPERIMENT!r} belongs to another coordinator .* join it "
                                          "with `rl-swarm worker`"):
        CoordinatorClaim(elsewhere, folder, other_key, other_ring, "up").take()
    old = ExperimentFolder(cfg.gdrive_path / "experiments" / "old").create()
    write_json_atomic(old.config_file, {"schema": 1, "max_rounds": 3})
    write_json_atomic(old.round_state_file(1), RoundState(1, 3, 0.0, "start").to_json())
    old_cfg = cfg.with_overrides(experiment_name="old")
    key, keyring = coordinator_key(old_cfg, old)
    with pytest.raises(FolderError, match="written by an rl-swarm before signed records .* start a new "
                                          "EXPERIMENT_NAME"):
        CoordinatorClaim(old_cfg, old, key, keyring, "up").take()


# -- a joiner waits for the base ---------------------------------------------------------------------

def test_a_joiner_waits_for_the_coordinators_key_the_base_and_the_settings_then_pins_the_key(swarm, capsys,
                                                                                             monkeypatch, caplog):
    from swarm_supervisor import join
    from swarm_supervisor.join import join_when_ready

    cfg, folder = swarm
    cfg = cfg.with_overrides(peer_timeout=1.0)
    monkeypatch.setattr(join, "JOIN_POLL_S", 0.05)
    monkeypatch.setattr(join, "COORDINATOR_PATIENCE", 1)
    with pytest.raises(SwarmError, match=r"gave up after 1s waiting for the coordinator of experiment .*: start it "
                                         r"with `rl-swarm up` and the same GDRIVE_PATH and EXPERIMENT_NAME"):
        join_when_ready(cfg, folder)
    coordinator = node_key(folder, COORDINATOR)
    folder.base_dir.mkdir()
    (folder.base_dir / "meta.json").write_text(json.dumps({"schema": 1, "model_name": "m"}))    # a peer's
    with pytest.raises(SwarmError, match=r"gave up after 1s waiting for the experiment's base model .*: the "
                                         r"coordinator's `rl-swarm up` makes it"):
        join_when_ready(cfg, folder)
    monkeypatch.setattr(join, "COORDINATOR_PATIENCE", 60)
    joined = []
    joining = threading.Thread(target=lambda: joined.append(join_when_ready(cfg, folder)))
    joining.start()
    wait_until(lambda: "waiting up to 60s for the experiment's base model" in capsys.readouterr().out)
    write_json_atomic(folder.base_dir / "meta.json", sign_base_meta({"model_name": "m"}, "0" * 64, coordinator))
    # the settings it plays the rounds with, which `up` writes as it starts
    wait_until(lambda: "for the experiment's settings" in capsys.readouterr().out)
    # one a peer planted is not the coordinator's: the joiner waits on, rather than play with its own G
    write_json_atomic(folder.config_file, {**Resume().record(cfg.with_overrides(num_generations=3), "m", "cpu", "i")})
    wait_until(lambda: f"{folder.config_file}: not the experiment's coordinator's" in caplog.text)
    assert joining.is_alive() and not joined
    with coordinators_up(folder, cfg).held() as up:      # the settings of the `up` that runs: its lease names it
        write_recorded_config(folder, Resume().record(cfg, "m", "cpu", up.lease.instance), coordinator)
        joining.join(timeout=30)
    assert joined and f"coordinator key {coordinator.fingerprint} (pinned on this machine" in capsys.readouterr().out


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# -- links and floods --------------------------------------------------------------------------------

def test_a_folder_of_the_experiment_linked_elsewhere_is_never_followed_to_read_or_to_write(swarm, tmp_path, caplog):
    _, folder = swarm
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "stage_0").mkdir(parents=True)
    (elsewhere / "stage_0" / "w-2.json").write_text(json.dumps({"a": 1}))
    folder.rollouts_dir.joinpath("round_5").symlink_to(elsewhere)
    with pytest.raises(RejectedFile, match="a symbolic link where a folder of the experiment belongs"):
        read_json_bounded(folder.rollout_file(5, "w-2"))
    reader = node_exchange(folder, "w-1")
    assert reader.peer_rollouts(5) == {}
    node_exchange(folder, "w-3").publish_rollouts(5, [])            # a writer replaces the link with a folder
    assert sorted(p.name for p in (elsewhere / "stage_0").iterdir()) == ["w-2.json"]
    assert not folder.rollouts_dir.joinpath("round_5").is_symlink() and folder.rollout_file(5, "w-3").is_file()
    assert "a symbolic link was planted where a folder of the experiment belongs; replaced by a folder" in caplog.text


def test_a_peer_flooding_a_round_with_files_costs_a_bounded_read_and_hides_no_expected_peer(swarm, caplog):
    _, folder = swarm
    stage = folder.rollout_dir(1)
    stage.mkdir(parents=True)
    for n in range(MAX_LISTED + 50):
        (stage / f"a-flood-{n:05d}.json").write_text("{")
    node_exchange(folder, "w-2").publish_rollouts(1, [])
    reader = node_exchange(folder, "w-1")
    found = reader.wait_for_peers(1, {"w-2"}, timeout_s=30, stop=threading.Event())
    assert list(found) == ["w-2"]
    assert reader.rejected <= MAX_LISTED                              # no more files read than a listing takes
    assert caplog.text.count(f"over the {MAX_LISTED} a reader takes from one folder") == 1


def test_the_record_of_refused_files_stays_bounded_over_thousands_of_rounds(swarm, monkeypatch):
    _, folder = swarm
    monkeypatch.setattr(exchange_module, "MAX_REJECTED_KEPT", 50)
    reader = node_exchange(folder, "w-1")
    for round_ in range(1, 2001):
        reader.reject_group(f"round {round_} rollouts of w-9, group 0", "forged")
    assert reader.rejected == 2000 and len(reader._refused) == 50


# -- the whole swarm, with every forgery planted -----------------------------------------------------

@pytest.mark.slow
def test_a_swarm_full_of_forgeries_finishes_every_round_with_every_worker_and_names_each_forgery(tmp_path):
    env = swarm_env(tmp_path, NUM_WORKERS="3", MAX_ROUNDS="4", WARMUP_STEPS="0", EVAL_SIZE="0")
    exp = tmp_path / "drive" / "experiments" / EXPERIMENT
    folder = ExperimentFolder(exp)
    outside = tmp_path / "outside"
    outside.mkdir()
    # before the swarm: a forged round 2 state, rewards and rollouts of worker-2 for round 2, a far round 99,
    # round 3's rollouts folder linked elsewhere, and round 4's flooded
    forged = plant_forgeries(exp, victim="worker-2", later_round=2, far_round=99)
    folder.rollouts_dir.joinpath("round_3").symlink_to(outside, target_is_directory=True)
    flood = folder.rollout_dir(4)
    flood.mkdir(parents=True)
    for n in range(MAX_LISTED + 10):
        (flood / f"flood-{n:05d}.json").write_text("{")
    up = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", "up"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (exp / "peers" / "worker-2.json").exists() and (exp / "rewards" / "round_1").is_dir(),
                 240, "round 1", up)
        # while it runs: finished.json (`up` removed the first one it found) and worker-2's heartbeat say "done"
        late = plant_forgeries(exp, victim="worker-2", later_round=5, far_round=99)
        for kind in ("later round state", "rollouts", "rewards"):   # round 5 is never played
            late[kind].unlink()
        output, _ = up.communicate(timeout=300)
    finally:
        up.kill()
    assert "rl-swarm: finished" in output, output
    keys = KeyRing(folder)
    assert [read_round_state(folder, keys, r).reason != "forged" for r in (1, 2, 3, 4)] == [True] * 4
    assert read_finished(folder, keys).rounds == 4
    for node in ("worker-1", "worker-2", "worker-3"):
        rows = metrics_rows(exp, node)
        assert sorted(r["round"] for r in rows) == [1, 2, 3, 4], node
        assert all(r["external_available"] == 8 for r in rows), node      # every peer's groups, every round
        assert read_signed(folder.reward_file(2, node), node, keys)["round"] == 2
    assert list(outside.iterdir()) == []                              # nothing written through the link
    logs = "\n".join(p.read_text() for p in (exp / "logs").rglob("*.log"))
    for kind, path in {**forged, **{f"late {k}": p for k, p in late.items() if k in ("finished.json", "heartbeat")}
                       }.items():
        assert str(path) in logs, kind
    assert "a symbolic link was planted where a folder of the experiment belongs" in logs
    assert f"over the {MAX_LISTED} a reader takes from one folder" in logs


@pytest.mark.slow
def test_a_second_up_on_one_experiment_is_refused_in_one_line_also_during_the_warm_up(tmp_path):
    env = swarm_env(tmp_path, NUM_WORKERS="1", NUM_TRANSPLANT_TREES="0", WARMUP_STEPS="100000")
    exp = tmp_path / "drive" / "experiments" / EXPERIMENT
    first = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", "up"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (exp / "state" / "coordinator.lease.json").exists(), 240, "the first up's lease", first)
        second = subprocess.run([sys.executable, "-m", "swarm_supervisor", "up"], env=env, capture_output=True,
                                text=True, timeout=240)
        assert first.poll() is None and not (exp / "base").exists()           # the first is still warming up
    finally:
        first.send_signal(signal.SIGINT)
        output, _ = first.communicate(timeout=120)
    # Ctrl-C in the warm-up stops it at once, with one line and no traceback
    assert first.returncode == 130, output
    assert "rl-swarm: stopped by Ctrl-C before the swarm's rounds began; nothing was lost" in output
    assert "Traceback" not in output
    assert second.returncode == 2
    [line] = second.stderr.strip().splitlines()
    assert line.startswith(f"rl-swarm: error: experiment {EXPERIMENT!r} already has a coordinator: `rl-swarm up` (pid "
                           f"{first.pid}") and line.endswith("stop it first, or join its swarm with `rl-swarm worker`")
    assert not (exp / "state" / "coordinator.lease.json").exists()          # given back when the first stopped
