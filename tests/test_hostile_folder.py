"""A peer cannot run code in, poison, crash or hang the swarm through the shared folder (issue 17).

Each test plants what a careless or hostile peer could leave in the folder, and shows that every reader skips
it with one warning naming it and goes on with the good records. That no write or clean-up goes through what a
peer planted: test_hostile_writes.py.
"""

import contextlib
import io
import json
import os
import time
from pathlib import Path
from typing import Iterator

import pytest
from rich.console import Console

from configs_env import SwarmConfig
from configs_env.parsing import SAFE_NAME
from swarm_supervisor.experiments import metrics_by_round, summarize
from swarm_supervisor.validation import validate
from swarm_supervisor.status import METRICS_CHUNK, SwarmReader
from tests.helpers import heartbeat_record, metrics_row, rollouts_record, warnings_naming
from tests.hostile_files import HOSTILE_REASON, OUTSIDE_TEXT, hostile_experiment, plant_entry, plant_hostile, sealed
from workers.shared_folder.held_out import eval_file, read_held_out
from workers.shared_folder.exchange import SMALL_RECORD_BYTES, ROLLOUT_NAME, read_heartbeats
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import MAX_RECORD_BYTES, read_json_bounded, write_json_atomic
from workers.shared_folder.jsonl import read_jsonl
from workers.shared_folder.rejections import RejectedFile, check_node_name
from workers.shared_folder.leftovers import STALE_TEMP_S
from workers.shared_folder.protocol import HeldOutEval, RoundMetrics, RoundState
from workers.shared_folder.signing import KeyRing
from tests.helpers import key_of_an_older_rl_swarm, keyring, node_exchange, node_key, write_as

# a test that blocks on a planted FIFO fails rather than hanging the suite
pytestmark = pytest.mark.usefixtures("no_reader_blocks")


@pytest.fixture
def swarm(tmp_path):
    return hostile_experiment(tmp_path)


def reader(cfg: SwarmConfig, folder: ExperimentFolder) -> SwarmReader:
    return SwarmReader(folder, cfg, "m", "cpu")


# -- every reader survives every file ----------------------------------------------------------------

def test_a_record_reader_refuses_each_hostile_entry_in_one_line_naming_it_and_never_blocks(swarm):
    _, folder, outside = swarm
    planted = plant_hostile(folder.root / "rollouts" / "round_1" / "stage_0", outside, MAX_RECORD_BYTES)
    for kind, path in planted.items():
        with pytest.raises(RejectedFile) as refused:
            read_json_bounded(path)
        message = str(refused.value)
        assert message.startswith(f"{path}:") and HOSTILE_REASON[kind] in message and "\n" not in message, kind
    assert outside.read_text() == OUTSIDE_TEXT


def test_a_worker_trains_on_the_good_peer_rollouts_and_warns_once_about_each_hostile_file(swarm, caplog):
    _, folder, outside = swarm
    stage = folder.rollout_dir(1)
    planted = plant_hostile(stage, outside, MAX_RECORD_BYTES)
    write_as(folder, "worker-2", folder.rollout_file(1, "worker-2"), rollouts_record("worker-2"))
    exchange = node_exchange(folder, "worker-1")
    for _ in range(2):                 # a worker polls: the second look warns about nothing again
        found = exchange.peer_rollouts(1)
    assert list(found) == ["worker-2"] and len(found["worker-2"]) == 1
    assert exchange.rejected == len(planted)
    for kind, path in planted.items():
        assert warnings_naming(caplog, path) == 1, kind


def test_heartbeats_of_hostile_files_and_of_a_name_with_a_newline_are_skipped_once_each(swarm, caplog):
    _, folder, outside = swarm
    peers = folder.root / "peers"
    planted = plant_hostile(peers, outside, SMALL_RECORD_BYTES)
    newline = peers / "worker-1\n.json"
    newline.write_text(sealed(heartbeat_record("worker-1\n")))
    (peers / "worker-2.json").write_text(sealed(node_key(folder, "worker-2").sign(heartbeat_record("worker-2"))))
    for _ in range(2):                 # the dashboard reads them several times a second
        beats = read_heartbeats(folder, keyring(folder))
    assert list(beats) == ["worker-2"]
    for kind, path in {**planted, "newline": newline}.items():
        assert warnings_naming(caplog, path) == 1, kind


