"""`rl-swarm up` run again on an experiment that already ran rounds, with other settings: a model its checkpoints
do not hold is refused before anything is written; the split and the other settings that shape the rounds may
change, and the console and config.json say which. (The same through the real CLI, a resume with another
LEARNING_RATE: test_e2e.py's stop-and-resume test.)"""

import time

import pytest

from configs_env import ConfigError
from swarm_supervisor import cli
from swarm_supervisor.resume import Resume, plan_resume
from tests.helpers import keyring, node_key, write_as
from tests.signed_folder import signed_experiment
from workers.shared_folder.protocol import RoundState, SwarmFinished
from workers.shared_folder.recorded_config import read_recorded_config, write_recorded_config

MODEL = "rl-swarm/tiny-gpt2"


def ran_two_rounds(tmp_path):
    """An experiment whose `up` (MAX_ROUNDS=2, the rest as signed_experiment's) ran its two rounds and finished."""
    cfg, folder = signed_experiment(tmp_path)
    cfg = cfg.with_overrides(max_rounds=2)
    write_recorded_config(folder, Resume().record(cfg, MODEL, "cpu"), node_key(folder, "coordinator"))
    for round_ in (1, 2):
        write_as(folder, "coordinator", folder.round_state_file(round_),
                 RoundState(round=round_, max_rounds=2, started_at=time.time(), reason="start").to_json())
    write_as(folder, "coordinator", folder.finished_file, SwarmFinished(rounds=2, finished_at=time.time()).to_json())
    return cfg, folder


def test_up_again_with_a_model_its_checkpoints_do_not_hold_is_refused_and_writes_nothing(tmp_path):
    cfg, folder = ran_two_rounds(tmp_path)
    before = {p: p.read_bytes() for p in folder.root.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as refused:
        cli._prepare_rounds(folder, cfg.with_overrides(max_rounds=4), keyring(folder), "openai-community/gpt2")
    assert str(refused.value) == (
        "MODEL_NAME unset (here: openai-community/gpt2): experiment 'e2e' ran 2 rounds of rl-swarm/tiny-gpt2, and "
        "its checkpoints hold that model; set MODEL_NAME=rl-swarm/tiny-gpt2 to resume it, or a new EXPERIMENT_NAME")
    # finished.json stays: the experiment still reads as finished, not as stopped half-way
    assert {p: p.read_bytes() for p in folder.root.rglob("*") if p.is_file()} == before


def test_up_again_with_another_split_says_what_changed_and_config_json_keeps_both(tmp_path):
    cfg, folder = ran_two_rounds(tmp_path)
    first = read_recorded_config(folder, keyring(folder))
    # G and NUM_WORKERS shape the rounds; the round interval and the checkpoint interval do not
    again = cfg.with_overrides(max_rounds=4, num_generations=8, num_workers=3, coordinator_round_interval=5.0,
                               checkpoint_interval=1)
    resume = cli._prepare_rounds(folder, again, keyring(folder), MODEL)
    assert resume.lines(again) == ["resuming experiment 'e2e' at round 2 of 4 (MAX_ROUNDS was 2)",
                                   "NUM_WORKERS changed from 4 to 3 (config.json records both)",
                                   "NUM_GENERATIONS changed from 4 to 8 (config.json records both)"]
    record = resume.record(again, MODEL, "cpu")
    assert (record["num_generations"], record["num_workers"], record["max_rounds"]) == (8, 3, 4)
    assert record["started_at"] == first["started_at"] < record["resumed_at"]
    assert [(c["round"], c["settings"]) for c in record["setting_changes"]] == \
        [(2, {"num_workers": [4, 3], "num_generations": [4, 8]})]
    # resumed again as it now is: nothing more to say, and the change stays on record
    write_recorded_config(folder, record, node_key(folder, "coordinator"))
    same = plan_resume(folder, keyring(folder), again, MODEL)
    assert same.lines(again) == ["resuming experiment 'e2e' at round 2 of 4"]
    assert same.record(again, MODEL, "cpu")["setting_changes"] == record["setting_changes"]
