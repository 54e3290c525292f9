"""A TEST_MODE swarm with its records on s3:// (a real S3 server, SeaweedFS, on this machine): it finishes with a
worker killed mid-run, `status`, `validate` and `experiments` read it here and from another machine, and a
second machine joins it through nothing but the bucket."""

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs_env import SwarmConfig
from swarm_supervisor import cli
from swarm_supervisor.experiments import metrics_by_round
from swarm_supervisor.notebook import FolderTable
from tests.helpers import join_from_another_machine, swarm_env, wait_for
from tests.store_servers import in_bucket, serving_s3
from workers.shared_folder import storage
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.jsonl import read_jsonl
from workers.shared_folder.protocol import RoundMetrics
from workers.shared_folder.signing import KeyRing


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with serving_s3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


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
        wait_for(lambda: in_bucket(bucket, "rewards/round_1/worker-1.json"), 240, "worker-1's round 1", proc)
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
    # killed after round 2's line but before its checkpoint (written behind the next round) landed, worker-1
    # plays round 2 again from round 1's checkpoint, and does not record it twice
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
    missing = f"rl-swarm: error: no experiment named nope under SWARM_URL={SWARM_URL}: known: e2e\n"
    code, _, err = rl_swarm(monkeypatch, capsys, tmp_path, "status", experiment="nope")
    assert (code, err) == (2, missing)
    code, _, err = rl_swarm(monkeypatch, capsys, tmp_path, "experiments", "compare", "nope")
    assert (code, err) == (2, missing)


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
        wait_for(lambda: in_bucket(bucket, "state/round_000001.json"), 240, "round 1 in the bucket", up)
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
