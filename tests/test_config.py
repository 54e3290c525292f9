"""Settings come from the environment; bad values stop the program with one line naming the variable."""

import re
from pathlib import Path

import pytest

from configs_env import SETTINGS, ConfigError, SwarmConfig


def test_defaults_are_the_seeds_five_node_swarm():
    cfg = SwarmConfig.from_env({})
    assert (cfg.num_workers, cfg.num_train_samples, cfg.num_transplant_trees, cfg.num_generations) == (4, 2, 2, 4)
    assert cfg.max_rounds == 2000
    assert cfg.experiment_dir == Path("swarm-drive") / "experiments" / "sapo-gpt2"
    assert cfg.model_name is None


def test_test_mode_is_the_quick_run_and_explicit_values_win():
    cfg = SwarmConfig.from_env({"TEST_MODE": "True"})
    assert (cfg.max_rounds, cfg.num_train_samples, cfg.num_generations) == (3, 4, 4)
    assert SwarmConfig.from_env({"TEST_MODE": "true", "MAX_ROUNDS": "6"}).max_rounds == 6
    # a preset gives the shape, the quick run keeps its short answers (the paper's 128 tokens leave the tiny
    # model's 512 positions too little room for the nine tasks' prompts)
    paper = SwarmConfig.from_env({"TEST_MODE": "true", "PRESET": "paper-2-6"})
    assert (paper.num_workers, paper.num_transplant_trees, paper.max_new_tokens) == (8, 6, 32)
    assert SwarmConfig.from_env({"PRESET": "paper-2-6"}).max_new_tokens == 128
    assert SwarmConfig.from_env({"TEST_MODE": "1", "PRESET": "paper-2-6", "MAX_NEW_TOKENS": "64"}).max_new_tokens == 64


@pytest.mark.parametrize("preset, split", [("sapo-4-0", (4, 0)), ("sapo-3-1", (3, 1)),
                                           ("sapo-2-2", (2, 2)), ("sapo-1-3", (1, 3))])
def test_sapo_presets_split_four_groups_between_local_and_external(preset, split):
    cfg = SwarmConfig.from_env({"PRESET": preset, "TEST_MODE": "1"})
    assert (cfg.num_train_samples, cfg.num_transplant_trees) == split
    assert cfg.max_rounds == 3


def test_explicit_value_wins_over_preset():
    assert SwarmConfig.from_env({"PRESET": "sapo-1-3", "NUM_TRAIN_SAMPLES": "2"}).num_train_samples == 2


