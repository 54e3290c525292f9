"""`rl-swarm up` run again on an experiment that already ran rounds, with other settings: a model its checkpoints
do not hold is refused before anything is written; the split and the other settings that shape the rounds may
change, and the console and config.json say which. (The same through the real CLI, a resume with another
LEARNING_RATE: test_e2e.py's stop-and-resume test.) A machine that joins takes those settings from config.json,
each through its setting's own parser (through the real CLI: test_join.py)."""

import time

import pytest

from configs_env import ConfigError, SwarmError
from swarm_supervisor import cli
from swarm_supervisor import join
from swarm_supervisor.join import RUNNING_SETTINGS, JoinWait, SettingsWatch
from swarm_supervisor.resume import Resume, joined_settings, plan_resume
from tests.helpers import coordinators_up, entries_of, keyring, node_key, write_as
from tests.signed_folder import signed_experiment
from workers.shared_folder.protocol import RoundState, SwarmFinished
from workers.shared_folder.recorded_config import COORDINATOR_INSTANCE, read_recorded_config, write_recorded_config

MODEL = "rl-swarm/tiny-gpt2"


def ran_two_rounds(tmp_path):
    """An experiment whose `up` (MAX_ROUNDS=2, the rest as signed_experiment's) ran its two rounds and finished."""
    cfg, folder = signed_experiment(tmp_path)
    cfg = cfg.with_overrides(max_rounds=2)
    write_recorded_config(folder, Resume().record(cfg, MODEL, "cpu", "i"), node_key(folder, "coordinator"))
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


