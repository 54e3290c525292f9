"""Minutes of Drive lag: a runtime that joins through Drive sees every file of the others two minutes late, and
once it has caught up on the rounds it sees late, the swarm plays its rounds with it (DRIVE_LAG scales the waits,
so they are not cut short). Minutes long, so CI skips it:
`HF_HUB_OFFLINE=1 python -m pytest -m long tests/test_drive_lag.py` (6.5 minutes on 2 cores)."""

import json
import signal
import time

import pytest

from tests.helpers import Up, metrics_rows, swarm_env
from workers.shared_folder.folder import ExperimentFolder

pytestmark = [pytest.mark.slow, pytest.mark.long]

LAG_S = 120


def along(exp) -> list[int]:
    """The rounds in which worker-1 trained on the joiner's rollouts beside worker-2's."""
    rows = metrics_rows(exp, "worker-1") if (exp / "metrics" / "worker-1" / "metrics.jsonl").exists() else []
    return sorted(row["round"] for row in rows if row["external_available"] == 4)


def played_by_joiner(exp) -> list[int]:
    return sorted(row["round"] for row in metrics_rows(exp, "colab2")) \
        if (exp / "metrics" / "colab2" / "metrics.jsonl").exists() else []


def test_a_runtime_that_sees_the_folder_two_minutes_late_plays_its_rounds_with_the_swarm(tmp_path, start_from_base):
    env = swarm_env(tmp_path, NUM_WORKERS="2", MAX_ROUNDS="1000", NUM_TRAIN_SAMPLES="2", NUM_TRANSPLANT_TREES="2",
                    DRIVE_LAG=str(LAG_S))
    exp = tmp_path / "drive" / "experiments" / "e2e"
    start_from_base(exp)
    (tmp_path / "other-runtime").mkdir()
    up = Up(env, tmp_path / "up.out")
    joiner = None
    try:
        deadline = time.monotonic() + 180
        while not (exp / "state" / "round_000001.json").exists():
            assert up.poll() is None and time.monotonic() < deadline, up.output()
            time.sleep(0.5)
        # the other runtime: every file the first one writes shows up there LAG_S late (its simulated Drive), and
        # its own temp folder, so no doorbell of this host reaches it
        joiner = Up({**env, "NODE_ID": "colab2", "NUM_WORKERS": "1", "TMPDIR": str(tmp_path / "other-runtime"),
                     "DRIVE_SIM_LAG": str(LAG_S)}, tmp_path / "joiner.out", command="worker")
        started = time.monotonic()
        deadline = started + 900
        # first it plays the rounds it sees two minutes late, already over; then it plays along: the first
        # machine's workers wait for its rollouts and train on them (worker-1: 2 peers' groups, not 1 peer's)
        while len(along(exp)) < 2:
            assert up.poll() is None and joiner.poll() is None, up.output() + joiner.output()
            assert time.monotonic() < deadline, f"the joiner played rounds {played_by_joiner(exp)}"
            time.sleep(1)
        print(f"{time.monotonic() - started:.0f}s from the join to its second round played along")
        for process in (up, joiner):
            process.send_signal(signal.SIGINT)
        outputs = up.wait(timeout=120) + joiner.wait(timeout=120)
    finally:
        for process in (up, joiner):
            if process is not None:
                process.kill()
    assert up.returncode == joiner.returncode == 130, outputs       # stopped as asked, resumable
    first, second = along(exp)[:2]
    assert second == first + 1, along(exp)         # once along, every round with it, none cut off without it
    starts = {r: json.loads((exp / "state" / f"round_{r:06d}.json").read_text())["started_at"] for r in (first, second)}
    print(f"round {first} took {starts[second] - starts[first]:.0f}s with a runtime {LAG_S}s behind")
    assert starts[second] - starts[first] >= LAG_S        # the round waited for it: it was not cut short
    assert (exp / "logs" / "supervisor-colab2" / "events.jsonl").exists()    # its own files, not the first's
    events = [json.loads(line)["event"] for line in ExperimentFolder(exp).events_file.read_text().splitlines()]
    assert not any("colab2 is gone" in event for event in events), events