@pytest.mark.parametrize("env, expected", [
    ({"NUM_GENERATIONS": "abc"}, "NUM_GENERATIONS='abc': expected an integer >= 2"),
    ({"NUM_TRAIN_SAMPLES": "-1"}, "NUM_TRAIN_SAMPLES='-1': expected an integer >= 0"),
    ({"NUM_WORKERS": "1"}, "NUM_TRANSPLANT_TREES=2 with NUM_WORKERS=1"),
    ({"ROLLOUT_PUBLISH_FREQUENCY": "hourly"}, "ROLLOUT_PUBLISH_FREQUENCY='hourly': expected one of generation"),
    ({"TEST_MODE": "maybe"}, "TEST_MODE='maybe': expected true or false"),
    ({"EXPERIMENT_NAME": "../../etc"}, "EXPERIMENT_NAME='../../etc'"),
    ({"NODE_ID": "a/b"}, "NODE_ID='a/b'"),
    ({"NODE_ID": "coordinator"}, "NODE_ID='coordinator': the shared folder uses that name"),
    ({"NODE_ID": "Supervisor-2"}, "NODE_ID='Supervisor-2': the shared folder uses that name"),
    ({"TASKS": "chain_sum:-1"}, "TASKS='chain_sum:-1'"),
    ({"COORDINATOR_ROUND_INTERVAL": "0"}, "COORDINATOR_ROUND_INTERVAL='0'"),
    ({"PRESET": "5/0"}, "PRESET='5/0': expected one of default"),
    ({"DEVICE": "tpu"}, "DEVICE='tpu'"),
    ({"NUM_TRANSPLANT_TREES": "7"}, "NUM_TRANSPLANT_TREES=7: the other 3 workers publish only 6"),
])
def test_bad_values_give_one_line_naming_variable_and_value(env, expected):
    with pytest.raises(ConfigError) as error:
        SwarmConfig.from_env(env)
    message = str(error.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_join_allows_external_rollouts_with_one_local_worker():
    cfg = SwarmConfig.from_env({"NUM_WORKERS": "1"}, role="join")
    assert cfg.num_transplant_trees == 2


def test_every_setting_has_help_and_a_unique_variable():
    names = [s.env for s in SETTINGS]
    assert len(names) == len(set(names))
    for required in ("GDRIVE_PATH", "EXPERIMENT_NAME", "NODE_ID", "MODEL_NAME", "SEED", "TEST_MODE", "MAX_ROUNDS",
                     "NUM_TRAIN_SAMPLES", "NUM_TRANSPLANT_TREES", "NUM_GENERATIONS", "COORDINATOR_ROUND_INTERVAL",
                     "ROLLOUT_PUBLISH_FREQUENCY", "ROLLOUT_CLEANUP_ENABLED", "ROLLOUT_KEEP_LAST_N_ROUNDS",
                     "ROLLOUT_ARCHIVE_OLD", "NUM_WORKERS", "DEVICE", "MAX_NEW_TOKENS", "TEMPERATURE",
                     "LEARNING_RATE"):
        assert required in names
    assert all(s.help for s in SETTINGS)


def test_config_is_frozen():
    cfg = SwarmConfig.from_env({})
    with pytest.raises(AttributeError):
        cfg.max_rounds = 1


def test_the_readme_table_is_the_generated_one():
    from pathlib import Path

    from swarm_supervisor.cli import settings_markdown

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert settings_markdown() in readme, "README is stale: paste the output of `rl-swarm config --markdown`"


def test_a_drive_lag_of_minutes_stretches_the_waits_not_set_explicitly():
    """A runtime joining through Drive (files minutes late): rounds wait for it instead of cutting it off."""
    cfg = SwarmConfig.from_env({"DRIVE_LAG": "180"})
    assert cfg.rollout_fetch_timeout >= 2 * 180
    assert cfg.coordinator_round_interval >= cfg.rollout_fetch_timeout + 3 * 180
    assert cfg.peer_timeout / 4 > 180                      # a heartbeat 3 minutes old is not yet "late"
    mine = SwarmConfig.from_env({"DRIVE_LAG": "180", "PEER_TIMEOUT": "90"})
    assert mine.peer_timeout == 90                         # set explicitly: it wins
    assert SwarmConfig.from_env({}).rollout_fetch_timeout == 60


def test_the_node_ids_refused_are_the_names_the_shared_folder_gives_to_other_things():
    from configs_env.config import RESERVED_NODE_IDS
    from workers.shared_folder.folder import SUPERVISOR
    from workers.shared_folder.signing import COORDINATOR

    assert set(RESERVED_NODE_IDS) == {COORDINATOR, SUPERVISOR}


BAD_VALUES = ("abc", "-5", "100000", "1e400", "nan", "0", "")


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.env)
def test_the_example_a_refused_value_suggests_is_one_worth_setting(setting):
    """MAX_NEW_TOKENS=100000 once suggested MAX_NEW_TOKENS=1: accepted, but no one wants it. An example is accepted;
    a number's is its default, unless the default turns the setting off (DRIVE_LAG=0) or leaves it to rl-swarm."""
    default = getattr(SwarmConfig(), setting.attr)
    numeric = type(default) in (int, float) or default is None
    for raw in BAD_VALUES:
        try:
            setting.parse(setting.env, raw)
        except ConfigError as error:
            for example in re.findall(rf"\(e\.g\. {setting.env}=(\S+)\)$", str(error)):
                cfg = SwarmConfig.from_env({setting.env: example})
                assert getattr(cfg, setting.attr) == default or not (numeric and default), (str(error), default)


@pytest.mark.parametrize("env", [{"NUM_TRAIN_SAMPLES": "0"}, {"NUM_TRANSPLANT_TREES": "7"},
                                 {"NUM_TRANSPLANT_TREES": "9", "NUM_TRAIN_SAMPLES": "1"}])
def test_too_few_groups_to_take_suggests_a_split_that_runs(env):
    """NUM_TRAIN_SAMPLES=0 once suggested NUM_TRANSPLANT_TREES <= 0, which the next check refuses."""
    with pytest.raises(ConfigError) as error:
        SwarmConfig.from_env(env)
    message = str(error.value)
    assert message.startswith(next(f"{name}={value}" for name, value in env.items())), message
    [enough] = re.findall(r"NUM_TRAIN_SAMPLES=(\d+) or more", message)
    assert SwarmConfig.from_env({**env, "NUM_TRAIN_SAMPLES": enough}).warnings() == []
    fewer = re.findall(r"NUM_TRANSPLANT_TREES <= (\d+)", message)
    assert len(fewer) == (env.get("NUM_TRAIN_SAMPLES") != "0")      # with I=0 no J but 0 runs, and 0 is refused
    for value in fewer:
        SwarmConfig.from_env({**env, "NUM_TRANSPLANT_TREES": value})


def test_rl_swarm_config_shows_the_variables_a_user_sets_and_what_an_unset_one_comes_to(monkeypatch, capsys):
    """`rl-swarm config` once printed `gdrive_path = ...` and `learning_rate = None`: neither is what a user sets."""
    from swarm_supervisor.cli import main

    monkeypatch.setenv("MAX_NEW_TOKENS", "64")
    monkeypatch.delenv("LEARNING_RATE", raising=False)
    monkeypatch.delenv("MODEL_NAME", raising=False)
    assert main(["config"]) == 0
    shown = dict(line.split(" = ", 1) for line in capsys.readouterr().out.splitlines() if " = " in line)
    assert set(shown) == {s.env for s in SETTINGS}
    assert shown["MAX_NEW_TOKENS"] == "64" and shown["TASKS"] == "chain_sum:1,basic_arithmetic:1"
    assert shown["LEARNING_RATE"] == "auto: 1e-6 for GPT-2 124M, 3e-5 for the tiny model"
    assert shown["MODEL_NAME"].startswith("auto: openai-community/gpt2")
    assert "None" not in shown.values()