def test_up_again_with_a_max_rounds_below_the_round_a_stopped_run_reached_is_refused_and_writes_nothing(tmp_path):
    """It resumed at 'round 2 of 1', replayed round 2, called the experiment finished and left config.json saying
    MAX_ROUNDS=1 beside round states saying 2."""
    cfg, folder = ran_two_rounds(tmp_path)
    folder.finished_file.unlink()           # stopped in round 2, not finished
    before = {p: p.read_bytes() for p in folder.root.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as refused:
        cli._prepare_rounds(folder, cfg.with_overrides(max_rounds=1), keyring(folder), MODEL)
    assert str(refused.value) == ("MAX_ROUNDS=1: experiment 'e2e' already started round 2 (of 2); set MAX_ROUNDS=2 "
                                  "(or anything from 2) to resume it, or a new EXPERIMENT_NAME")
    assert {p: p.read_bytes() for p in folder.root.rglob("*") if p.is_file()} == before
    assert cli._prepare_rounds(folder, cfg, keyring(folder), MODEL).round == 2      # its own MAX_ROUNDS resumes it


def test_rl_swarm_up_with_a_max_rounds_below_the_reached_round_says_so_before_it_writes_anything(
        tmp_path, monkeypatch, capsys):
    """Through the command: the refusal came under the claim, after the folder's write check, the lease and the
    coordinator key's line had touched the folder."""
    from swarm_supervisor.claim import coordinator_key
    from workers.shared_folder.json_records import write_json_atomic
    from workers.shared_folder.signing import KeyRing

    cfg, folder = signed_experiment(tmp_path)
    key, _ = coordinator_key(cfg, folder)          # this machine's: the `up` that ran the rounds was here
    KeyRing(folder).publish(key)
    for round_ in (1, 2):                           # stopped in round 2 of 3
        write_json_atomic(folder.round_state_file(round_), key.sign(
            RoundState(round=round_, max_rounds=3, started_at=time.time(), reason="start").to_json()))
    before = entries_of(folder.root)
    for name, value in {"GDRIVE_PATH": str(cfg.gdrive_path), "EXPERIMENT_NAME": cfg.experiment_name,
                        "RL_SWARM_CACHE": str(cfg.cache_dir), "MAX_ROUNDS": "1", "TEST_MODE": "True"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SWARM_URL", raising=False)
    assert cli.main(["up"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("rl-swarm: error: MAX_ROUNDS=1: experiment 'e2e' already started round 2 (of 3); set "
                                 "MAX_ROUNDS=3 (or anything from 2) to resume it, or a new EXPERIMENT_NAME\n")
    assert entries_of(folder.root) == before


def test_an_experiment_resumed_with_changes_time_and_again_keeps_its_config_json_readable(tmp_path):
    cfg, folder = ran_two_rounds(tmp_path)
    every_task = tuple((f"task_{i:03d}_with_a_long_reasoning_gym_name", 1.0) for i in range(106))
    history = [{"round": 2, "at": float(i), "settings": {"tasks": [every_task, every_task[::-1]]}} for i in range(80)]
    resume = Resume(round=2, recorded={"started_at": 1.0, "setting_changes": history},
                    changes={"num_generations": (4, 8)})
    write_recorded_config(folder, resume.record(cfg, MODEL, "cpu", "i"), node_key(folder, "coordinator"))
    kept = read_recorded_config(folder, keyring(folder))          # within its read limit, so still read
    assert kept["started_at"] == 1.0 and kept["setting_changes"][-1]["settings"] == {"num_generations": [4, 8]}
    assert 1 < len(kept["setting_changes"]) < 81 and kept["setting_changes"][0]["at"] > 0.0    # the oldest went


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
    record = resume.record(again, MODEL, "cpu", "i")
    assert (record["num_generations"], record["num_workers"], record["max_rounds"]) == (8, 3, 4)
    assert record["started_at"] == first["started_at"] < record["resumed_at"]
    assert [(c["round"], c["settings"]) for c in record["setting_changes"]] == \
        [(2, {"num_workers": [4, 3], "num_generations": [4, 8]})]
    # resumed again as it now is: nothing more to say, and the change stays on record
    write_recorded_config(folder, record, node_key(folder, "coordinator"))
    same = plan_resume(folder, keyring(folder), again, MODEL)
    assert same.lines(again) == ["resuming experiment 'e2e' at round 2 of 4"]
    assert same.record(again, MODEL, "cpu", "i")["setting_changes"] == record["setting_changes"]


# -- a machine that joins ----------------------------------------------------------------------------

def test_a_joining_machine_plays_with_the_experiments_settings_and_says_which_it_took(tmp_path):
    """A joiner of G=4 in a G=8 swarm published groups every peer dropped (RaggedGroup), and one whose
    MAX_NEW_TOKENS exceeded theirs, completions they cut: it now takes what shapes the rounds from config.json."""
    cfg, folder = signed_experiment(tmp_path)
    swarm = cfg.with_overrides(max_rounds=40, num_generations=8, tasks=(("chain_sum", 1.0),), max_new_tokens=64)
    write_recorded_config(folder, Resume().record(swarm, MODEL, "cuda:0", "i"), node_key(folder, "coordinator"))
    mine = cfg.with_overrides(num_workers=1, learning_rate=1e-4, checkpoint_interval=7)
    joined, lines = joined_settings(folder, keyring(folder), mine)
    assert lines == ["joining experiment 'e2e' with its settings (config.json): MAX_ROUNDS=40 (this machine's: 3), "
                     "NUM_GENERATIONS=8 (this machine's: 4), TASKS=chain_sum:1 (this machine's: "
                     "chain_sum:1,basic_arithmetic:1), MAX_NEW_TOKENS=64 (this machine's: 256), LEARNING_RATE=unset "
                     "(this machine's: 0.0001)"]
    # what does not shape the rounds, and its own number of workers, stay this machine's
    assert joined == swarm.with_overrides(num_workers=1, checkpoint_interval=7)


def test_a_joining_machine_takes_no_value_of_config_json_that_its_setting_would_refuse_from_the_environment(tmp_path):
    """config.json lies in a folder peers write: a value no environment variable could hold is not taken (one line
    each, bounded, escaped), nor a set of values that breaks a rule between settings, nor an unsigned file."""
    cfg, folder = signed_experiment(tmp_path)
    coordinator = node_key(folder, "coordinator")
    record = Resume().record(cfg.with_overrides(num_generations=8), MODEL, "cpu", "i")
    write_recorded_config(folder, {**record, "max_new_tokens": 10**6, "seed": "\x1b[2J", "tasks": "x" * 100_000,
                                   "max_rounds": True}, coordinator)
    joined, lines = joined_settings(folder, keyring(folder), cfg)
    assert joined == cfg.with_overrides(num_generations=8)
    assert lines[:2] == [
        "config.json of experiment 'e2e': SEED='\\x1b[2J': expected an integer >= 0 (e.g. SEED=42); this machine keeps "
        "SEED=42",
        "config.json of experiment 'e2e': MAX_ROUNDS='True': expected an integer >= 1 (e.g. MAX_ROUNDS=2000); this "
        "machine keeps MAX_ROUNDS=3"]
    assert lines[2].startswith("config.json of experiment 'e2e': TASKS='xxx") and len(lines[2]) == 200
    assert lines[3].startswith("config.json of experiment 'e2e': MAX_NEW_TOKENS='1000000': expected an integer >= 1 "
                               "and <= 4096")
    assert len(lines) == 5 and lines[4].startswith("joining experiment 'e2e' with its settings (config.json): "
                                                   "NUM_GENERATIONS=8")

    write_recorded_config(folder, {**record, "num_train_samples": 0, "num_transplant_trees": 0}, coordinator)
    joined, lines = joined_settings(folder, keyring(folder), cfg)
    assert joined == cfg and lines == [
        "config.json of experiment 'e2e': NUM_TRAIN_SAMPLES=0 and NUM_TRANSPLANT_TREES=0: a round needs at least one "
        "group to train on (e.g. NUM_TRAIN_SAMPLES=2); this machine plays with its own settings"]

    write_as(folder, "worker-1", folder.config_file, record)        # a peer's config.json
    joined, lines = joined_settings(folder, keyring(folder), cfg)
    assert joined == cfg and lines == [
        "experiment 'e2e' has no config.json its coordinator signed: this machine plays its rounds with its own "
        "settings (check that G, TASKS and MAX_NEW_TOKENS match the swarm's)"]


def test_a_machine_that_joins_before_a_resumed_up_plays_with_the_resumed_settings_not_the_stopped_runs(tmp_path,
                                                                                                  monkeypatch, capsys):
    """A joiner started before the resumed `up` took the settings the stopped run had left in config.json (G=4,
    MAX_ROUNDS=3) and played with them beside a swarm of G=8: every peer dropped its groups. It now waits for the
    settings the `up` that runs signed, as for missing ones."""
    cfg, folder = signed_experiment(tmp_path)
    coordinator = node_key(folder, "coordinator")
    with coordinators_up(folder, cfg).held() as stopped:       # the run before: two rounds, then stopped
        write_recorded_config(folder, Resume().record(cfg, MODEL, "cpu", stopped.lease.instance), coordinator)
        for round_ in (1, 2):
            write_as(folder, "coordinator", folder.round_state_file(round_),
                     RoundState(round=round_, max_rounds=3, started_at=time.time(), reason="start").to_json())
    joiner = cfg.with_overrides(peer_timeout=1.0, num_generations=3)
    monkeypatch.setattr(join, "JOIN_POLL_S", 0.05)
    monkeypatch.setattr(join, "COORDINATOR_PATIENCE", 1)
    wait = JoinWait(joiner, folder)
    assert wait.waiting == RUNNING_SETTINGS
    assert capsys.readouterr().out == (
        f"rl-swarm: waiting up to 1s for the settings of the experiment's running coordinator: {folder.config_file} "
        "holds those of a run that has ended (a resume may change them); its `rl-swarm up` writes its own as it "
        "starts, after its warm-up\n")
    with pytest.raises(SwarmError, match="^gave up after 1s waiting for the settings of the experiment's running "
                                         "coordinator"):
        wait.until_ready()
    resumed = cfg.with_overrides(num_generations=8, max_rounds=40)
    with coordinators_up(folder, resumed).held() as up:      # the resumed `up`, still in its warm-up
        assert wait.look() == RUNNING_SETTINGS
        resume = plan_resume(folder, keyring(folder), resumed, MODEL)
        write_recorded_config(folder, resume.record(resumed, MODEL, "cpu", up.lease.instance), coordinator)
        joined, _ = joined_settings(folder, wait.until_ready(), joiner)
        # a coordinator of a version that did not name its `up` in config.json: its settings are taken, not waited
        # past to the end of the bound
        record = resume.record(resumed, MODEL, "cpu", up.lease.instance)
        write_recorded_config(folder, {k: v for k, v in record.items() if k != COORDINATOR_INSTANCE}, coordinator)
        assert wait.look() is None
    assert (joined.num_generations, joined.max_rounds) == (8, 40)


def test_a_joiner_follows_its_coordinator_restarted_with_another_g_and_nothing_else(tmp_path, monkeypatch):
    """A joiner's workers kept the G=4 they started with after its coordinator restarted with G=8: every peer
    rejected their groups, and they rejected the peers'. Its watch now hands the supervisor the restarted `up`'s
    settings, once; the same settings, a peer's config.json, or one an `up` that ended signed, change nothing."""
    monkeypatch.setattr(join, "SETTINGS_CHECK_S", 0.0)
    cfg, folder = signed_experiment(tmp_path)
    coordinator = node_key(folder, "coordinator")
    own = cfg.with_overrides(num_workers=1, checkpoint_interval=7)
    with coordinators_up(folder, cfg).held() as first:
        write_recorded_config(folder, Resume().record(cfg, MODEL, "cpu", first.lease.instance), coordinator)
        first_lease = folder.coordinator_lease_file.read_bytes()
        watch = SettingsWatch(own, folder, keyring(folder))
        playing, _ = joined_settings(folder, keyring(folder), own)
        assert watch.look(playing) is None
    resumed = cfg.with_overrides(num_generations=8, max_rounds=40)
    with coordinators_up(folder, resumed).held() as up:
        record = Resume().record(resumed, MODEL, "cpu", up.lease.instance)
        write_as(folder, "worker-1", folder.config_file, {**record, "max_new_tokens": 8})    # a peer's: ignored
        assert watch.look(playing) is None
        write_recorded_config(folder, record, coordinator)
        change = watch.look(playing)
        assert change.lines == ("the coordinator restarted with other settings (NUM_GENERATIONS 4 -> 8): this "
                                "machine's workers restart with them",)
        assert change.cfg == playing.with_overrides(num_generations=8, max_rounds=40)
        assert watch.look(change.cfg) is None                       # said once
        playing = change.cfg
    with coordinators_up(folder, resumed).held() as again:          # restarted once more, with the same settings
        write_recorded_config(folder, Resume().record(resumed, MODEL, "cpu", again.lease.instance), coordinator)
        assert watch.look(playing) is None
    # config.json of the first `up`, put back by a peer while none runs: not followed
    write_recorded_config(folder, Resume().record(cfg, MODEL, "cpu", first.lease.instance), coordinator)
    assert watch.look(playing) is None
    # ... nor with its lease put back too (genuine, and its process alive here): the watch only goes forward
    folder.coordinator_lease_file.write_bytes(first_lease)
    assert watch.look(playing) is None
    folder.coordinator_lease_file.unlink()          # (its process here is alive: the next `up` would be refused)
    # a value this machine's parser refuses: it keeps its own, and says so once
    with coordinators_up(folder, resumed).held() as last:
        record = Resume().record(resumed.with_overrides(max_new_tokens=64), MODEL, "cpu", last.lease.instance)
        write_recorded_config(folder, {**record, "seed": "\x1b[2J"}, coordinator)
        change = watch.look(playing)
        assert change.lines == (
            "config.json of experiment 'e2e': SEED='\\x1b[2J': expected an integer >= 0 (e.g. SEED=42); this machine "
            "keeps SEED=42",
            "the coordinator restarted with other settings (MAX_NEW_TOKENS 256 -> 64): this machine's workers restart "
            "with them")
        assert change.cfg == playing.with_overrides(max_new_tokens=64) and watch.look(change.cfg) is None


def test_a_joiners_worker_restarts_with_its_coordinators_new_settings_and_spends_no_restart(tmp_path, monkeypatch):
    """The supervisor asks the worker to stop as on Ctrl-C (it checkpoints) and starts it again at once with the
    new settings: neither a crash (with MAX_RESTARTS=1 and one crash behind it, a counted one would fail it) nor
    finished."""
    import multiprocessing as mp
    import os

    from swarm_supervisor.dashboard import Dashboard
    from swarm_supervisor.join import SettingsChange
    from swarm_supervisor.supervisor import Supervisor
    from workers.processes import WorkerSpec

    cfg, folder = signed_experiment(tmp_path)
    cfg = cfg.with_overrides(max_restarts=1)
    spec = WorkerSpec(cfg=cfg, node="colab-1", index=10_001, model_name="m", device="cpu", parent_pid=os.getpid())
    line = "the coordinator restarted with other settings (NUM_GENERATIONS 4 -> 8): this machine's workers restart"
    changes = [SettingsChange((line,), cfg.with_overrides(num_generations=8))]
    supervisor = Supervisor(cfg, [spec], run_coordinator=False, model_label="m", device_label="cpu",
                            dashboard=Dashboard(line_interval_s=3600), joined_as="colab",
                            settings_changed=lambda playing: changes.pop() if changes else None)
    spawned = []
    monkeypatch.setattr(supervisor, "_spawn", lambda h: (spawned.append(h.spec), setattr(h, "restart_at", None)))
    [worker] = supervisor.handles
    worker.process = mp.get_context("spawn").Process(target=time.sleep, args=(600,))    # a worker waiting for a round
    try:
        worker.process.start()
        worker.restarts.append(time.monotonic())
        worker.total_restarts = 1
        supervisor._follow_settings()
        worker.process.join(timeout=30)
        supervisor._reap()
    finally:
        if worker.process.is_alive():
            worker.process.kill()
        supervisor.monitor.close()
    assert [s.cfg.num_generations for s in spawned] == [8] and spawned[0].node == "colab-1"
    assert not worker.failed and not worker.exited_ok and (worker.total_restarts, len(worker.restarts)) == (1, 1)
    assert supervisor.cfg.num_generations == supervisor.reader.cfg.num_generations == 8
    assert line in folder.events_file_of("colab").read_text()


def test_a_worker_that_crashes_on_its_way_to_a_settings_restart_is_a_crash(tmp_path, monkeypatch):
    """A worker asked to restart with new settings that exits with an error (a failed checkpoint write, out of
    memory) is restarted as a crash, counted, said, and failed past MAX_RESTARTS: not started again unseen."""
    import multiprocessing as mp
    import os
    import sys

    from swarm_supervisor.dashboard import Dashboard
    from swarm_supervisor.supervisor import Supervisor
    from workers.processes import WorkerSpec

    cfg, folder = signed_experiment(tmp_path)
    cfg = cfg.with_overrides(max_restarts=1)
    spec = WorkerSpec(cfg=cfg, node="colab-1", index=10_001, model_name="m", device="cpu", parent_pid=os.getpid())
    supervisor = Supervisor(cfg, [spec], run_coordinator=False, model_label="m", device_label="cpu",
                            dashboard=Dashboard(line_interval_s=3600), joined_as="colab")
    spawned = []
    monkeypatch.setattr(supervisor, "_spawn", lambda h: spawned.append(h.spec))
    [worker] = supervisor.handles
    worker.process = mp.get_context("spawn").Process(target=sys.exit, args=(1,))
    try:
        worker.process.start()
        worker.process.join(timeout=30)
        worker.respawn_asked = True
        worker.restarts.append(time.monotonic())
        supervisor._reap()
    finally:
        supervisor.monitor.close()
    assert spawned == [] and worker.failed and not worker.respawn_asked
    assert "colab-1: failed" in folder.events_file_of("colab").read_text()