def test_a_metrics_log_with_hostile_lines_gives_its_good_rows_to_every_reader(swarm, caplog):
    cfg, folder, _ = swarm
    bad_lines = ["[1, 2]", '{"schema": 1, "round": 1e999}', '{"round": ' + "9" * 400 + "}",
                 "[" * 10_000 + "]" * 10_000, '{"round": NaN}', ""]
    path = folder.metrics_file("worker-2")
    path.parent.mkdir(parents=True)
    own, other = node_key(folder, "worker-2"), node_key(folder, "worker-1")
    # well-formed rows that do not come from worker-2: unsigned, signed by another node, or speaking for another
    forged = [json.dumps(metrics_row("worker-2", 3, reward=1.0)), json.dumps(other.sign(metrics_row("worker-2", 4))),
              json.dumps(own.sign(metrics_row("worker-1", 5)))]
    lines = [json.dumps(own.sign(metrics_row("worker-2", 1, reward=0.25))), *bad_lines, *forged,
             json.dumps(own.sign(metrics_row("worker-2", 2, reward=0.75)))]
    path.write_text("\n".join(lines) + "\n")
    write_as(folder, "worker-2", folder.heartbeat_file("worker-2"), heartbeat_record("worker-2"))

    read = read_jsonl(path, RoundMetrics.from_json)         # the format alone: the forged rows are well formed
    assert [row.round for row in read] == [1, 3, 4, 5, 2] and len(read.bad) == len(bad_lines)
    for number in range(2, 2 + len(bad_lines)):
        assert warnings_naming(caplog, Path(f"{path} line {number}")) == 1

    status = reader(cfg, folder)
    view = status.view()
    assert [(row.node_id, row.reward) for row in view.nodes] == [("worker-2", 0.75)]
    assert status.rejected == len(bad_lines) + len(forged)

    by_round, bad = metrics_by_round(folder, KeyRing.for_viewing(folder, None))
    assert {r: list(nodes) for r, nodes in by_round.items()} == {1: ["worker-2"], 2: ["worker-2"]}
    assert len(bad) == len(bad_lines) + len(forged)
    assert bad[0].startswith("metrics/worker-2/metrics.jsonl line 2: expected a JSON object, got list")
    assert [line.split(": ", 1)[1][:20] for line in bad[-3:]] == ["not signed (written ", "its signature is not",
                                                                  "a line of 'worker-1'"]


