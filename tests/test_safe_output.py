"""What the folder says is shown literally and whole: an escape sequence or rich markup in a heartbeat, a config
or a name is printed as text (never run, never a crash), and an 80-column pipe shows every name and number."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from configs_env import SwarmConfig
from swarm_supervisor.cli import main
from swarm_supervisor.dashboard import render, status_line
from swarm_supervisor.status import SwarmReader
from tests.helpers import console_text, swarm_env
from workers.shared_folder.exchange import read_heartbeats
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import write_json_atomic
from workers.shared_folder.jsonl import append_jsonl
from workers.learning.model import check_prompt_room
from workers.shared_folder.protocol import Heartbeat, RoundMetrics, RoundState
from tests.helpers import append_as, keyring, node_exchange, write_as

CLEAR_SCREEN = "\x1b[2J"
MARKUP = "[bold]x[/]"
ESCAPED = "\\x1b[2J"          # how the screen-clearing sequence is shown: as its six characters
NODES = ("worker-1", "worker-2", "worker-3", "long-named-worker-4")


def beat(node: str, status: str, updated_at: float, role: str = "worker", **extra) -> Heartbeat:
    return Heartbeat(node=node, role=role, pid=1, host="h", instance="i", status=status, round=60,
                     started_at=updated_at, updated_at=updated_at, **extra)


def metrics(node: str, round_: int, finished_at: float) -> dict:
    return RoundMetrics(node=node, round=round_, reward_mean=0.4375, accuracy=0.25, loss=0.1, local_groups=2,
                        external_groups=2, external_available=2, zero_advantage_groups=0, completions=8,
                        mean_completion_tokens=5.0, generate_s=0.5, fetch_s=0.1, train_s=0.1, round_s=0.7,
                        finished_at=finished_at).to_json()


def sixty_fast_rounds(drive: Path, coordinator: str, config: dict | None = None) -> ExperimentFolder:
    """60 rounds in 48 s an hour ago; the coordinator's heartbeat says `coordinator` (running, stopped, done)."""
    folder = ExperimentFolder(drive / "experiments" / "e2e").create()
    began = time.time() - 3600
    write_as(folder, "coordinator", folder.config_file, {"schema": 1, "max_rounds": 2000, "device_resolved": "cpu",
                                                         "model_resolved": "rl-swarm/tiny-gpt2", "started_at": began,
                                                         **(config or {})})
    for round_ in range(1, 61):
        write_as(folder, "coordinator", folder.round_state_file(round_),
                 RoundState(round_, 2000, began + 0.8 * round_, "all workers done").to_json())
    coordinator_beat = time.time() if coordinator == "running" else began + 49
    node_exchange(folder, "coordinator").write_heartbeat(beat("coordinator", coordinator, coordinator_beat,
                                                         role="coordinator"))
    for node in NODES:
        for round_ in range(1, 61):
            append_as(folder, node, folder.metrics_file(node), metrics(node, round_, began + 0.8 * round_ + 0.7))
        node_exchange(folder, node).write_heartbeat(beat(node, "waiting", time.time()))
    return folder


def hostile_heartbeats(folder: ExperimentFolder) -> None:
    """worker-1 crashed with an error that clears the screen; worker-2 works around trouble in markup."""
    now = time.time()
    node_exchange(folder, "worker-1").write_heartbeat(beat("worker-1", "crashed", now,
                                                      last_error=f"{CLEAR_SCREEN}boom {MARKUP} [/]"))
    node_exchange(folder, "worker-2").write_heartbeat(beat("worker-2", "waiting", now, note=f"{MARKUP}{CLEAR_SCREEN}"))
    append_jsonl(folder.events_file, {"time": now, "event": f"worker-1: {CLEAR_SCREEN}{MARKUP}\nsecond line",
                                      "level": "info"})


def viewing(tmp_path: Path, **settings: float) -> SwarmConfig:
    """`rl-swarm status`'s config of 2000 rounds, this machine's keys in tmp_path."""
    return SwarmConfig(cache_dir=tmp_path / "cache", max_rounds=2000, **settings)


def rl_swarm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swarm_supervisor", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_an_escape_sequence_or_markup_in_a_heartbeat_is_shown_literally_on_the_dashboard(tmp_path):
    folder = sixty_fast_rounds(tmp_path / "drive", "running")
    hostile_heartbeats(folder)
    reader = SwarmReader(folder, viewing(tmp_path), "rl-swarm/tiny-gpt2", "cpu")
    from swarm_supervisor.machines import read_events

    swarm = reader.view(events=read_events(folder))
    for width in (200, 80):        # the table, and one block per node
        text = console_text(render(swarm), width=width)
        assert "\x1b" not in text
        assert f"crashed {ESCAPED}boom {MARKUP} [/]" in text and f"waiting {MARKUP}{ESCAPED}" in text
        assert f"worker-1: {ESCAPED}{MARKUP}\\nsecond line" in text          # the event, on one line
    line = status_line(swarm)
    assert "\x1b" not in line and f"worker-2: {MARKUP}{ESCAPED}" in line


