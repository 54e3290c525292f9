"""The shared records on an object store (SWARM_URL=s3://...), against a real S3 server (SeaweedFS) on this
machine; the same guarantees from the local folder."""

import contextlib
import csv
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from configs_env import ConfigError, SwarmConfig
from swarm_supervisor import cli
from swarm_supervisor.claim import CoordinatorClaim, coordinator_key
from swarm_supervisor.coordinator import Coordinator
from swarm_supervisor.experiments import metrics_by_round
from swarm_supervisor.notebook import FolderTable
from tests.helpers import (FakeGCS, SeaweedS3, group, heartbeat_record, join_from_another_machine, keyring,
                           node_exchange, node_key, swarm_env, wait_for, warnings_naming, write_as)
from workers.shared_folder import storage
from workers.shared_folder.exchange import (newest_signed_round, read_finished, read_heartbeats, read_round_state,
                                            read_signed)
from workers.shared_folder.hostile import plant_forgeries, plant_hostile_files
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import write_json_atomic
from workers.shared_folder.jsonl import append_jsonl, read_jsonl, read_jsonl_tail
from workers.shared_folder.rejections import FolderError
from workers.shared_folder.safe_io import is_visible, list_folder
from workers.shared_folder.protocol import Heartbeat, RoundMetrics, RoundState, SwarmFinished
from workers.shared_folder.signing import COORDINATOR, KeyRing
from workers.shared_folder.store_local import LocalStore


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    if server.reason:
        pytest.skip(f"no S3 server: {server.reason}")
    saved = {key: os.environ.get(key) for key in server.env()}
    os.environ.update(server.env())       # the standard places s3fs and botocore read, as a user would set them
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


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
    assert cli._prepare_rounds(folder, cfg, keyring(folder))            # MAX_ROUNDS=3 > 2: the swarm goes on
    assert not is_visible(folder.finished_file)         # so the workers do not leave at once


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
        assert _in_bucket(bucket, "rollouts/round_1/stage_0/hostile-1.json")         # they really are objects
        assert not any(p.is_file() for p in folder.root.rglob("*.json"))


# what peer_rollouts still returns of the hostile set: the files whose only fault is in a group (refused when
# the group is used, as on a Drive folder)
HOSTILE_PARSED = {1: {"hostile-6": 1}, 2: {}}


# -- one TEST_MODE swarm on s3://, shared by the tests that read it -------------------------------------------

SWARM_URL = "s3://swarm/runs"


