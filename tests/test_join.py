"""A second machine joins: `rl-swarm worker` adds nodes to a swarm started elsewhere on the same folder."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from workers.shared_folder.folder import ExperimentFolder
from tests.helpers import join_from_another_machine, metrics_rows, swarm_env, wait_for

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class TwoMachines:
    exp: Path
    up: subprocess.CompletedProcess          # the first machine's `up`
    joiner: subprocess.CompletedProcess      # `rl-swarm worker` from the second machine
    twin: subprocess.CompletedProcess        # a second `worker-1` of the first machine, while worker-1 runs


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory, start_from_base) -> TwoMachines:
    """One swarm both stories share. The second machine starts with the first and waits for its coordinator's key,
    so its import of torch (10-13 s of a 2-core CPU) overlaps the first machine's and it plays from round 1 or
    so: started after round 1 it came in at round 20, or 70 beside a twin, of rounds of 0.4 s, and needed 150 of
    them. The twin of worker-1 asks once worker-1 beats."""
    tmp_path = tmp_path_factory.mktemp("join")
    env = swarm_env(tmp_path, NUM_WORKERS="2", MAX_ROUNDS="40", NUM_TRAIN_SAMPLES="2", NUM_TRANSPLANT_TREES="2",
                    CHECKPOINT_INTERVAL="50")
    exp = tmp_path / "drive" / "experiments" / "e2e"
    start_from_base(exp)
    up = subprocess.Popen([sys.executable, "-m", "swarm_supervisor", "up"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        with ThreadPoolExecutor(1) as other_machine:    # the same folder, as a mount
            # the second machine's own settings differ from the swarm's: TEST_MODE's 3 rounds (not 40), G=3 (not 4),
            # MAX_NEW_TOKENS=16 (not 32); it plays the swarm's rounds all the same
            own = {k: v for k, v in env.items() if k != "MAX_ROUNDS"}
            joining = other_machine.submit(join_from_another_machine, own, tmp_path / "other-machine",
                                           NUM_GENERATIONS="3", MAX_NEW_TOKENS="16")
            wait_for(lambda: (exp / "peers" / "worker-1.json").exists(), 120, "worker-1's heartbeat", up)
            twin = subprocess.run([sys.executable, "-m", "swarm_supervisor", "worker"],
                                  env={**env, "NUM_WORKERS": "1", "NODE_ID": "worker-1"}, capture_output=True,
                                  text=True, timeout=120)
            joiner = joining.result(timeout=300)
        output, _ = up.communicate(timeout=120)
    finally:
        up.kill()
    return TwoMachines(exp, subprocess.CompletedProcess(up.args, up.returncode, output, ""), joiner, twin)


def test_two_supervisors_share_one_folder_and_train_on_each_others_rollouts(two_machines):
    exp, up, joiner = two_machines.exp, two_machines.up, two_machines.joiner
    assert up.returncode == 0 and joiner.returncode == 0, up.stdout + joiner.stdout + joiner.stderr
    joined = metrics_rows(exp, "colab2")
    assert joined and joined[-1]["round"] == 40 and {r["completions"] for r in joined} == {2 * 4}
    assert ("rl-swarm: joining experiment 'e2e' with its settings (config.json): MAX_ROUNDS=40 (this machine's: 3), "
            "NUM_GENERATIONS=4 (this machine's: 3), MAX_NEW_TOKENS=32 (this machine's: 16)\n") in joiner.stdout
    # its dashboard counts the swarm's rounds, not its own TEST_MODE's 3
    assert "round 40/40" in joiner.stdout and "/3 |" not in joiner.stdout, joiner.stdout
    assert not (exp / "peers" / "coordinator.json").read_text().count("colab2")
    used_by_first = {r["round"]: r["external_available"] for r in metrics_rows(exp, "worker-1")}
    # once the joiner publishes, worker-1 sees 2 peers x I=2 groups instead of 1 x 2 (groups of G=3 it dropped)
    assert any(used_by_first[r["round"]] == 4 for r in joined if r["round"] in used_by_first)
    listed = json.loads((exp / "state" / "round_000040.json").read_text())["nodes"]
    assert "colab2" in listed
    # the joiner asks its own questions: the other machine's first worker is not a second worker-1
    folder = ExperimentFolder(exp)

    def asked(round_: int, node: str) -> set[tuple]:
        path = folder.rollout_file(round_, node)
        groups = json.loads(path.read_text())["groups"] if path.is_file() else []
        return {(g["task"], g["dataset_seed"], g["index"]) for g in groups}

    both = [r for r in range(1, 41) if asked(r, "colab2") and asked(r, "worker-1")]
    assert both and all(not asked(r, "colab2") & asked(r, "worker-1") for r in both)
    # each machine's supervisor appends to its own files only (two runtimes appending one file through Drive
    # would upload their copies over each other)
    logs = exp / "logs"
    assert "started 1 workers" in (logs / "supervisor-colab2" / "events.jsonl").read_text()
    assert "started 1 workers" not in (logs / "supervisor" / "events.jsonl").read_text()
    assert (logs / "supervisor-colab2" / "supervisor.log").stat().st_size > 0


def test_a_second_process_with_the_same_node_id_refuses_to_start(two_machines):
    twin = two_machines.twin
    assert twin.returncode == 2
    assert "node 'worker-1' is already running" in twin.stderr and "pick another NODE_ID" in twin.stderr


def files_of(exp: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(exp)): (p.stat().st_size, p.stat().st_mtime_ns) for p in exp.rglob("*") if p.is_file()}


def test_a_machine_that_joins_after_the_last_round_is_refused_and_changes_no_result(two_machines, tmp_path):
    """A late joiner replayed the finished swarm's last round and wrote its metrics and held-out evaluations into
    it: `experiments compare` then counted its nodes and its best accuracy. Its own MAX_ROUNDS (TEST_MODE's 3,
    not the swarm's 40) decides nothing: only the coordinator runs rounds, and it has ended."""
    exp = two_machines.exp
    before = files_of(exp)
    late = join_from_another_machine(swarm_env(exp.parents[2]), tmp_path / "late-machine", node="late")
    assert late.returncode == 2 and late.stdout == ""
    assert late.stderr.splitlines() == [
        "rl-swarm: error: experiment 'e2e' already finished its 40 rounds; its `rl-swarm up` continues it with a "
        "raised MAX_ROUNDS (join then), or set a new EXPERIMENT_NAME"]
    assert files_of(exp) == before
