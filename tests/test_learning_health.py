"""The learning-health guard: a worker that unlearns is named, marked, and leaves its best model behind."""

import json
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from swarm_supervisor.dashboard import render
from swarm_supervisor.learning_health import NO_SIGNAL_ROUNDS, REWARD_WINDOW, RewardWatch
from swarm_supervisor.status import SwarmReader
from tests.helpers import append_as, console_text, metrics_row, swarm_env
from workers.shared_folder.held_out import eval_file, held_out_trend
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.protocol import Heartbeat, HeldOutEval
from tests.helpers import node_exchange, viewer


def evals(*accuracies: float, every: int = 50) -> list[HeldOutEval]:
    return [HeldOutEval(node="w", round=i * every, accuracy=a, questions=100, seconds=1.0)
            for i, a in enumerate(accuracies)]


def test_held_out_is_falling_only_after_two_evaluations_well_below_the_best():
    assert not held_out_trend(evals(0.84, 0.60)).falling                 # one bad evaluation can be noise
    assert not held_out_trend(evals(0.84, 0.90, 0.85, 0.81)).falling     # within 10 points of the best
    assert not held_out_trend(evals(0.84, 0.60, 0.90)).falling           # recovered
    trend = held_out_trend(evals(0.70, 0.95, 0.80, 0.84))
    assert trend.falling and trend.best == 0.95 and trend.best_round == 50 and trend.newest == 0.84
    assert trend.start == 0.70 and "down from its best 95% at round 50" in trend.warning("worker-3")


def test_a_collapsed_reward_is_told_from_a_low_one():
    never_learned = RewardWatch()
    for _ in range(3 * REWARD_WINDOW):
        never_learned.add(0.05)
    assert not never_learned.collapsed()
    collapsed = RewardWatch()
    for reward in [0.8] * REWARD_WINDOW + [0.1] * REWARD_WINDOW:
        collapsed.add(reward)
    assert collapsed.collapsed() and "reward collapsed to 0.100" in collapsed.warning("worker-1")


def test_a_reward_hovering_at_the_collapse_line_warns_once_until_it_truly_recovers():
    """Seen on the GPU: a 20-round mean crossing half its best back and forth raised the same warning every
    few rounds. Once collapsed, a worker stays marked until its mean is back near its best."""
    watch = RewardWatch()
    for reward in [0.9] * REWARD_WINDOW + [0.4] * REWARD_WINDOW:
        watch.add(reward)
    assert watch.collapsed()
    marks = []
    for reward in ([0.5] * 5 + [0.4] * 5) * 4:      # a mean from 0.425 to 0.475: across the line at 0.45
        watch.add(reward)
        marks.append(watch.collapsed())
    assert all(marks)
    for reward in [0.85] * REWARD_WINDOW:
        watch.add(reward)
    assert not watch.collapsed()


def test_the_table_shows_start_newest_best_and_marks_a_falling_worker(tmp_path):
    folder = ExperimentFolder(tmp_path / "exp").create()
    now = time.time()
    node_exchange(folder, "worker-1").write_heartbeat(Heartbeat(node="worker-1", role="worker", pid=1, host="h",
                                                           instance="i", status="training", round=150,
                                                           started_at=now, updated_at=now))
    for row in evals(0.70, 0.95, 0.80, 0.82):
        append_as(folder, "worker-1", eval_file(folder, "worker-1"), {**row.to_json(), "node": "worker-1"})
    view = SwarmReader(folder, viewer(folder), "tiny", "cpu").view()
    text = console_text(render(view), width=200)
    assert "70→82% (best 95) ↓" in text and "held-out falling: 82%, best 95%" in text