@pytest.fixture(scope="module")
def s3_swarm(s3, tmp_path_factory):
    """`rl-swarm up` (TEST_MODE, 2 workers) with its records in the bucket; worker-1 is killed with -9 once it has
    finished round 1. Yields the run's environment, its experiment folder, output and exit code."""
    tmp_path = tmp_path_factory.mktemp("s3-swarm")
    env = swarm_env(tmp_path, NUM_WORKERS="2", WARMUP_STEPS="0", EVAL_SIZE="8", ROLLOUT_FETCH_TIMEOUT="10",
                    SWARM_URL=SWARM_URL)
    exp = tmp_path / "drive" / "experiments" / "e2e"
    bucket = storage.open_store(SWARM_URL, "e2e")
    proc = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", "up"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: _in_bucket(bucket, "rewards/round_1/worker-1.json"), 240, "worker-1's round 1", proc)
        # the checkpoint is written beside the next round (and stays on this machine's disk): the kill waits for
        # it, or the restarted worker would rightly find none to resume from
        wait_for(lambda: (exp / "checkpoints" / "worker-1" / "round_000001" / "meta.json").is_file(), 240,
                 "worker-1's checkpoint of round 1", proc)
        os.kill(json.loads(bucket.read("peers/worker-1.json", 64 * 1024))["pid"], signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    storage.mount_experiment(SWARM_URL, exp, "e2e")        # this process reads the run as another node would
    try:
        yield env, ExperimentFolder(exp), output, proc.returncode
    finally:
        storage.unmount(exp)


def _in_bucket(store: storage.Store, key: str) -> bool:
    try:
        store.version(key)
    except FileNotFoundError:
        return False
    return True


def rl_swarm(monkeypatch, capsys, gdrive: Path, *args: str, experiment: str = "e2e") -> tuple[int, str, str]:
    """`rl-swarm <args>` of a machine whose GDRIVE_PATH is `gdrive`, on the shared run's SWARM_URL."""
    for name, value in {"GDRIVE_PATH": str(gdrive), "SWARM_URL": SWARM_URL, "EXPERIMENT_NAME": experiment}.items():
        monkeypatch.setenv(name, value)
    try:
        code = cli.main(list(args))
    finally:
        for name in {experiment, "e2e"}:
            storage.unmount(gdrive / "experiments" / name)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_a_swarm_on_s3_finishes_with_a_worker_killed_mid_run_and_keeps_its_records_in_the_bucket(s3_swarm):
    env, folder, output, code = s3_swarm
    assert code == 0 and "rl-swarm: finished" in output, output
    # TEST_MODE's own validate read the bucket: both workers' rounds, and finished.json for the last evaluation
    assert "PASS  held-out evaluations: every worker was evaluated at the start and after the last round" in output
    assert "validate e2e: 8/8 checks passed" in output, output
    assert "resumed from checkpoint" in (folder.log_dir("worker-1") / "worker.log").read_text()
    for node in ("worker-1", "worker-2"):
        assert [row.round for row in read_jsonl(folder.metrics_file(node), RoundMetrics.from_json)] == [1, 2, 3]
    assert not any(p.is_file() for p in (folder.root / "state").rglob("*"))      # the records are in the bucket
    assert "secret-never-logged-8f3a" not in output + "".join(p.read_text() for p in folder.root.rglob("*.log"))


@pytest.mark.slow
def test_status_validate_and_experiments_read_an_s3_experiment_here_and_from_another_machine(
        s3_swarm, monkeypatch, capsys, tmp_path):
    env, folder, _, _ = s3_swarm
    here, elsewhere = Path(env["GDRIVE_PATH"]), tmp_path / "another-machine"
    code, out, _ = rl_swarm(monkeypatch, capsys, here, "status")
    assert code == 0 and "round 3/3" in out and "finished" in out
    assert re.search(r"worker-1 done\n.*\n.*restarts 1", out), out       # the supervisor's record of the kill
    code, out, _ = rl_swarm(monkeypatch, capsys, elsewhere, "status")     # no folder of it on that machine
    assert code == 0 and "round 3/3" in out and "worker-2 done" in out, out
    table = FolderTable(SwarmConfig.from_env({"GDRIVE_PATH": str(elsewhere), "SWARM_URL": SWARM_URL,
                                              "EXPERIMENT_NAME": "e2e"}))
    try:
        frame = table.frame()        # the notebooks' table of a swarm another runtime runs
    finally:
        storage.unmount(elsewhere / "experiments" / "e2e")
    assert "round 3/3" in frame.text and "worker-1" in frame.text and "not there" not in frame.text, frame.text
    code, out, _ = rl_swarm(monkeypatch, capsys, elsewhere, "validate")
    assert code == 0 and out.splitlines()[-1] == "validate e2e: 8/8 checks passed", out
    assert "PASS  checkpoints: every worker has a checkpoint within 1 rounds of its last round (2 on other " \
           "machines, where SWARM_URL leaves them)" in out
    code, out, _ = rl_swarm(monkeypatch, capsys, elsewhere, "experiments", "list", "--csv")
    [row] = list(csv.DictReader(io.StringIO(out)))
    assert (row["name"], row["status"], row["rounds"], row["nodes"]) == ("e2e", "finished", "3", "2")
    by_round = metrics_by_round(folder, KeyRing.for_viewing(folder, None))[0]
    rewards = [[m.reward_mean for m in nodes.values()] for nodes in by_round.values()]
    assert float(row["cumulative_reward"]) == pytest.approx(sum(sum(r) / len(r) for r in rewards))
    code, out, _ = rl_swarm(monkeypatch, capsys, elsewhere, "experiments", "compare", "e2e")
    assert code == 0 and "e2e" in out and "rounds 3/3" in out, out


@pytest.mark.slow
def test_validate_names_a_record_missing_from_the_bucket_and_a_missing_experiment_is_one_line(
        s3_swarm, monkeypatch, capsys, tmp_path):
    bucket = storage.open_store(SWARM_URL, "e2e")
    key = "rollouts/round_3/stage_0/worker-1.json"
    kept = bucket.read(key, 4 * 1024 * 1024)
    bucket.delete(key)
    try:
        code, out, _ = rl_swarm(monkeypatch, capsys, tmp_path, "validate")
    finally:
        bucket.write(key, kept)
    assert code == 1 and out.splitlines()[-1] == "validate e2e: 7/8 checks passed, 1 FAILED", out
    assert "FAIL  rollouts and metrics per round: 1 gaps: round 3: worker-1 has no rollouts" in out
    code, _, err = rl_swarm(monkeypatch, capsys, tmp_path, "status", experiment="nope")
    assert (code, err) == (2, f"rl-swarm: error: no experiment at {SWARM_URL}/experiments/nope: check SWARM_URL and "
                              "the experiment name\n")
    code, _, err = rl_swarm(monkeypatch, capsys, tmp_path, "experiments", "compare", "nope")
    assert (code, err) == (2, f"rl-swarm: error: no experiment nope under {SWARM_URL}/experiments\n")


@pytest.mark.slow
def test_a_second_machine_joins_a_swarm_on_s3_and_each_side_receives_the_others_rollouts(s3, tmp_path):
    """`rl-swarm worker` on another machine (its own local folder and temp dir: nothing but the bucket in common)
    joins an `up` running on s3://: from its second round on it receives both workers' groups every round, and they
    receive its (without a warm-up the tiny model earns no reward, so what they receive has no advantage to train
    on: the exchange is the point)."""
    url = f"s3://swarm/join{time.time_ns()}"
    env = swarm_env(tmp_path, NUM_WORKERS="2", MAX_ROUNDS="40", WARMUP_STEPS="0", EVAL_SIZE="8",
                    NUM_TRAIN_SAMPLES="2", NUM_TRANSPLANT_TREES="2", SWARM_URL=url)
    bucket = storage.open_store(url, "e2e")
    up = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", "up"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: _in_bucket(bucket, "state/round_000001.json"), 240, "round 1 in the bucket", up)
        elsewhere = tmp_path / "another-machine"
        joiner = join_from_another_machine(env, elsewhere, GDRIVE_PATH=str(elsewhere / "drive"))
        output, _ = up.communicate(timeout=180)
    finally:
        up.kill()
    assert up.returncode == 0 and joiner.returncode == 0, output + joiner.stdout + joiner.stderr
    exp = Path(env["GDRIVE_PATH"]) / "experiments" / "e2e"
    storage.mount_experiment(url, exp, "e2e")
    try:
        folder = ExperimentFolder(exp)
        joined = read_jsonl(folder.metrics_file("colab2"), RoundMetrics.from_json).records
        first = {row.round: row for row in read_jsonl(folder.metrics_file("worker-1"), RoundMetrics.from_json)}
    finally:
        storage.unmount(exp)
    assert joined and joined[-1].round == 40 and all(row.external_available == 4 for row in joined[1:])
    # once the joiner publishes, worker-1 sees 2 peers x I=2 groups instead of 1 x 2
    assert any(first[row.round].external_available == 4 for row in joined if row.round in first)
    assert not any(p.is_file() for p in (elsewhere / "drive").rglob("*.json") if "state" in p.parts)
