"""The supervisor's events survive a shared folder that cannot be written for a while."""

import json
import time
from types import SimpleNamespace

import swarm_supervisor.events as events_module
from configs_env import SwarmConfig
from swarm_supervisor.events import EventJournal, Watches
from swarm_supervisor.machines import count_restarts
from swarm_supervisor.machines import read_events
from swarm_supervisor.status import SwarmReader
from tests.helpers import node_exchange, viewer
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.jsonl import append_jsonl
from workers.shared_folder.protocol import Heartbeat


def written(folder: ExperimentFolder) -> list[str]:
    return written_by(folder, None)


def written_by(folder: ExperimentFolder, machine: str | None) -> list[str]:
    return [json.loads(line)["event"] for line in folder.events_file_of(machine).read_text().splitlines()]


def test_events_of_an_outage_are_written_in_order_with_their_own_times_when_the_folder_is_back(tmp_path):
    folder = ExperimentFolder(tmp_path / "exp")
    folder.create()
    journal = EventJournal(folder.events_file)
    journal.add("started")
    away = tmp_path / "dropped"
    folder.root.rename(away)                         # the mount drops
    journal.add("the shared folder is gone", level="warning")
    journal.add("worker-1: restarting", kind="restart", node="worker-1")
    assert not folder.root.exists()                  # nothing rebuilt the folder on the local disk
    assert len(journal.waiting) == 2 and not journal.flush()
    away.rename(folder.root)                         # it is back
    assert journal.flush() and not journal.waiting
    assert written(folder) == ["started", "the shared folder is gone", "worker-1: restarting"]
    rows = [json.loads(line) for line in folder.events_file.read_text().splitlines()]
    assert rows[0]["time"] <= rows[1]["time"] <= rows[2]["time"]
    assert rows[2]["kind"] == "restart" and rows[2]["node"] == "worker-1"     # the fact programs count
    assert list(journal.recent)[-1].endswith("worker-1: restarting")         # the dashboard's line