def test_a_metrics_line_longer_than_a_refresh_reads_is_skipped_rather_than_waited_for(swarm):
    cfg, folder, _ = swarm
    path = folder.metrics_file("worker-2")
    path.parent.mkdir(parents=True)
    padding = "x" * (METRICS_CHUNK + METRICS_CHUNK // 2)
    row = node_key(folder, "worker-2").sign(metrics_row("worker-2", 1, reward=0.75))
    path.write_text(json.dumps({"pad": padding}) + "\n" + json.dumps(row) + "\n")
    write_as(folder, "worker-2", folder.heartbeat_file("worker-2"), heartbeat_record("worker-2"))
    status = reader(cfg, folder)
    views = [status.view() for _ in range(3)]     # the dashboard catches up a refresh at a time
    assert [(row.node_id, row.reward) for row in views[-1].nodes] == [("worker-2", 0.75)]
    assert status.rejected == 2        # the line's first MiB, then the rest of it


def test_held_out_evaluations_with_hostile_lines_keep_their_good_rows(swarm):
    _, folder, _ = swarm
    path = eval_file(folder, "worker-2")
    path.parent.mkdir(parents=True)
    good = HeldOutEval(node="worker-2", round=0, accuracy=0.5, questions=10, seconds=1.0).to_json()
    forged = HeldOutEval(node="worker-2", round=50, accuracy=1.0, questions=10, seconds=1.0).to_json()   # unsigned
    path.write_text("\n".join([json.dumps(node_key(folder, "worker-2").sign(good)), "[]", "9" * 400,
                               '{"accuracy": -1e999}', json.dumps(forged)]) + "\n")
    rows, bad = read_held_out(path, keyring(folder))
    assert [row.accuracy for row in rows] == [0.5] and bad == 4


@pytest.mark.parametrize("kind", ["FIFO", "symlink to a file outside", "directory", "socket"])
def test_a_metrics_log_that_is_no_regular_file_is_skipped_by_every_reader(swarm, kind, caplog):
    cfg, folder, outside = swarm
    outside.write_text(json.dumps(metrics_row("worker-2", 1)) + "\n")     # lines a reader must not take
    path = plant_entry(folder.metrics_file("worker-2"), kind, outside)
    write_as(folder, "worker-2", folder.heartbeat_file("worker-2"), heartbeat_record("worker-2"))
    status = reader(cfg, folder)
    for _ in range(3):
        view = status.view()
    assert [(row.node_id, row.reward) for row in view.nodes] == [("worker-2", None)]
    assert status.rejected == 1 and warnings_naming(caplog, path) == 1
    with pytest.raises(RejectedFile, match=HOSTILE_REASON[kind]):
        read_jsonl(path)
    by_round, bad = metrics_by_round(folder, KeyRing.for_viewing(folder, None))
    assert by_round == {} and bad == [f"metrics/worker-2/metrics.jsonl: {HOSTILE_REASON[kind]}, not a regular file; "
                                      "skipped"]


def test_status_summary_and_validation_survive_a_folder_full_of_hostile_files(swarm):
    cfg, folder, outside = swarm
    write_json_atomic(folder.config_file, {"schema": 1, "max_rounds": "many", "checkpoint_interval": [1],
                                           "started_at": 1e300})
    first = RoundState(round=1, max_rounds=2, started_at=0.0, reason="start", nodes=("worker-2",))
    write_as(folder, "coordinator", folder.round_state_file(1), first.to_json())
    write_as(folder, "coordinator", folder.round_state_file(999_999_999), {**first.to_json(), "round": 999_999_999,
                                                            "max_rounds": 999_999_999})
    (folder.root / "state" / "round_\u00b2.json").write_text("{}")     # '²'.isdigit(), yet int('²') fails
    write_as(folder, "coordinator", folder.round_state_file(2), {**first.to_json(), "round": 2, "nodes": {"a": 1}})
    write_as(folder, "worker-2", folder.heartbeat_file("worker-2"), heartbeat_record("worker-2", updated_at=1e300))
    folder.metrics_file("worker-2").parent.mkdir(parents=True)
    folder.metrics_file("worker-2").write_text(
        json.dumps(node_key(folder, "worker-2").sign(metrics_row("worker-2", 1))) + "\n[]\n")
    planted = {}
    for sub in ("state", "peers", "rewards/round_1", "rollouts/round_1/stage_0"):
        planted.update({f"{sub}/{kind}": path for kind, path in plant_hostile(folder.root / sub, outside).items()})
    checkpoint = folder.checkpoint_dir("worker-2") / "round_x"
    checkpoint.mkdir(parents=True)
    (checkpoint / "meta.json").write_text("{}")
    with deep_folders(folder.root / "logs", 1200):     # rglob or os.walk through it would end in RecursionError
        check_everything_survives(cfg, folder, planted)


def check_everything_survives(cfg: SwarmConfig, folder: ExperimentFolder, planted: dict[str, Path]) -> None:
    view = reader(cfg, folder).view()
    assert [row.node_id for row in view.nodes] == ["worker-2"]
    summary = summarize(folder.root, None)
    assert (summary.max_rounds, summary.started, summary.last_activity) == (0, "-", "-")
    assert summary.rejected_files == 1
    checks = {check.name: check for check in validate(folder.root, None)}
    readable = checks["readable files"]
    # with state/round_2.json (its nodes an object) and round_².json (no checksum): refused, not a crash
    assert not readable.passed and readable.detail.startswith(f"{len(planted) + 2} unreadable"), readable.detail
    # round 2 is signed but invalid: no state of it counts
    assert not checks["round states"].passed and "[2, 3, 4, 5, 6, 7, 8, 9, 10, 11]" in checks["round states"].detail


def test_validate_names_unreadable_files_from_the_start_of_why_and_counts_those_it_leaves_out(swarm):
    """It once printed `7 unreadable:` and three of them, each reason cut from its start (`ting property name...`)
    and naming the file by its full path again."""
    cfg, folder, outside = swarm
    planted = plant_hostile(folder.peers_dir, outside, SMALL_RECORD_BYTES)
    (folder.peers_dir / "evil.json").write_text("{'a': 1}")
    folder.finished_file.write_text('{"pad": "' + "x" * SMALL_RECORD_BYTES + '"}')
    [readable] = [c for c in validate(folder.root, cfg.cache_dir) if c.name == "readable files"]
    total = len(planted) + 2
    assert readable.detail.startswith(f"{total} unreadable: peers/evil.json (not valid JSON (JSONDecodeError: "
                                      "Expecting property name"), readable.detail
    assert "; peers/hostile-1.json (a FIFO, not a regular file); " in readable.detail
    assert readable.detail.endswith(f"; and {total - 3} more in peers/ ({total - 4}), state/ (1)")
    assert str(folder.root) not in readable.detail


def test_validate_refuses_an_oversized_finished_json_for_the_limit_status_reads_it_with(swarm, caplog):
    cfg, folder, _ = swarm
    folder.finished_file.write_text('{"pad": "' + "x" * SMALL_RECORD_BYTES + '"}')
    [readable] = [c for c in validate(folder.root, cfg.cache_dir) if c.name == "readable files"]
    limit = f"is over the {SMALL_RECORD_BYTES}-byte limit"
    assert readable.detail.startswith("1 unreadable: state/finished.json (") and limit in readable.detail
    assert summarize(folder.root, cfg.cache_dir).status != "finished"      # what `status` and `experiments` read
    assert warnings_naming(caplog, folder.finished_file) == 1 and limit in caplog.text


def test_a_forged_start_time_shows_no_eta_rather_than_an_infinite_one(swarm):
    cfg, folder, _ = swarm
    for round_, started_at in ((1, -1.7e308), (2, time.time())):
        state = RoundState(round=round_, max_rounds=20, started_at=started_at, reason="start")
        write_as(folder, "coordinator", folder.round_state_file(round_), state.to_json())
    view = reader(cfg.with_overrides(max_rounds=20), folder).view()    # 18 rounds to go at 1 per 1.7e308 s
    assert view.round == 2 and view.eta_s is None


@contextlib.contextmanager
def deep_folders(root: Path, depth: int) -> Iterator[None]:
    """Folders `depth` deep, made and removed one at a time (os.makedirs and shutil.rmtree would recurse)."""
    path = root
    for _ in range(depth):
        path = path / "d"
        path.mkdir()
    try:
        yield
    finally:
        while path != root:
            path.rmdir()
            path = path.parent


def test_a_fifo_or_link_planted_in_a_checkpoint_is_skipped_without_blocking(tmp_path):
    """safetensors and torch.load open by name: a FIFO there froze the whole worker, heartbeat thread included."""
    import torch

    from tests.test_checkpoint import trained
    from workers.checkpoint import CheckpointMeta, load_latest_checkpoint, save_checkpoint
    from workers.shared_folder.signing import NodeKey

    key_dir = tmp_path.parent / f"{tmp_path.name}.keys"
    key = NodeKey.load_or_create(key_dir, "w-1")
    model, optimizer = trained(0)
    save_checkpoint(tmp_path, CheckpointMeta(1, "w-1", "m"), model, optimizer, key)
    save_checkpoint(tmp_path, CheckpointMeta(2, "w-1", "m"), model, optimizer, key)
    (tmp_path / "round_000002" / "model.safetensors").unlink()
    os.mkfifo(tmp_path / "round_000002" / "model.safetensors")
    planted = tmp_path / "round_000003"
    planted.mkdir()
    (planted / "model.safetensors").write_bytes((tmp_path / "round_000001" / "model.safetensors").read_bytes())
    meta = json.loads((tmp_path / "round_000001" / "meta.json").read_text())
    (planted / "meta.json").write_text(json.dumps(key.sign({**meta, "round": 3})))    # the node's, but for the link
    (planted / "state.pt").symlink_to(tmp_path / "round_000001" / "state.pt")
    fresh = trained(1)[0]
    restarted = key_of_an_older_rl_swarm(key_dir, "w-1")     # unsigned checkpoints are looked at too
    meta = load_latest_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), "m", restarted)
    assert meta.round == 1


