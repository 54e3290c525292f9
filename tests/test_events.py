"""The supervisor's events survive a shared folder that cannot be written for a while."""

import json
from types import SimpleNamespace

import swarm_supervisor.events as events_module
from swarm_supervisor.events import EventJournal, Watches
from workers.shared_folder.folder import ExperimentFolder


def written(folder: ExperimentFolder) -> list[str]:
    return [json.loads(line)["event"] for line in folder.events_file.read_text().splitlines()]


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
    assert journal.dropped == 2 and "2 events not written" in caplog.text
    # one warning for the outage, not one per event
    assert caplog.text.count("events wait to be written") == 1


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