def test_a_very_long_outage_keeps_the_newest_events_and_says_how_many_it_lost(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(events_module, "MAX_WAITING", 3)
    folder = ExperimentFolder(tmp_path / "exp").create()
    folder.root.rename(tmp_path / "dropped")          # and it stays away: every write fails
    journal = EventJournal(folder.events_file)
    for n in range(5):
        journal.add(f"event {n}")
    assert [row["event"] for row in journal.waiting] == ["event 2", "event 3", "event 4"]
    assert journal.dropped == 2 and "the oldest are dropped" in caplog.text
    # one warning for the outage, not one per event
    assert caplog.text.count("events wait to be written") == 1
    folder.root.parent.joinpath("dropped").rename(folder.root)        # back: the loss is said in the file
    assert journal.flush()
    assert written(folder) == ["2 events lost: the shared folder was away for over 3 events", "event 2", "event 3",
                               "event 4"]


def test_a_worker_that_starts_and_stops_unlearning_is_two_events_not_one_a_look(tmp_path):
    folder = ExperimentFolder(tmp_path / "exp").create()
    watch = Watches(EventJournal(folder.events_file), folder.root, memory_high_water=0.9)

    def look(warning: str | None) -> None:
        watch.learning(SimpleNamespace(nodes=(SimpleNamespace(role="worker", node_id="worker-1",
                                                              learning_warning=warning),)))

    for warning in (None, "worker-1: held-out falling", "worker-1: held-out falling", None, None):
        look(warning)
    rows = [json.loads(line) for line in folder.events_file.read_text().splitlines()]
    assert [row["event"] for row in rows] == ["worker-1: held-out falling", "worker-1: learning again (held-out "
                                              "and reward back within the guard's bounds)"]
    assert rows[0]["kind"] == "unlearning" and rows[0]["level"] == "warning"      # what `experiments` counts


def test_each_machine_keeps_its_own_events_and_samples_and_speaks_only_for_its_own_workers(tmp_path):
    """A runtime that joined through Drive appends to logs/supervisor-<NODE_ID>/, never to the first machine's
    files (two runtimes appending one file through Drive upload their copies over each other); readers gather
    every machine's files, and take from each only what it may say: its own workers' restarts and memory."""
    folder = ExperimentFolder(tmp_path / "exp").create()
    now = time.time()
    for node in ("worker-1", "colab2"):
        node_exchange(folder, node).write_heartbeat(Heartbeat(node=node, role="worker", pid=1, host="h", instance="i",
                                                              status="training", round=3, started_at=now,
                                                              updated_at=now))
    joined = folder.supervisor_dir("colab2")
    assert joined == folder.root / "logs" / "supervisor-colab2"
    for path, row in ((folder.events_file, {"time": now - 3, "event": "started 2 workers and the coordinator"}),
                      (joined / "events.jsonl", {"time": now - 2, "event": "started 1 workers"}),
                      (folder.events_file, {"time": now - 1, "event": "worker-1: restarting", "kind": "restart",
                                            "node": "worker-1"}),
                      (joined / "events.jsonl", {"time": now - 1, "event": "colab2: restarting", "kind": "restart",
                                                 "node": "colab2"}),
                      # not the joined machine's to say: a restart of the first machine's worker
                      (joined / "events.jsonl", {"time": now, "event": "worker-1: restarting", "kind": "restart",
                                                 "node": "worker-1"})):
        append_jsonl(path, {"level": "info", **row})

    def sample(gpu_mib: dict[str, float], device_used_mib: float, device_total_mib: float) -> dict:
        return {"time": now, "nodes": {node: {"gpu_mib": mib, "rss_mib": 100.0} for node, mib in gpu_mib.items()},
                "device_used_mib": device_used_mib, "device_total_mib": device_total_mib}

    append_jsonl(folder.monitor_file, sample({"worker-1": 2500.0}, 5000.0, 80000.0))
    append_jsonl(joined / "monitor.jsonl", sample({"colab2": 2600.0, "worker-1": 1.0}, 1.0, 2.0))
    view = SwarmReader(folder, viewer(folder), "tiny", "cpu").view()
    rows = {row.node_id: row for row in view.nodes}
    assert (rows["worker-1"].restarts, rows["colab2"].restarts) == (1, 1)
    assert (rows["worker-1"].gpu_mib, rows["colab2"].gpu_mib) == (2500.0, 2600.0)
    assert [device.total_mib for device in view.devices] == [80000.0]     # the coordinator machine's GPU line
    assert count_restarts(folder) == 2
    assert [line[9:] for line in read_events(folder)] == [
        "started 2 workers and the coordinator", "[colab2] started 1 workers", "worker-1: restarting",
        "[colab2] colab2: restarting"]


def test_a_file_planted_where_a_machines_logs_go_keeps_its_events_waiting_and_the_supervisor_running(tmp_path):
    folder = ExperimentFolder(tmp_path / "exp").create()
    folder.supervisor_dir("colab2").write_text("a peer's file where the joined machine's folder goes")
    journal = EventJournal(folder.events_file_of("colab2"))
    journal.add("started 1 workers")                   # raised out of the coordinator's thread before
    assert [row["event"] for row in journal.waiting] == ["started 1 workers"] and not journal.flush()
    folder.supervisor_dir("colab2").unlink()
    folder.supervisor_dir("colab2").mkdir()
    assert journal.flush() and written_by(folder, "colab2") == ["started 1 workers"]


def test_an_event_appended_twice_by_a_retried_write_counts_once(tmp_path, monkeypatch):
    """An fsync that fails on a FUSE mount after the line landed: the journal writes the line again."""
    folder = ExperimentFolder(tmp_path / "exp").create()
    journal = EventJournal(folder.events_file)
    landed_then_failed = [True]

    def append(path, record):
        append_jsonl(path, record)
        if landed_then_failed.pop() if landed_then_failed else False:
            raise OSError(5, "Input/output error (fsync)")

    monkeypatch.setattr(events_module, "append_jsonl", append)
    journal.add("worker-1: restarting", kind="restart", node="worker-1")
    assert journal.flush() and len(written(folder)) == 2            # on disk twice
    assert count_restarts(folder) == 1
    view = SwarmReader(folder, viewer(folder), "tiny", "cpu")
    view.view()
    assert view.restarts == {"worker-1": 1}
    assert len(read_events(folder)) == 1


def test_events_still_unwritten_when_a_run_ends_are_printed_in_its_summary(tmp_path):
    from swarm_supervisor.reports import summary
    from swarm_supervisor.supervisor import Supervisor

    cfg = SwarmConfig.from_env({"GDRIVE_PATH": str(tmp_path / "drive"), "EXPERIMENT_NAME": "e2e"})
    supervisor = Supervisor(cfg, [], run_coordinator=False, model_label="m", device_label="cpu")
    supervisor.folder.create().root.rename(tmp_path / "dropped")        # the mount is away to the end
    supervisor.event("worker-1: exited with code -9; restart in 1s")
    printed = summary(supervisor, 1.0, 130)
    assert "1 events not written to" in printed and "(the shared folder is away)" in printed
    assert printed.splitlines()[-1].endswith("worker-1: exited with code -9; restart in 1s")


def test_files_a_worker_refuses_are_named_in_the_supervisors_events_once_a_minute_however_many(tmp_path,
                                                                                               monkeypatch):
    """The dashboard said `rejected files 41` and only each worker's log said which: now the heartbeat carries the
    newest few names and the supervisor's events say them, an event a minute for a peer that plants without end."""
    from tests.hostile_files import plant_hostile
    from workers.heartbeat import Heartbeats

    folder = ExperimentFolder(tmp_path / "exp").create()
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    stage = folder.rollout_dir(1)
    exchange = node_exchange(folder, "worker-1")
    beats = Heartbeats(exchange, Heartbeat.first("worker-1", "worker", "waiting"), troubles=list)
    watch = Watches(EventJournal(folder.events_file), folder.root, memory_high_water=0.9)
    reader = SwarmReader(folder, viewer(folder), "tiny", "cpu")

    def poll(round_: int) -> None:       # the worker reads its peers and beats; the supervisor looks
        exchange.peer_rollouts(round_)
        beats.update(round=round_)
        watch.refusals(reader.view())

    planted = plant_hostile(stage, outside)
    poll(1)
    newest = sorted(f"{path.relative_to(folder.root)}" for path in planted.values())[-5:]
    assert written(folder) == [f"worker-1 refused {len(planted)} more files or groups of the shared folder "
                               f"({len(planted)} in all); the newest: {', '.join(newest)}; logs/worker-1/worker.log "
                               "says why"]
    plant_hostile(folder.rollout_dir(2), outside)
    poll(2)
    assert len(written(folder)) == 1                 # within the minute: counted, not told again
    monkeypatch.setattr(events_module, "REFUSALS_TOLD_EVERY_S", 0.0)
    poll(2)
    assert written(folder)[-1].startswith(f"worker-1 refused {len(planted)} more files or groups of the shared "
                                          f"folder ({2 * len(planted)} in all); the newest: rollouts/round_2/")


def test_names_in_a_heartbeat_are_shown_only_when_they_are_plain_names_and_only_the_newest_few(tmp_path):
    from workers.shared_folder.protocol import REFUSED_NAMES

    planted = ["\x1b[2J", "[bold]x[/bold]", "a" * 500, *(f"peers/w-{n}.json" for n in range(1000)), 7]
    beat = Heartbeat.from_json({**Heartbeat.first("w-1", "worker", "waiting").to_json(), "rejected": 1007,
                                "rejected_names": planted})
    assert beat.rejected_names == tuple(f"peers/w-{n}.json" for n in range(1000 - REFUSED_NAMES, 1000))
