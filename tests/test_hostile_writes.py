"""No write or clean-up of the swarm goes through what a peer planted in the shared folder (issue 17): an append
or an atomic write neither tears nor follows a planted link, the clean-up of killed writes removes only their
leftovers and looks a bounded way into a flooded folder, and a link planted where a node copies a base or saves
its checkpoints reaches no file of this machine.
"""

import json
import os
import time

import pytest

from configs_env import SwarmConfig
from tests.helpers import heartbeat_record, metrics_row, node_key, warnings_naming
from tests.hostile_files import OUTSIDE_TEXT, dead_pid, hostile_experiment, plant_entry
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.json_records import read_json_bounded, write_json_atomic
from workers.shared_folder.jsonl import append_jsonl, read_jsonl
from workers.shared_folder.rejections import RejectedFile
from workers.shared_folder.leftovers import STALE_TEMP_S, remove_stale_temps, writer_tag
from workers.shared_folder.protocol import RoundMetrics

# a test that blocks on a planted FIFO fails rather than hanging the suite
pytestmark = pytest.mark.usefixtures("no_reader_blocks")


@pytest.fixture
def swarm(tmp_path):
    return hostile_experiment(tmp_path)


# -- writes never follow links and never tear --------------------------------------------------------

@pytest.mark.parametrize("kind", ["symlink to a file outside", "FIFO", "socket"])
def test_an_append_never_writes_through_what_a_peer_planted_at_its_path(swarm, kind, caplog):
    _, folder, outside = swarm
    path = plant_entry(folder.metrics_file("worker-1"), kind, outside)
    append_jsonl(path, metrics_row("worker-1", 1))
    assert outside.read_text() == OUTSIDE_TEXT
    assert [row.round for row in read_jsonl(path, RoundMetrics.from_json)] == [1]
    assert warnings_naming(caplog, path) == 1


def test_an_append_to_a_planted_folder_is_an_error_naming_it(swarm):
    _, folder, _ = swarm
    path = folder.metrics_file("worker-1")
    path.mkdir(parents=True)
    with pytest.raises(OSError, match="is a directory, not the file rl-swarm appends to"):
        append_jsonl(path, metrics_row("worker-1", 1))


def test_a_short_write_loses_no_byte_of_an_appended_line(swarm, monkeypatch):
    _, folder, _ = swarm
    write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: write(fd, bytes(data[:7])))    # what a slow mount may do
    path = folder.metrics_file("worker-1")
    rows = [metrics_row("worker-1", 1), metrics_row("worker-1", 2)]
    for row in rows:
        append_jsonl(path, row)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


def test_an_atomic_write_replaces_a_planted_link_and_uses_no_temp_name_a_peer_could_guess(swarm):
    _, folder, outside = swarm
    target = folder.heartbeat_file("worker-1")
    target.symlink_to(outside)
    for pid in range(os.getpid() - 2, os.getpid() + 3):     # the names earlier versions wrote their temp file to
        (target.parent / f".{target.name}.{pid}.tmp").symlink_to(outside)
    write_json_atomic(target, heartbeat_record("worker-1"))
    assert outside.read_text() == OUTSIDE_TEXT
    assert not target.is_symlink() and read_json_bounded(target, require_checksum=True)["node"] == "worker-1"


# -- leftovers of killed writes ----------------------------------------------------------------------

def test_leftovers_of_killed_writes_are_cleared_at_start_and_a_live_writers_are_kept(swarm):
    from workers.best_model import BEST
    from workers.checkpoint import clear_leftovers

    _, folder, _ = swarm
    checkpoints = folder.checkpoint_dir("worker-1")
    here_dead = writer_tag().replace(str(os.getpid()), str(dead_pid()))
    killed = checkpoints / f".round_000003.{here_dead}.k3j_2x9a.tmp"      # its writer died on this host
    older = checkpoints / f".round_000002.{os.getpid()}.tmp"            # an earlier version's name, long ago
    live = checkpoints / f".round_000004.{writer_tag()}.a1b2c3d4.tmp"    # a checkpoint being written now
    elsewhere = folder.rollout_dir(1) / ".worker-3.json.12.tmp"      # any host's, minutes old
    moved_aside = checkpoints / f".best.{here_dead}.q9w8e7r6.old"       # save_best killed between its renames
    round_aside = checkpoints / f".round_000001.{here_dead}.z1y2x3w4.old"  # round 1 saved again, killed likewise
    for path in (killed, older, live, moved_aside, round_aside):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"weights")
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("{")
    long_ago = time.time() - 2 * STALE_TEMP_S
    for path in (older, older / "model.safetensors", elsewhere):
        os.utime(path, (long_ago, long_ago))

    clear_leftovers(checkpoints)                # a worker's start
    remove_stale_temps(folder.root)             # the supervisor's start
    assert [p.exists() for p in (killed, older, elsewhere, moved_aside, round_aside)] == [False] * 5
    assert live.exists()
    assert (checkpoints / BEST / "model.safetensors").read_bytes() == b"weights"
    assert (checkpoints / "round_000001" / "model.safetensors").read_bytes() == b"weights"