@pytest.mark.slow
def test_a_swarm_forced_to_collapse_warns_and_keeps_each_workers_best_model(tmp_path, start_from_base):
    """A learning rate of 1e-2 wrecks the tiny model in two rounds: held-out accuracy falls from the warm-up's."""
    env = swarm_env(tmp_path, NUM_WORKERS="2", MAX_ROUNDS="4", EVAL_EVERY="2", LEARNING_RATE="0.01")
    start_from_base(tmp_path / "drive" / "experiments" / "e2e")
    result = subprocess.run([sys.executable, "-m", "swarm_supervisor", "up"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    exp = tmp_path / "drive" / "experiments" / "e2e"
    events = [json.loads(line) for line in (exp / "logs" / "supervisor" / "events.jsonl").read_text().splitlines()]
    base = load_file(exp / "base" / "model.safetensors")
    for node in ("worker-1", "worker-2"):
        rows = [json.loads(line) for line in (exp / "metrics" / node / "eval.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 2, 4] and rows[0]["accuracy"] > rows[-1]["accuracy"] + 0.1
        warnings = [e["event"] for e in events if e.get("level") == "warning" and e["event"].startswith(node)]
        assert len(warnings) == 1 and f"best {rows[0]['accuracy']:.0%} at round 0" in warnings[0]
        best = exp / "checkpoints" / node / "best"
        meta = json.loads((best / "meta.json").read_text())
        assert meta["round"] == 0 and meta["held_out_accuracy"] == max(r["accuracy"] for r in rows)
        kept = load_file(best / "model.safetensors")      # round 0's model is the warm-up's base, bit for bit
        assert kept.keys() == base.keys() and all((kept[k] == base[k]).all() for k in base)
    status = subprocess.run([sys.executable, "-m", "swarm_supervisor", "status"], env={**env, "COLUMNS": "200"},
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stdout.count("held-out falling") == 2, status.stdout
    compare = subprocess.run([sys.executable, "-m", "swarm_supervisor", "experiments", "compare", "--csv"], env=env,
                             capture_output=True, text=True, timeout=120)
    header, row = compare.stdout.splitlines()[:2]
    bests = [max(json.loads(line)["accuracy"] for line in (exp / "metrics" / node / "eval.jsonl").read_text().split())
             for node in ("worker-1", "worker-2")]
    assert float(dict(zip(header.split(","), row.split(",")))["held_out_best"]) == pytest.approx(sum(bests) / 2)


def test_rounds_with_nothing_to_learn_from_are_named_with_the_fix(tmp_path):
    """Seen on the GPU: a swarm whose model never wrote the answer format earned reward 0 in every group for 49
    rounds (no group with a reward spread, so no update) and nothing said so."""
    watch = RewardWatch()
    for _ in range(NO_SIGNAL_ROUNDS - 1):
        watch.add(0.0, groups_with_signal=0)
    assert not watch.no_signal() and watch.warning("worker-1") is None
    watch.add(0.0, groups_with_signal=0)
    warning = watch.warning("worker-1")
    assert warning.startswith(f"worker-1: nothing to learn from for {NO_SIGNAL_ROUNDS} rounds")
    assert "WARMUP_STEPS" in warning
    watch.add(0.1, groups_with_signal=1)       # one group with a spread: the weights move again
    assert not watch.no_signal() and watch.warning("worker-1") is None

    folder = ExperimentFolder(tmp_path / "exp").create()
    now = time.time()
    for node in ("worker-1", "worker-2"):
        node_exchange(folder, node).write_heartbeat(Heartbeat(node=node, role="worker", pid=1, host="h", instance="i",
                                                              status="training", round=NO_SIGNAL_ROUNDS,
                                                              started_at=now, updated_at=now))
    for round_ in range(1, NO_SIGNAL_ROUNDS + 1):      # every local group without a spread, no peer group used
        append_as(folder, "worker-1", folder.metrics_file("worker-1"), {**metrics_row("worker-1", round_, reward=0.0),
                                                        "zero_advantage_groups": 2})
        append_as(folder, "worker-2", folder.metrics_file("worker-2"), metrics_row("worker-2", round_, reward=0.1))
    rows = {row.node_id: row for row in SwarmReader(folder, viewer(folder), "tiny", "cpu").view().nodes}
    assert rows["worker-1"].learning_alarm == "no reward signal" and "nothing to learn from" in \
        rows["worker-1"].learning_warning
    assert rows["worker-2"].learning_alarm is None      # a low reward, but groups with a spread: it learns
