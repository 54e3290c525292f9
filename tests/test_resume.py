"""A worker killed with -9 in the middle of round 4 resumes from its round-3 checkpoint and ends with the
same weights and optimizer state, bit for bit, as a swarm that ran its 6 rounds without a kill."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import metrics_rows, swarm_env
from tests.helpers import heartbeat, wait_for

pytestmark = pytest.mark.slow

NODES = ("worker-1", "worker-2")


def resume_env(tmp_path: Path, name: str) -> dict[str, str]:
    # The timeouts are far above any wait here: a peer wait or a round interval that runs out makes a worker
    # go on without a peer's rollouts, which is a different (and timing-dependent) run, not a resume bug.
    return swarm_env(tmp_path, EXPERIMENT_NAME=name, SEED="7",
                     NUM_WORKERS="2", MAX_ROUNDS="6", NUM_TRAIN_SAMPLES="4", NUM_GENERATIONS="8",
                     NUM_TRANSPLANT_TREES="2", MAX_NEW_TOKENS="16", CHECKPOINT_INTERVAL="1",
                     ROLLOUT_FETCH_TIMEOUT="300", COORDINATOR_ROUND_INTERVAL="300", RESTART_BACKOFF="0.5")


def final_state(exp: Path, node: str) -> tuple[dict[str, torch.Tensor], dict]:
    folder = exp / "checkpoints" / node / "round_000006"
    state = torch.load(folder / "state.pt", weights_only=True)
    return load_file(str(folder / "model.safetensors")), state["optimizer"]


def assert_same_tensors(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{where}.{key} differs"
        else:
            assert a[key] == b[key], f"{where}.{key} differs"


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def run_killing_worker_1_mid_round_4(env: dict[str, str], exp: Path) -> str:
    proc = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", "up"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # worker-2 is paused as soon as it finishes round 3, so worker-1 publishes its round-4 rollouts and
        # then waits for worker-2's: the kill lands after publishing and before the update, every time
        wait_for(lambda: (exp / "rewards" / "round_2" / "worker-2.json").exists(), 180, "worker-2's round 2", proc)
        slow = heartbeat(exp, "worker-2")["pid"]
        deadline = time.monotonic() + 60
        while not (exp / "rewards" / "round_3" / "worker-2.json").exists():     # polled tightly: round 4 of
            assert time.monotonic() < deadline, "worker-2 never finished round 3"  # worker-2 is ~0.2 s away
            time.sleep(0.005)
        os.kill(slow, signal.SIGSTOP)
        try:
            assert not (exp / "rollouts" / "round_4" / "stage_0" / "worker-2.json").exists(), \
                "worker-2 published round 4 before it was paused: the kill would not land mid-round"
            wait_for(lambda: (heartbeat(exp, "worker-1") or {}).get("status") == "fetching"
                     and (heartbeat(exp, "worker-1") or {}).get("round") == 4, 120, "worker-1 waiting in round 4", proc)
            victim = heartbeat(exp, "worker-1")["pid"]
            os.kill(victim, signal.SIGKILL)
            assert gone(victim, 10)
        finally:
            os.kill(slow, signal.SIGCONT)
        assert (exp / "rollouts" / "round_4" / "stage_0" / "worker-1.json").exists()
        assert not (exp / "checkpoints" / "worker-1" / "round_000004").exists()    # killed mid-round
        output, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    return output


def test_kill_and_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, start_from_base):
    straight = tmp_path / "drive" / "experiments" / "straight"
    resumed = tmp_path / "drive" / "experiments" / "resumed"
    # both start from the session's base: this test is about the kill and the resume, not the warm-up
    start_from_base(straight)
    start_from_base(resumed)

    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "swarm_supervisor", "up"], env=resume_env(tmp_path, "straight"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    straight_s = time.monotonic() - started
    run_killing_worker_1_mid_round_4(resume_env(tmp_path, "resumed"), resumed)
    events = (resumed / "logs" / "supervisor" / "events.jsonl").read_text()
    assert "worker-1: exited with code -9" in events
    assert "resumed from checkpoint of round 3" in (resumed / "logs" / "worker-1" / "worker.log").read_text()
    round_4 = metrics_rows(straight, "worker-1")[3]
    assert round_4["local_groups"] - round_4["zero_advantage_groups"] + round_4["external_groups"] > 0, \
        "the replayed round had nothing to train on, so it proves little: pick another SEED"
    for node in NODES:
        weights_a, optimizer_a = final_state(straight, node)
        weights_b, optimizer_b = final_state(resumed, node)
        assert_same_tensors(weights_a, weights_b, f"{node} weights")
        assert_same_tensors(optimizer_a, optimizer_b, f"{node} optimizer")
        rows_a, rows_b = metrics_rows(straight, node), metrics_rows(resumed, node)
        assert [r["round"] for r in rows_b] == [1, 2, 3, 4, 5, 6]       # round 4 recorded once, by the restart
        assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
        assert [r["reward_mean"] for r in rows_a] == [r["reward_mean"] for r in rows_b]
    # the comparison means something only if the swarm learned: some rounds had a gradient
    assert any(r["loss"] != 0.0 for node in NODES for r in metrics_rows(straight, node))
    base = load_file(str(straight / "base" / "model.safetensors"))
    assert any(not torch.equal(base[k], v) for k, v in final_state(straight, "worker-1")[0].items())
    print(f"uninterrupted run: {straight_s:.1f}s, with kill and resume: {time.monotonic() - started - straight_s:.1f}s")