def test_rl_swarm_status_in_an_80_column_pipe_prints_every_value_whole_and_escaped(tmp_path):
    folder = sixty_fast_rounds(tmp_path / "drive", "running")
    hostile_heartbeats(folder)
    result = rl_swarm({**swarm_env(tmp_path), "COLUMNS": "80"}, "status")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\x1b" not in out and "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    for node in ("coordinator", *NODES):
        assert node in out
    assert "round 60/2000" in out and "0.438" in out and "25%" in out and "2+2" in out
    assert f"crashed {ESCAPED}boom {MARKUP} [/]" in out and f"waiting {MARKUP}{ESCAPED}" in out
    assert f"{ESCAPED}{MARKUP}\\nsecond line" in out


def test_markup_and_control_characters_in_config_and_names_do_not_crash_experiments_or_validate(
        tmp_path, monkeypatch, capsys):
    drive = tmp_path / "drive"
    sixty_fast_rounds(drive, "done", config={"model_resolved": f"{MARKUP} [/] {CLEAR_SCREEN}",
                                             "num_train_samples": "[/]"})
    write_json_atomic(drive / "experiments" / "e2e" / "state" / f"{CLEAR_SCREEN}[/].json", {"schema": 1})
    write_json_atomic(drive / "experiments" / f"odd{CLEAR_SCREEN}[red]name" / "config.json", {"schema": 1})
    (drive / "experiments" / f"empty{CLEAR_SCREEN}").mkdir()        # named in a line of its own, not listed
    monkeypatch.setenv("GDRIVE_PATH", str(drive))
    monkeypatch.setenv("COLUMNS", "80")
    for command in (["experiments", "list"], ["experiments", "compare"], ["experiments", "aggregate"],
                    ["experiments", "list", "--csv"]):
        assert main(command) == 0
        out, err = capsys.readouterr()
        assert "\x1b" not in out + err and "…" not in out, command
        assert f"odd{ESCAPED}[red]name" in out and f"empty{ESCAPED}" in err, command
    main(["experiments", "list"])
    listing = capsys.readouterr().out
    assert f"{MARKUP} [/] {ESCAPED}" in listing and "60/2000" in listing
    assert main(["validate", "e2e"]) == 1                         # the planted state file is unreadable
    report = capsys.readouterr().out
    assert "\x1b" not in report and f"state/{ESCAPED}[/].json" in report


def test_a_stopped_experiment_shows_no_eta_and_the_pace_it_ran_at(tmp_path):
    """60 rounds in 48 s, stopped an hour ago: 4500 rounds/h, not 60 an hour, and no ETA."""
    stopped = sixty_fast_rounds(tmp_path / "stopped" / "drive", "stopped")
    swarm = SwarmReader(stopped, viewing(tmp_path), "tiny", "cpu").view()
    assert swarm.phase == "stopped" and swarm.eta_s is None
    assert swarm.rounds_per_hour == pytest.approx(59 / (0.8 * 59) * 3600)
    assert swarm.elapsed_s == pytest.approx(0.8 * 59 + 0.7, abs=0.01)       # to the last round's metrics
    text = console_text(render(swarm), width=200)
    assert "4500 rounds/h" in text and "stopped" in text and "ETA" not in text and "elapsed 47s" in text
    assert "ETA" not in status_line(swarm) and "stopped" in status_line(swarm)
    running = sixty_fast_rounds(tmp_path / "running" / "drive", "running")
    swarm = SwarmReader(running, viewing(tmp_path), "tiny", "cpu").view()
    assert swarm.phase == "running" and swarm.eta_s is not None and "ETA" in console_text(render(swarm))


def test_a_runtime_that_sees_the_folder_minutes_late_does_not_call_a_running_swarm_stopped(tmp_path):
    """Through Drive a joined runtime reads the coordinator's heartbeat DRIVE_LAG late: three minutes old there
    is a running swarm when files travel for three minutes, and a stopped one on the coordinator's own disk."""
    folder = sixty_fast_rounds(tmp_path / "drive", "running")
    node_exchange(folder, "coordinator").write_heartbeat(beat("coordinator", "running", time.time() - 200,
                                                              role="coordinator"))
    assert SwarmReader(folder, viewing(tmp_path), "tiny", "cpu").view().phase == "stopped"
    late = SwarmReader(folder, viewing(tmp_path, drive_lag=180.0), "tiny", "cpu").view()
    assert late.phase == "running" and late.eta_s is not None
    from swarm_supervisor.experiments import summarize      # `experiments list`: by the lag the swarm recorded

    assert summarize(folder.root, None).status == "stopped"
    # a forged lag counts as the setting's most, an hour (and two minutes)
    for recorded, beat_age, status in ((180, 200, "running"), (1e300, 3000, "running"), (1e300, 7200, "stopped")):
        recorded_config = {k: v for k, v in json.loads(folder.config_file.read_text()).items()
                           if k not in ("signature", "sha256")}
        write_as(folder, "coordinator", folder.config_file, {**recorded_config, "drive_lag": recorded})
        node_exchange(folder, "coordinator").write_heartbeat(beat("coordinator", "running", time.time() - beat_age,
                                                                  role="coordinator"))
        assert summarize(folder.root, None).status == status, recorded


