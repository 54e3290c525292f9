"""The pace a user reads (s/round, ETA, rounds/h) after Ctrl-C and a resume: the hour the swarm was down is no
round time, and `rl-swarm status` and `rl-swarm experiments compare` say the same rounds/h of one folder."""

import re
import time

import pytest

from configs_env import SwarmConfig
from swarm_supervisor.cli import main
from swarm_supervisor.dashboard import status_line
from swarm_supervisor.experiments import summarize
from swarm_supervisor.status import SwarmReader
from tests.helpers import node_exchange, write_as
from workers.shared_folder import folder as folder_module
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.protocol import Heartbeat, RoundState, Status, SwarmFinished
from workers.shared_folder.signing import COORDINATOR

START_UP_S = 30.0      # a run's first round: the workers load the model and evaluate before they play it
DOWN_S = 3600.0        # Ctrl-C after round 39, `rl-swarm up` again an hour later


def play(folder: ExperimentFolder, rounds: range, first_at: float, every_s: float, max_rounds: int = 60) -> float:
    """One run of `rl-swarm up`, as its coordinator signs the round states: its first round takes START_UP_S, the
    others `every_s`; returns when its last round started."""
    started = first_at
    for round_ in rounds:
        write_as(folder, COORDINATOR, folder.round_state_file(round_),
                 RoundState(round_, max_rounds, started, "all workers done", run_first_round=rounds[0]).to_json())
        started += START_UP_S if round_ == rounds[0] else every_s
    return started - every_s


def coordinator_says(folder: ExperimentFolder, status: str, round_: int) -> None:
    now = time.time()
    node_exchange(folder, COORDINATOR).write_heartbeat(Heartbeat(
        node=COORDINATOR, role="coordinator", pid=1, host="h", instance="i", status=status, round=round_,
        started_at=now, updated_at=now))


def resumed_run(drive, second_run: range, second_every_s: float) -> ExperimentFolder:
    """Rounds 1..39 at 0.2 s, an hour down, then `second_run` at `second_every_s`, its last round started now."""
    folder = ExperimentFolder(drive / "experiments" / "e2e").create()
    write_as(folder, COORDINATOR, folder.config_file, {"schema": 2, "max_rounds": 60, "model_resolved": "m"})
    second_at = time.time() - START_UP_S - second_every_s * max(0, len(second_run) - 2) if second_run \
        else time.time()
    play(folder, range(1, 40), second_at - DOWN_S - START_UP_S - 0.2 * 37, 0.2)
    play(folder, second_run, second_at, second_every_s)
    return folder


def test_a_fresh_swarms_pace_leaves_out_its_first_round_which_holds_the_workers_start(tmp_path):
    """Round 1 took 30 s (models loaded, the round-0 evaluation), then rounds start every 10 s: at round 4, two
    rounds in the 20 s from round 2's start to round 4's is 360 rounds/h, and the 96 rounds left take 16 minutes,
    not the 27 a pace from round 1 (3 rounds in 50 s) would say."""
    folder = ExperimentFolder(tmp_path / "drive" / "experiments" / "e2e").create()
    play(folder, range(1, 5), time.time() - START_UP_S - 2 * 10, 10, max_rounds=100)
    coordinator_says(folder, Status.RUNNING, 4)
    view = SwarmReader(folder, SwarmConfig(cache_dir=tmp_path / "viewer", max_rounds=100), "m", "cpu").view()
    assert view.round == 4 and view.rounds_per_hour == pytest.approx(360)
    assert view.eta_s == pytest.approx(96 / 360 * 3600) and view.elapsed_s == pytest.approx(50, abs=2)


def test_after_a_resume_the_dashboard_shows_the_pace_of_rounds_not_the_hour_the_swarm_was_down(tmp_path):
    """Resumed at round 39 the dashboard said `1.2 s/round, ETA 24s` where the rounds took 0.2 s; from the
    resume on it shows the pace the rounds ran at: the last run's until the new one has timed three rounds
    (the new run's first round is its workers' start), then the new run's own (here 0.5 s a round)."""
    folder = resumed_run(tmp_path / "drive", range(0), 0.5)
    coordinator_says(folder, Status.RUNNING, 39)
    reader = SwarmReader(folder, SwarmConfig(cache_dir=tmp_path / "viewer", max_rounds=60), "m", "cpu")
    view = reader.view()
    assert view.phase == "running" and view.round == 39
    assert "0.2 s/round, ETA 4s" in status_line(view)                   # 21 rounds left at 0.2 s
    resumed_at = time.time() - START_UP_S - 0.5 * 4          # round 45 starts now
    for newest in range(40, 46):     # the new run's rounds arrive one by one
        play(folder, range(40, newest + 1), resumed_at, 0.5)
        coordinator_says(folder, Status.RUNNING, newest)
        view = reader.view()
        shown = float(re.search(r"([\d.]+) s/round", status_line(view)).group(1))
        assert shown == (0.5 if newest >= 44 else 0.2), newest
    assert view.eta_s == pytest.approx(15 * 0.5)


def test_status_and_compare_say_the_same_rounds_per_hour_of_a_finished_resumed_run(tmp_path, monkeypatch,
                                                                                     capsys):
    """`status` said 17752 rounds/h and `compare` 814 of one run. Both now say the pace while it ran: 37 rounds in
    7.4 s before the Ctrl-C and 19 in 9.5 s after the resume, the downtime and each run's start left out."""
    folder = resumed_run(tmp_path / "drive", range(40, 61), 0.5)
    write_as(folder, COORDINATOR, folder.finished_file, SwarmFinished(60, time.time()).to_json())
    coordinator_says(folder, Status.DONE, 60)
    ran_at = 56 / (7.4 + 9.5) * 3600                                  # 11929 rounds/h
    monkeypatch.setenv("GDRIVE_PATH", str(tmp_path / "drive"))
    monkeypatch.setenv("EXPERIMENT_NAME", "e2e")
    monkeypatch.setenv("RL_SWARM_CACHE", str(tmp_path / "viewer"))
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["status"]) == 0
    assert f"{ran_at:.0f} rounds/h" in capsys.readouterr().out
    assert main(["experiments", "compare", "e2e"]) == 0
    assert f" {ran_at:.0f} " in capsys.readouterr().out
    cfg = SwarmConfig(cache_dir=tmp_path / "viewer", max_rounds=60)
    assert SwarmReader(folder, cfg, "m", "cpu").view().rounds_per_hour == pytest.approx(ran_at) == \
        summarize(folder.root, cfg.cache_dir).rounds_per_hour


def test_a_resume_the_listing_of_a_long_run_leaves_out_is_still_no_round_time(tmp_path, monkeypatch):
    """A long run's state/ listing keeps its oldest and newest rounds only (here 4 and 4 of 60: a run of
    thousands of rounds, shrunk): the resume at round 40 lies between them, and is still left out."""
    monkeypatch.setattr(folder_module, "MAX_LISTED", 8)
    folder = resumed_run(tmp_path / "drive", range(40, 61), 0.5)
    assert folder.state_rounds() == [1, 2, 3, 4, 57, 58, 59, 60]
    coordinator_says(folder, Status.STOPPED, 60)
    cfg = SwarmConfig(cache_dir=tmp_path / "viewer", max_rounds=60)
    assert SwarmReader(folder, cfg, "m", "cpu").view().rounds_per_hour == pytest.approx(56 / (7.4 + 9.5) * 3600) \
        == summarize(folder.root, cfg.cache_dir).rounds_per_hour