def test_experiments_lists_no_folder_a_peer_linked_into_the_shared_folder(swarm, tmp_path, caplog):
    """experiments/ is the shared folder's: a link a peer planted there (experiments/x -> a folder of this machine)
    is no experiment to list, read or plot."""
    from swarm_supervisor.listing import list_experiments

    cfg, folder, _ = swarm
    (tmp_path / "this-machine").mkdir()
    (cfg.gdrive_path / "experiments" / "x").symlink_to(tmp_path / "this-machine")
    listing = list_experiments(cfg)       # the fixture's folder holds no record yet: an empty one, not the link
    assert listing.roots + listing.empty == [folder.root]
    assert f"{cfg.gdrive_path / 'experiments' / 'x'}: a link, not an experiment; not followed" in caplog.text


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
    write_as(folder, "coordinator", folder.round_state_file(2), RoundState(round=2, max_rounds=2, started_at=0.0,
                                                             reason="start").to_json())
    assert folder.state_rounds() == [2]


# -- a coordinator that dies stops the swarm in one line ---------------------------------------------

def run_supervisor(cfg: SwarmConfig):
    from swarm_supervisor.dashboard import Dashboard
    from swarm_supervisor.supervisor import Supervisor

    supervisor = Supervisor(cfg, [], run_coordinator=True, model_label="m", device_label="cpu",
                            coordinator_key=node_key(ExperimentFolder(cfg.experiment_dir), "coordinator"),
                            dashboard=Dashboard(Console(file=io.StringIO(), force_terminal=False)))
    return supervisor, supervisor.run()


