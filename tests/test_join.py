"""A second machine joins: `rl-swarm worker` adds nodes to a swarm started elsewhere on the same folder."""

import json
import subprocess
import sys
import time

import pytest

from tests.helpers import join_from_another_machine, metrics_rows, swarm_env

pytestmark = pytest.mark.slow


def test_two_supervisors_share_one_folder_and_train_on_each_others_rollouts(tmp_path, start_from_base):
    env = swarm_env(tmp_path, NUM_WORKERS="2", MAX_ROUNDS="150", NUM_TRAIN_SAMPLES="2", NUM_TRANSPLANT_TREES="2",
                    CHECKPOINT_INTERVAL="50")
    exp = tmp_path / "drive" / "experiments" / "e2e"
    start_from_base(exp)
    up = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", "up"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (exp / "state" / "round_000001.json").exists():     # the other machine started the swarm
            assert up.poll() is None and time.monotonic() < deadline, up.stdout.read()
            time.sleep(0.2)
        joiner = join_from_another_machine(env, tmp_path / "other-machine")     # the same folder, as a mount
        output, _ = up.communicate(timeout=120)
    finally:
        up.kill()
    assert up.returncode == 0 and joiner.returncode == 0, output + joiner.stdout + joiner.stderr
    joined = metrics_rows(exp, "colab2")
    assert joined and joined[-1]["round"] == 150
    assert not (exp / "peers" / "coordinator.json").read_text().count("colab2")
    used_by_first = {r["round"]: r["external_available"] for r in metrics_rows(exp, "worker-1")}
    # once the joiner publishes, worker-1 sees 2 peers x I=2 groups instead of 1 x 2
    assert any(used_by_first[r["round"]] == 4 for r in joined if r["round"] in used_by_first)
    listed = json.loads((exp / "state" / "round_000150.json").read_text())["nodes"]
    assert "colab2" in listed
    # each machine's supervisor appends to its own files only (two runtimes appending one file through Drive
    # would upload their copies over each other)
    logs = exp / "logs"
    assert "started 1 workers" in (logs / "supervisor-colab2" / "events.jsonl").read_text()
    assert "started 1 workers" not in (logs / "supervisor" / "events.jsonl").read_text()
    assert (logs / "supervisor-colab2" / "supervisor.log").stat().st_size > 0


def test_a_second_process_with_the_same_node_id_refuses_to_start(tmp_path, start_from_base):
    # rounds enough to outlast the twin's start: the swarm is stopped as soon as the twin has answered
    env = swarm_env(tmp_path, NUM_WORKERS="2", MAX_ROUNDS="2000", NUM_TRAIN_SAMPLES="1", NUM_TRANSPLANT_TREES="1")
    exp = tmp_path / "drive" / "experiments" / "e2e"
    start_from_base(exp)
    up = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", "up"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (exp / "rewards" / "round_1").is_dir():
            assert up.poll() is None and time.monotonic() < deadline, up.stdout.read()
            time.sleep(0.2)
        twin = subprocess.run([sys.executable, "-m", "swarm_supervisor", "worker"], env={**env, "NUM_WORKERS": "1",
                              "NODE_ID": "worker-1"}, capture_output=True, text=True, timeout=120)
    finally:
        up.terminate()
        up.communicate(timeout=60)
    assert twin.returncode == 2
    assert "node 'worker-1' is already running" in twin.stderr and "pick another NODE_ID" in twin.stderr