def test_a_worker_without_a_coordinator_keeps_waiting_and_says_so(tmp_path, monkeypatch):
    import workers.worker as worker_module
    from workers.shared_folder.protocol import Status
    from workers.worker import NoCoordinator, Worker, WorkerSpec

    cfg = SwarmConfig(gdrive_path=tmp_path, experiment_name="e2e", cache_dir=tmp_path / "cache").with_overrides(
        peer_timeout=0.3)
    folder = ExperimentFolder(cfg.experiment_dir).create()
    spec = WorkerSpec(cfg=cfg, node="worker-1", index=0, model_name="m", device="cpu", parent_pid=os.getppid())
    stop = threading.Event()
    worker = Worker(spec, stop)
    found: list = []
    waiting = threading.Thread(target=lambda: found.append(worker.wait_for_round(1)))
    waiting.start()
    try:
        deadline = time.monotonic() + 10
        while (read_heartbeats(folder, keyring(folder)).get("worker-1")
               or beat("w", "", 0)).status != Status.WAITING_FOR_COORDINATOR:
            assert time.monotonic() < deadline, "the worker never said what it waits for"
            time.sleep(0.05)
        time.sleep(3 * cfg.peer_timeout)
        assert waiting.is_alive()                 # three PEER_TIMEOUTs on, still waiting: not failed
        now = time.time()
        node_exchange(folder, "coordinator").write_heartbeat(beat("coordinator", "running", now, role="coordinator"))
        write_as(folder, "coordinator", folder.round_state_file(1), RoundState(1, 3, now, "start").to_json())
        waiting.join(timeout=10)
    finally:
        stop.set()
        waiting.join(timeout=10)
    assert found and found[0].round == 1
    monkeypatch.setattr(worker_module, "COORDINATOR_PATIENCE", 3)
    started = time.monotonic()
    with pytest.raises(NoCoordinator, match=r"no coordinator heartbeat for \d+s and no round 2 in .*: is "):
        Worker(spec, threading.Event()).wait_for_round(2)   # the coordinator above went quiet for good
    assert time.monotonic() - started >= 2 * cfg.peer_timeout


def test_a_worker_that_gave_up_on_the_coordinator_is_restarted_not_failed(tmp_path):
    import torch.multiprocessing as mp

    from swarm_supervisor.dashboard import Dashboard
    from swarm_supervisor.supervisor import Supervisor
    from workers.processes import EXIT_NO_COORDINATOR, WorkerSpec

    cfg = SwarmConfig(gdrive_path=tmp_path, experiment_name="e2e")
    ExperimentFolder(cfg.experiment_dir).create()
    spec = WorkerSpec(cfg=cfg, node="worker-1", index=0, model_name="m", device="cpu", parent_pid=os.getpid())
    supervisor = Supervisor(cfg, [spec], run_coordinator=False, model_label="m", device_label="cpu",
                            dashboard=Dashboard(line_interval_s=3600))
    try:
        [handle] = supervisor.handles
        handle.process = mp.get_context("spawn").Process(target=sys.exit, args=(EXIT_NO_COORDINATOR,))
        handle.process.start()
        handle.process.join(timeout=60)
        supervisor._reap()
    finally:
        supervisor.monitor.close()
    assert not handle.failed and handle.restart_at is not None and handle.total_restarts == 1
    assert f"exited with code {EXIT_NO_COORDINATOR}" in supervisor.events[-1]


def test_a_max_new_tokens_that_leaves_the_prompt_no_room_is_refused_before_anything_starts(tmp_path, monkeypatch,
                                                                                           capsys):
    for key, value in swarm_env(tmp_path, MAX_NEW_TOKENS="500").items():
        monkeypatch.setenv(key, value)
    assert main(["up"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("rl-swarm: error: MAX_NEW_TOKENS=500 leaves 12 of rl-swarm/tiny-gpt2's 512 positions "
                           "for the prompt; set MAX_NEW_TOKENS <= ")
    limit = int(line.rsplit("<= ", 1)[1])
    assert 400 < limit < 500
    assert not (tmp_path / "drive" / "experiments").exists()      # no worker, no folder
    cfg = SwarmConfig.from_env()
    check_prompt_room(cfg.model_name, cfg.cache_dir, cfg.tasks, limit)     # the value it suggests is taken