def test_the_clean_up_of_killed_writes_never_deletes_through_a_folder_a_peer_swapped_for_a_link(swarm, tmp_path,
                                                                                                 monkeypatch):
    """A peer swapping rollouts/round_1 for a link to a folder of this machine, after the clean-up looked at the
    temp folder in it and before it removed it, had the folder of this machine of that name deleted."""
    from workers.shared_folder import leftovers

    _, folder, _ = swarm
    killed = folder.rollout_dir(1) / f".worker-3.json.{writer_tag()}.k3j_2x9a.tmp"
    outside = tmp_path / "this-machine"
    for where in (killed, outside / "stage_0" / killed.name):
        where.mkdir(parents=True)
        (where / "notes.txt").write_text("kept")
    round_dir = folder.rollout_dir(1).parent

    def swap_then_dead(pid: int) -> bool:        # asked while the clean-up decides on the killed write
        if not round_dir.is_symlink():
            round_dir.rename(round_dir.with_name("round_1.moved"))
            round_dir.symlink_to(outside)
        return False

    monkeypatch.setattr(leftovers, "pid_alive", swap_then_dead)
    remove_stale_temps(folder.root)
    assert (outside / "stage_0" / killed.name / "notes.txt").read_text() == "kept"
    assert not (round_dir.with_name("round_1.moved") / "stage_0" / killed.name).exists()


def test_a_peer_flooding_a_folder_costs_the_clean_up_of_killed_writes_a_bounded_look(swarm, caplog):
    """The supervisor's start clears killed writes in every folder of the experiment: a folder a peer filled with
    more names than MAX_LOOKED_AT is looked at that far, with one warning naming it."""
    from workers.shared_folder.leftovers import MAX_LOOKED_AT

    _, folder, _ = swarm
    flooded = folder.rollout_dir(1)
    flooded.mkdir(parents=True)
    for i in range(MAX_LOOKED_AT + 10):
        os.close(os.open(flooded / f"junk-{i}.json", os.O_CREAT | os.O_WRONLY, 0o644))
    remove_stale_temps(folder.root)
    remove_stale_temps(folder.root)
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{flooded}: over ")]
    assert warned == [f"{flooded}: over {MAX_LOOKED_AT} entries; the clean-up of killed writes looked at the first "
                      f"{MAX_LOOKED_AT} (a peer flooding the folder?)"]


# -- links planted where a node copies a base or saves its checkpoints -------------------------------

def test_a_link_planted_in_a_base_the_sapo_table_shares_copies_no_file_of_this_machine(tmp_path):
    """The table copies seed S's base to its other splits: a peer's link there must not carry a local secret into
    the shared folder, where every peer reads it."""
    import hashlib

    from swarm_supervisor.claim import coordinator_key
    from swarm_supervisor.table import copy_base
    from workers.shared_folder.base_meta import sign_base_meta

    secret = tmp_path / "id_ed25519"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    source, target = (SwarmConfig(gdrive_path=tmp_path / "drive", experiment_name=name, cache_dir=tmp_path / "cache")
                      for name in ("a", "b"))
    base = ExperimentFolder(source.experiment_dir).base_dir
    base.mkdir(parents=True)
    key = coordinator_key(source, ExperimentFolder(source.experiment_dir))[0]     # the base is the coordinator's
    meta = sign_base_meta({"model_name": "m"}, hashlib.sha256(b"weights").hexdigest(), key)
    (base / "meta.json").write_text(json.dumps(meta))
    (base / "model.safetensors").symlink_to(secret)
    copied = ExperimentFolder(target.experiment_dir).base_dir
    with pytest.raises(RejectedFile, match="model.safetensors"):
        copy_base(source, target)
    assert not copied.exists() and list(copied.parent.iterdir()) == []      # no copy, no temp folder left
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").write_bytes(b"weights")
    copy_base(source, target)
    assert sorted(p.name for p in copied.iterdir()) == ["meta.json", "model.safetensors"]
    assert (copied / "model.safetensors").read_bytes() == b"weights"


def test_a_link_planted_as_a_nodes_checkpoint_folder_deletes_or_writes_nothing_of_this_machine(swarm, tmp_path):
    """checkpoints/<node> is the shared folder's: a link there to a folder of this machine holding round_N folders
    must not have the node's saves write there and prune them, nor its start clear or resume anything there."""
    from tests.test_checkpoint import trained
    from workers.checkpoint import CheckpointMeta, clear_leftovers, load_latest_checkpoint, save_checkpoint

    _, folder, _ = swarm
    outside = tmp_path / "this-machine"
    for round_ in (1, 2, 3):
        (outside / f"round_00000{round_}").mkdir(parents=True)
        (outside / f"round_00000{round_}" / "notes.txt").write_text("not the swarm's")
    checkpoints = folder.checkpoint_dir("w-1")
    checkpoints.symlink_to(outside)
    key = node_key(folder, "w-1")
    model, optimizer = trained(0)
    clear_leftovers(checkpoints)                                         # the worker's start
    assert load_latest_checkpoint(checkpoints, model, optimizer, "m", key) is None
    save_checkpoint(checkpoints, CheckpointMeta(5, "w-1", "m"), model, optimizer, key)
    assert sorted(p.name for p in outside.iterdir()) == ["round_000001", "round_000002", "round_000003"]
    assert all((p / "notes.txt").read_text() == "not the swarm's" for p in outside.iterdir())
    assert not checkpoints.is_symlink() and (checkpoints / "round_000005" / "meta.json").is_file()
