"""The shared records on an object store (SWARM_URL=s3://...), against a real S3 server (SeaweedFS) on this
machine; the same guarantees from the local folder. A whole swarm on s3://: test_object_store_swarm.py."""

import contextlib
import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time

import pytest

from configs_env import ConfigError, SwarmConfig
from swarm_supervisor import cli
from swarm_supervisor.claim import CoordinatorClaim, coordinator_key
from swarm_supervisor import coordinator as coordinator_module
from swarm_supervisor.coordinator import Coordinator
from swarm_supervisor import status as status_module
from swarm_supervisor.status import SwarmReader
from swarm_supervisor.supervisor import QUIET_VIEW_S, TICK_S, view_interval
from tests.helpers import (append_as, group, heartbeat_record, keyring, metrics_row, node_exchange, node_key,
                           warnings_naming, write_as)
from tests.store_servers import FakeGCS, in_bucket, serving_s3
from workers.shared_folder import storage, store_fsspec
from workers.shared_folder.held_out import eval_file
from workers.shared_folder.exchange import (newest_signed_round, read_finished, read_heartbeats, read_round_state,
                                            read_signed)
from workers.shared_folder.hostile import plant_forgeries, plant_hostile_files
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import write_json_atomic
from workers.shared_folder.jsonl import append_jsonl, read_jsonl, read_jsonl_tail
from workers.shared_folder.rejections import FolderError
from workers.shared_folder.safe_io import is_visible, list_folder
from workers.shared_folder.protocol import Heartbeat, HeldOutEval, RoundState, SwarmFinished
from workers.shared_folder.signing import COORDINATOR
from workers.shared_folder.store_local import LocalStore


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with serving_s3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    server = FakeGCS(tmp_path_factory.mktemp("fake-gcs"))
    if server.reason:
        pytest.skip(f"no GCS emulator: {server.reason}")
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ.update(server.env())
    try:
        yield server
    finally:
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
        server.stop()


SERVERS = {"s3": "s3", "gs": "gcs"}


