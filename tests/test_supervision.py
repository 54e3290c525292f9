"""Workers that crash are restarted from their checkpoints; one that keeps crashing is marked failed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import heartbeat, metrics_rows, swarm_env, wait_for

pytestmark = pytest.mark.slow


def start(tmp_path, start_from_base, **extra):
    env = swarm_env(tmp_path, NUM_WORKERS="2", NUM_TRAIN_SAMPLES="1", NUM_TRANSPLANT_TREES="1", **extra)
    exp = tmp_path / "drive" / "experiments" / "e2e"
    start_from_base(exp)
    proc = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", "up"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, exp


def test_a_worker_killed_mid_round_is_restarted_from_its_checkpoint_and_the_swarm_finishes(tmp_path, start_from_base):
    proc, exp = start(tmp_path, start_from_base, MAX_ROUNDS="8", ROLLOUT_FETCH_TIMEOUT="5")
    try:
        wait_for(lambda: (exp / "rewards" / "round_3" / "worker-1.json").exists(), 180, "round 3", proc)
        victim = heartbeat(exp, "worker-1")["pid"]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: (heartbeat(exp, "worker-1") or {}).get("pid") not in (None, victim), 60,
                 "the restarted worker's first heartbeat", proc)
        restart_latency = time.monotonic() - killed_at
        output, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "worker-1: exited with code -9" in (exp / "logs" / "supervisor" / "events.jsonl").read_text()
    assert "resumed from checkpoint" in (exp / "logs" / "worker-1" / "worker.log").read_text()
    assert metrics_rows(exp, "worker-1")[-1]["round"] == 8
    print(f"restart latency (kill -9 to first heartbeat of the new process): {restart_latency:.1f}s")


def test_a_worker_that_keeps_crashing_is_marked_failed_while_the_other_finishes(tmp_path, start_from_base):
    proc, exp = start(tmp_path, start_from_base, MAX_ROUNDS="6", MAX_RESTARTS="2", ROLLOUT_FETCH_TIMEOUT="2",
                      COORDINATOR_ROUND_INTERVAL="3")
    killed = set()
    try:
        deadline = time.monotonic() + 200
        while proc.poll() is None and time.monotonic() < deadline:
            beat = heartbeat(exp, "worker-2")
            if beat and beat["pid"] not in killed and beat["status"] not in ("crashed", "stopped", "done"):
                try:
                    os.kill(beat["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
                killed.add(beat["pid"])
            time.sleep(0.1)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert len(killed) == 3                           # the first run and R=2 restarts
    assert proc.returncode == 1, output               # finished, but not every worker made it
    assert "worker-2: failed" in output and "worker-1: finished at round 6" in output
    assert metrics_rows(exp, "worker-1")[-1]["round"] == 6
    events = [json.loads(line) for line in (exp / "logs" / "supervisor" / "events.jsonl").read_text().splitlines()]
    failed = [e for e in events if "failed (2 restarts within" in e["event"]]
    # a worker given up on is an error a program can find, not an info line among the rounds
    assert [(e["level"], e["kind"], e["node"]) for e in failed] == [("error", "failed", "worker-2")]


def test_workers_of_a_supervisor_killed_with_sigkill_stop_as_on_ctrl_c(tmp_path, start_from_base):
    """`kill -9` of the supervisor (the OOM killer's choice, say): its workers stop cleanly at once, their last
    round checkpointed, instead of dying at their next wait between rounds with every round since the last
    checkpoint lost."""
    import psutil

    from tests.helpers import survivors

    proc, exp = start(tmp_path, start_from_base, MAX_ROUNDS="2000", CHECKPOINT_INTERVAL="100")
    try:
        wait_for(lambda: all((exp / "rewards" / "round_2" / f"{node}.json").exists()
                             for node in ("worker-1", "worker-2")), 180, "round 2", proc)
        workers = [heartbeat(exp, node)["pid"] for node in ("worker-1", "worker-2")]
        helpers = [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
        proc.kill()
        proc.wait(timeout=30)
        assert not survivors(workers + helpers, grace_s=60), "processes left after the supervisor was killed"
    finally:
        proc.kill()
    for node in ("worker-1", "worker-2"):     # each saved its last round, well short of CHECKPOINT_INTERVAL
        last = metrics_rows(exp, node)[-1]["round"]
        assert (exp / "checkpoints" / node / f"round_{last:06d}").is_dir(), node
        assert heartbeat(exp, node)["status"] == "stopped"
