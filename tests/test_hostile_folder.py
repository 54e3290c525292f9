"""A peer cannot run code in, poison, crash or hang the swarm through the shared folder (issue 17).

Each test plants what a careless or hostile peer could leave in the folder, and shows that every reader skips
it with one warning naming it and goes on with the good records, and that no write goes through a planted link.
"""

import io

import pytest
from rich.console import Console

from configs_env import SwarmConfig
from configs_env.parsing import SAFE_NAME
from workers.shared_folder.exchange import ROLLOUT_NAME
from workers.shared_folder.folder import (ExperimentFolder, RejectedFile, check_node_name, read_jsonl,
                                          write_json_atomic)
from workers.shared_folder.protocol import RoundState


@pytest.fixture
def swarm(tmp_path):
    cfg = SwarmConfig.from_env({"GDRIVE_PATH": str(tmp_path / "drive"), "MAX_ROUNDS": "2"})
    folder = ExperimentFolder(cfg.experiment_dir).create()
    return cfg, folder, tmp_path / "outside.json"


# -- names are matched whole -------------------------------------------------------------------------

def test_names_with_a_trailing_newline_or_unicode_digits_never_become_nodes_or_rounds(swarm):
    _, folder, _ = swarm
    with pytest.raises(RejectedFile):
        check_node_name("worker-1\n")
    assert ROLLOUT_NAME.fullmatch("worker-1.json\n") is None
    assert ROLLOUT_NAME.fullmatch("worker-1.part\u0663.json") is None      # an Arabic-Indic 3: \d would take it
    assert SAFE_NAME.fullmatch("run-1\n") is None
    for name in ("round_000001.json\n", "round_\u00b2.json", "round_\u0663.json"):
        (folder.root / "state" / name).write_text("{}")
    write_json_atomic(folder.round_state_file(2), RoundState(round=2, max_rounds=2, started_at=0.0,
                                                             reason="start").to_json())
    assert folder.state_rounds() == [2]


# -- a coordinator that dies stops the swarm in one line ---------------------------------------------

def run_supervisor(cfg: SwarmConfig):
    from swarm_supervisor.dashboard import Dashboard
    from swarm_supervisor.supervisor import Supervisor

    supervisor = Supervisor(cfg, [], run_coordinator=True, model_label="m", device_label="cpu",
                            dashboard=Dashboard(Console(file=io.StringIO(), force_terminal=False)))
    return supervisor, supervisor.run()


def test_a_coordinator_that_raises_stops_the_supervisor_with_exit_1_and_the_reason_in_one_line(swarm, monkeypatch):
    from swarm_supervisor.cli import summary
    from swarm_supervisor.coordinator import Coordinator

    cfg, folder, _ = swarm
    def broken(self, round_, reason):
        raise RuntimeError("state folder on fire\n  a second line the user need not see")
    monkeypatch.setattr(Coordinator, "_start_round", broken)
    supervisor, code = run_supervisor(cfg)
    reason = "coordinator failed: RuntimeError: state folder on fire"
    assert code == 1 and supervisor.failure == reason
    assert summary(supervisor, 1.0, code).splitlines()[0].startswith(f"rl-swarm: FAILED ({reason}): ")
    assert reason in [row["event"] for row in read_jsonl(folder.events_file)]


def test_a_coordinator_thread_that_ends_silently_does_not_leave_the_supervisor_waiting(swarm, monkeypatch):
    from swarm_supervisor.coordinator import Coordinator

    cfg, _, _ = swarm
    monkeypatch.setattr(Coordinator, "run", lambda self: None)
    supervisor, code = run_supervisor(cfg)
    assert code == 1 and supervisor.failure == "coordinator failed: it stopped without saying why"