@pytest.fixture(params=["local", "s3", "gs"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    request.getfixturevalue(SERVERS[request.param])
    return storage.open_store(f"{request.param}://swarm/t{time.time_ns()}", "exp")


@contextlib.contextmanager
def created(tmp_path, url: str | None, **env: str):
    """A created experiment, its records in the S3 bucket at `url` (None: a local folder)."""
    cfg = SwarmConfig.from_env({"GDRIVE_PATH": str(tmp_path / "local"), "RL_SWARM_CACHE": str(tmp_path / "cache"),
                                "EXPERIMENT_NAME": "exp", "MAX_ROUNDS": "3", **({"SWARM_URL": url} if url else {}),
                                **env})
    storage.mount_experiment(cfg.swarm_url, cfg.experiment_dir, cfg.experiment_name)
    try:
        yield cfg, ExperimentFolder(cfg.experiment_dir).create()
    finally:
        storage.unmount(cfg.experiment_dir)


@pytest.fixture(params=["local", "s3", "gs"])
def experiment(request, tmp_path):
    if request.param != "local":
        request.getfixturevalue(SERVERS[request.param])
    url = f"{request.param}://swarm/t{time.time_ns()}" if request.param != "local" else None
    with created(tmp_path, url) as made:
        yield made


def test_a_second_coordinator_cannot_overwrite_a_round_the_first_started(experiment):
    cfg, folder = experiment
    key = node_key(folder, "coordinator")      # two `up`s of one machine past the lease: the same key
    first, second = (Coordinator(cfg, folder, threading.Event(), lambda: {"w-1", "w-2"}, key) for _ in range(2))
    first._start_round(1, "start")
    started = read_round_state(folder, keyring(folder), 1)
    with pytest.raises(FolderError, match=r"round_000001.json: round 1 was already started by another coordinator "
                                          r"of experiment 'exp': stop the other `rl-swarm up`"):
        second._start_round(1, "start")
    assert read_round_state(folder, keyring(folder), 1) == started         # the first one's round stands
    assert folder.state_rounds() == [1] and second.round == 0


def test_a_coordinator_polling_a_bucket_reads_each_rewards_file_once_and_the_heartbeats_once_a_second(
        s3, tmp_path, monkeypatch):
    """A bucket bills each request. While a round waits for its last worker, a poll lists the round's rewards and
    reads nothing it has read before; the round's end reads the last rewards file, and the heartbeats only when the
    last read of them is LIVENESS_READ_S old."""
    monkeypatch.setattr(coordinator_module, "LIVENESS_READ_S", 3600.0)
    with created(tmp_path, f"s3://swarm/t{time.time_ns()}") as (cfg, folder):
        workers = ("w-1", "w-2")
        for node in workers:
            write_as(folder, node, folder.heartbeat_file(node), heartbeat_record(node))
        coordinator = Coordinator(cfg, folder, threading.Event(), set, node_key(folder, "coordinator"))
        coordinator._start_round(1, "start")
        store = storage.mounted(folder.state_dir)[0]

        def requests_of(call) -> dict[str, int]:
            before = dict(store.requests)
            call()
            return {kind: n - before.get(kind, 0) for kind, n in store.requests.items() if n != before.get(kind, 0)}

        write_as(folder, "w-1", folder.reward_file(1, "w-1"), metrics_row("w-1", 1))
        coordinator._maybe_advance()
        assert coordinator.round == 1                                  # w-2 is not done yet
        assert requests_of(coordinator._maybe_advance) == {"list": 1}  # w-1's file and the heartbeats: not again
        write_as(folder, "w-2", folder.reward_file(1, "w-2"), metrics_row("w-2", 1))
        ended = requests_of(coordinator._maybe_advance)
        assert coordinator.round == 2 and read_round_state(folder, keyring(folder), 2).nodes == workers
        assert ended.get("get") == 1 and "head" not in ended     # w-2's file (version: the listing's), no beat
        monkeypatch.setattr(coordinator_module, "LIVENESS_READ_S", 0.0)
        assert requests_of(coordinator.expected_nodes).get("list") == 1     # now old enough: read again


def test_a_view_of_a_bucket_lists_the_round_states_once_and_each_held_out_log_every_few_seconds(
        s3, tmp_path, monkeypatch):
    """The dashboard draws a view of the folder every second, and a bucket bills each listing. A view lists each
    worker's metrics log, the heartbeats and the round states once (the states were listed three times), and a
    worker's held-out log only when it last asked HELD_OUT_CHECK_S ago (the log grows every EVAL_EVERY rounds);
    a terminal's live table, redrawn four times a second, reads a bucket once a second."""
    with created(tmp_path, f"s3://swarm/t{time.time_ns()}") as (cfg, folder):
        workers = ("w-1", "w-2")
        for node in workers:
            write_as(folder, node, folder.heartbeat_file(node), heartbeat_record(node))
            append_as(folder, node, folder.metrics_file(node), metrics_row(node, 1))
            append_as(folder, node, eval_file(folder, node), HeldOutEval(node, 0, 0.5, 8, 1.0).to_json())
        Coordinator(cfg, folder, threading.Event(), set, node_key(folder, "coordinator"))._start_round(1, "start")
        reader = SwarmReader(folder, cfg, "tiny", "cpu", keyring(folder))
        store = storage.mounted(folder.state_dir)[0]

        def a_view() -> tuple[int, list[float | None]]:
            """The listings one view made, and the workers' newest held-out accuracy it shows."""
            before = store.requests["list"]
            view = reader.view()
            assert view.round == 1
            return store.requests["list"] - before, [r.held_out for r in view.nodes if r.role == "worker"]

        a_view()
        monkeypatch.setattr(status_module, "HELD_OUT_CHECK_S", math.inf)
        assert a_view()[0] == len(workers) + 2          # the metrics logs, the heartbeats, the round states
        for node in workers:                              # an evaluation lands: shown at the next look
            append_as(folder, node, eval_file(folder, node), HeldOutEval(node, 5, 0.75, 8, 1.0).to_json())
        assert a_view()[1] == [None, None]                # not looked for yet: only the start so far
        monkeypatch.setattr(status_module, "HELD_OUT_CHECK_S", 0.0)
        # each held-out log listed for its size, and once more to read its new row
        assert a_view() == (3 * len(workers) + 2, [0.75, 0.75])
        assert a_view()[0] == 2 * len(workers) + 2      # unchanged since: its size only
        # a supervisor's live table (a terminal) reads a bucket once a second, not at each of its redraws
        on_store = storage.mounted(folder.state_dir) is not None
        assert view_interval(True, on_store) == QUIET_VIEW_S > view_interval(True, False) == TICK_S


def test_a_crashed_ups_lease_does_not_block_a_resume_and_a_finished_up_gives_its_lease_back(experiment):
    cfg, folder = experiment
    key, keyring = coordinator_key(cfg, folder)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    crashed = CoordinatorClaim(cfg, folder, key, keyring, "up").lease
    write_json_atomic(folder.coordinator_lease_file, key.sign({"schema": 1, **{**crashed.__dict__, "pid": dead.pid}}))
    with CoordinatorClaim(cfg, folder, key, keyring, "up").held() as resumed:
        held = read_signed(folder.coordinator_lease_file, COORDINATOR, keyring)
        assert held["instance"] == resumed.lease.instance
    assert not is_visible(folder.coordinator_lease_file)


def test_a_raised_max_rounds_continues_a_finished_experiment(experiment):
    cfg, folder = experiment
    write_as(folder, "coordinator", folder.finished_file, SwarmFinished(rounds=2, finished_at=time.time()).to_json())
    assert cli._prepare_rounds(folder, cfg, keyring(folder), "m") is not None     # MAX_ROUNDS=3 > 2: it goes on
    assert not is_visible(folder.finished_file)         # so the workers do not leave at once


def test_a_run_longer_than_a_listing_resumes_and_is_seen_at_its_newest_round(experiment, monkeypatch):
    """A listing is bounded (10,000 names of a bucket, in name order; 65,536 of a folder, in any order): the rounds
    after the newest listed are found file by file, so a restarted coordinator resumes at the newest round and a
    view shows it. The bounds are made 10 here, for 40 rounds instead of 10,040."""
    import workers.shared_folder.folder as folder_module
    from workers.shared_folder import safe_io

    cfg, folder = experiment
    cfg = dataclasses.replace(cfg, max_rounds=100)
    key = node_key(folder, "coordinator")
    first = Coordinator(cfg, folder, threading.Event(), lambda: {"w-1"}, key)
    for round_ in range(1, 41):
        first._start_round(round_, "start")
    for module, name, bound in ((storage, "MAX_LISTED", 10), (safe_io, "MAX_SCANNED", 10),
                                (folder_module, "MAX_SCANNED", 10), (folder_module, "MAX_LISTED", 8)):
        monkeypatch.setattr(module, name, bound)
    assert folder.state_rounds()[-4:] == [37, 38, 39, 40]
    assert newest_signed_round(folder, keyring(folder)).round == 40
    resumed = Coordinator(cfg, folder, threading.Event(), lambda: {"w-1"}, key)
    resumed._resume()
    assert resumed.round == 40


def test_old_rounds_rollouts_leave_the_bucket_and_archiving_them_is_refused_in_one_line(s3, tmp_path):
    url = f"s3://swarm/t{time.time_ns()}"
    with created(tmp_path, url, ROLLOUT_CLEANUP_ENABLED="true", ROLLOUT_KEEP_LAST_N_ROUNDS="1") as (cfg, folder):
        for round_ in (1, 2, 3):
            node_exchange(folder, "w-1").publish_rollouts(round_, [group()])
        coordinator = Coordinator(cfg, folder, threading.Event(), lambda: {"w-1"}, node_key(folder, "coordinator"))
        coordinator.round = 3
        coordinator.retire_old_rollouts()
        # (SeaweedFS still lists the emptied round_1/ as a folder, where S3 lists nothing: the files are what count)
        assert [[path.name for path in list_folder(folder.rollout_dir(r))] for r in (1, 2, 3)] == \
            [[], ["w-1.json"], ["w-1.json"]]
    with pytest.raises(ConfigError, match=r"^ROLLOUT_ARCHIVE_OLD=true with SWARM_URL: old rounds' rollouts are in the "
                                          r"bucket.*; set ROLLOUT_ARCHIVE_OLD=false"):
        SwarmConfig.from_env({"SWARM_URL": url, "ROLLOUT_CLEANUP_ENABLED": "1", "ROLLOUT_ARCHIVE_OLD": "1"})


def test_a_store_writes_whole_records_once_and_appends_logs_in_order(store):
    store.write("state/round_000001.json", b'{"round":1}')
    assert store.read("state/round_000001.json", 100) == b'{"round":1}'
    # a write-once record: a second writer is refused, the first one's record stands
    assert store.create("state/round_000002.json", b'{"by":"first"}')
    assert not store.create("state/round_000002.json", b'{"by":"second"}')
    assert store.read("state/round_000002.json", 100) == b'{"by":"first"}'
    store.write("big.json", b"x" * 101)
    with pytest.raises(ValueError, match="100-byte limit"):
        store.read("big.json", 100)
    with pytest.raises(FileNotFoundError):
        store.read("state/round_000009.json", 100)
    store.write("empty.json", b"")             # a ranged read of nothing: S3 and GCS answer 416, not an empty body
    assert store.read("empty.json", 100) == b""
    before = store.version("state/round_000001.json")
    store.write("state/round_000001.json", b'{"round":1,"again":true}')
    assert store.version("state/round_000001.json") != before
    lines = [f'{{"round":{r}}}\n'.encode() for r in range(1, 6)]
    for line in lines:
        store.append("metrics/w-1/metrics.jsonl", line)
    assert store.read_log("metrics/w-1/metrics.jsonl", 0, 10_000) == b"".join(lines)
    assert store.read_log("metrics/w-1/metrics.jsonl", len(lines[0]), 10_000) == b"".join(lines[1:])
    assert store.read_log("metrics/w-2/metrics.jsonl", 0, 10_000) == b""
    names = [entry.name for entry in store.list("state")]
    assert names == ["round_000001.json", "round_000002.json"]
    assert len(store.list("state", limit=1)) == 1 and store.list("nothing/here") == []
    store.delete("state")
    assert store.list("state") == []


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_version_asked_right_after_a_listing_costs_no_request_and_a_rewrite_shows_at_the_next(
        scheme, request, monkeypatch):
    """A reader lists a folder, then asks each file's version before reading it: the listing already says it (a
    HEAD per file less), the same the HEAD would say. A peer's rewrite shows at the next listing, as a poll later;
    this process's own write is never answered from an older listing."""
    monkeypatch.setattr(store_fsspec, "LISTED_FRESH_S", 3600.0)
    request.getfixturevalue(SERVERS[scheme])
    url = f"{scheme}://swarm/t{time.time_ns()}"
    ours, peer = storage.open_store(url, "exp"), storage.open_store(url, "exp")
    peer.write("d/a.json", b"one")
    by_head = ours.version("d/a.json")
    heads = ours.requests["head"]
    ours.list("d")
    assert ours.version("d/a.json") == by_head and ours.requests["head"] == heads
    peer.write("d/a.json", b"two!")
    ours.list("d")
    rewritten = ours.version("d/a.json")
    assert rewritten != by_head and rewritten == peer.version("d/a.json") and ours.requests["head"] == heads
    ours.write("d/a.json", b"three")
    assert ours.version("d/a.json") not in (by_head, rewritten) and ours.requests["head"] == heads + 1


def test_the_swarms_records_live_in_the_bucket_and_checkpoints_stay_local(s3, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = SwarmConfig.from_env({"GDRIVE_PATH": str(tmp_path / "local"), "SWARM_URL": "s3://swarm/team-a",
                                "EXPERIMENT_NAME": "exp1"})
    store = storage.mount_experiment(cfg.swarm_url, cfg.experiment_dir, cfg.experiment_name)
    try:
        folder = ExperimentFolder(cfg.experiment_dir).create()
        write_as(folder, "coordinator", folder.round_state_file(1),
                 RoundState(1, 3, time.time(), "start", ("w-1", "w-2")).to_json())
        writer, reader = node_exchange(folder, "w-1"), node_exchange(folder, "w-2")
        for exchange in (writer, reader):
            exchange.write_heartbeat(Heartbeat.first(exchange.node, "worker", "training"))
        writer.publish_rollouts(1, [group()])
        for round_ in (1, 2):
            append_jsonl(folder.metrics_file("w-1"), {"round": round_})
        # what a peer on another machine reads, through the same helpers
        assert folder.state_rounds() == [1]
        assert set(read_heartbeats(folder, keyring(folder))) == {"w-1", "w-2"}
        assert [g.index for g in reader.peer_rollouts(1)["w-1"]] == [7]
        tail = read_jsonl_tail(folder.metrics_file("w-1"), 0)
        assert [row["round"] for row in tail] == [1, 2]
        append_jsonl(folder.metrics_file("w-1"), {"round": 3})
        assert [row["round"] for row in read_jsonl_tail(folder.metrics_file("w-1"), tail.end)] == [3]
        # a forged heartbeat and an oversized rollout file in the bucket are skipped, not trusted
        store.write("peers/w-9.json", json.dumps(heartbeat_record("w-9")).encode())
        store.write("rollouts/round_1/stage_0/w-3.json", b"[" * 5_000_000)
        assert "w-9" not in read_heartbeats(folder, keyring(folder))
        assert "w-3" not in reader.peer_rollouts(1) and reader.rejected == 1
        keys = sorted(entry.name for entry in store.list(""))
        assert keys == ["keys", "metrics", "peers", "rollouts", "state"]
        assert not any(p.is_file() for p in cfg.experiment_dir.rglob("*"))    # nothing of the protocol is local
        assert read_jsonl(folder.metrics_file("w-1")).records[-1] == {"round": 3}
        assert "secret-never-logged-8f3a" not in caplog.text
        assert sum(store.requests.values()) > 0
    finally:
        storage.unmount(cfg.experiment_dir)


def test_a_missing_extra_or_a_url_with_credentials_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("GDRIVE_PATH", str(tmp_path))
    monkeypatch.setenv("SWARM_URL", "s3://KEY:SECRET@swarm/x")
    assert cli.main(["status"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SWARM_URL='s3://KEY:SECRET@swarm/x': expected s3://bucket/prefix" in err
    monkeypatch.setenv("SWARM_URL", "gs://swarm/x")
    monkeypatch.setitem(sys.modules, "gcsfs", None)       # as on a machine without the [gcs] extra
    assert cli.main(["status"]) == 2
    assert capsys.readouterr().err == ("rl-swarm: error: SWARM_URL=gs://...: the gcsfs package is missing; install "
                                       "it with pip install -e '.[gcs]'\n")


def test_gcs_errors_that_are_not_oserrors_become_oserrors_so_a_hiccup_is_retried_and_a_refusal_named():
    """gcsfs raises its HttpError (a 5xx after its own retries), aiohttp's errors and a ChecksumError, none an
    OSError: every caller in rl-swarm retries and reports OSError, so a GCS hiccup would crash a worker."""
    pytest.importorskip("gcsfs")
    import aiohttp
    from gcsfs.retry import HttpError

    from workers.shared_folder.store_fsspec import _HttpErrorsAsOSError

    class Failing:
        def __init__(self, error: Exception):
            self.error = error

        def cat_file(self, *args, **kwargs):
            raise self.error

    for error, kind in ((HttpError({"code": 503, "message": "slow down"}), OSError),
                        (aiohttp.ServerDisconnectedError(), OSError),
                        (HttpError({"code": 403, "message": "no access"}), PermissionError)):
        with pytest.raises(kind) as raised:
            _HttpErrorsAsOSError(Failing(error)).cat_file("swarm/x")
        assert raised.value.__cause__ is error
    with pytest.raises(ValueError):            # not a storage error: it stays what it is
        _HttpErrorsAsOSError(Failing(ValueError("a bug"))).cat_file("swarm/x")


def test_hostile_objects_and_forgeries_put_in_the_bucket_are_refused_each_named(s3, tmp_path, caplog):
    """Anyone with the bucket's credentials can put objects: the same hostile set and forgeries as on a Drive
    folder are refused by the readers of an s3:// experiment, and the honest records still read."""
    with created(tmp_path, f"s3://swarm/t{time.time_ns()}") as (cfg, folder):
        workers = {node: node_exchange(folder, node) for node in ("w-1", "w-2")}
        keyring = node_exchange(folder, COORDINATOR).keyring
        write_as(folder, COORDINATOR, folder.round_state_file(1), RoundState(1, 3, time.time(), "start").to_json())
        for node, exchange in workers.items():
            exchange.write_heartbeat(Heartbeat.from_json(heartbeat_record(node), "here"))
        workers["w-2"].publish_rollouts(1, [group()])
        workers["w-2"].publish_rollouts(2, [group()])
        hostile = plant_hostile_files(folder.root, round_=1)
        forged = plant_forgeries(folder.root, victim="w-2", later_round=2, far_round=99)
        for _ in range(2):                  # readers poll: the second look warns about nothing again
            assert read_finished(folder, keyring) is None
            assert newest_signed_round(folder, keyring).round == 1           # not the forged 2 or 99
            assert list(read_heartbeats(folder, keyring)) == ["w-1"]          # nor the forger's "w-2 is done"
            for round_ in (1, 2):
                peers = workers["w-1"].peer_rollouts(round_)
                assert {node: len(groups) for node, groups in peers.items()} == {"w-2": 1, **HOSTILE_PARSED[round_]}
        coordinator = Coordinator(cfg, folder, threading.Event(), lambda: {"w-1", "w-2"},
                                  node_key(folder, COORDINATOR), keyring)
        assert coordinator.done_nodes(2) == set()                  # the forged rewards do not end w-2's round
        for kind, path in {**hostile, **forged}.items():
            if kind != "unknown task":      # a well-formed file: its group is refused where it is used
                assert warnings_naming(caplog, path) == 1, kind
        bucket = storage.open_store(cfg.swarm_url, "exp")
        assert in_bucket(bucket, "rollouts/round_1/stage_0/hostile-1.json")         # they really are objects
        assert not any(p.is_file() for p in folder.root.rglob("*.json"))


# what peer_rollouts still returns of the hostile set: the files whose only fault is in a group (refused when
# the group is used, as on a Drive folder)
HOSTILE_PARSED = {1: {"hostile-6": 1}, 2: {}}