def test_a_coordinator_that_raises_stops_the_supervisor_with_exit_1_and_the_reason_in_one_line(swarm, monkeypatch):
    from swarm_supervisor.reports import summary
    from swarm_supervisor.coordinator import Coordinator

    cfg, folder, _ = swarm
    leftover = folder.root / "state" / ".round_000001.json.12.tmp"     # a write killed in the last run
    leftover.write_text("{")
    os.utime(leftover, (time.time() - 2 * STALE_TEMP_S,) * 2)

    def broken(self, round_, reason):
        raise RuntimeError("state folder on fire\n  a second line the user need not see")
    monkeypatch.setattr(Coordinator, "_start_round", broken)
    supervisor, code = run_supervisor(cfg)
    reason = "coordinator failed: RuntimeError: state folder on fire"
    assert code == 1 and supervisor.failure == reason
    assert summary(supervisor, 1.0, code).splitlines()[0].startswith(f"rl-swarm: FAILED ({reason}): ")
    assert reason in [row["event"] for row in read_jsonl(folder.events_file)]
    assert not leftover.exists()


def test_a_coordinator_thread_that_ends_silently_does_not_leave_the_supervisor_waiting(swarm, monkeypatch):
    from swarm_supervisor.coordinator import Coordinator

    cfg, _, _ = swarm
    monkeypatch.setattr(Coordinator, "run", lambda self: None)
    supervisor, code = run_supervisor(cfg)
    assert code == 1 and supervisor.failure == "coordinator failed: it stopped without saying why"
