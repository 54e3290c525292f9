"""What the views believe of a folder of signed records (issue 17): `status`, the dashboard, `experiments` and
`validate` count only what the node it speaks for signed, however a peer rewrote, planted or deleted files, and an
experiment from before signed records still reads."""

import json
import os

import pytest

from tests.helpers import append_as, metrics_row, node_exchange, node_key, write_as
from tests.signed_folder import beat, signed_experiment
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.hostile import forger
from workers.shared_folder.json_records import write_json_atomic
from workers.shared_folder.protocol import HeldOutEval, RoundState, Status, SwarmFinished
from workers.shared_folder.signing import COORDINATOR, KeyRing


@pytest.fixture
def swarm(tmp_path):
    return signed_experiment(tmp_path)


def test_an_experiment_from_before_signed_records_still_shows_in_status_and_experiments(swarm):
    from swarm_supervisor.experiments import summarize
    from swarm_supervisor.status import SwarmReader

    cfg, folder = swarm
    for round_ in (1, 2):
        write_json_atomic(folder.round_state_file(round_), {**RoundState(round_, 3, 100.0 * round_, "x").to_json(),
                                                            "schema": 1})
    write_json_atomic(folder.heartbeat_file("w-1"), {**beat("w-1").to_json(), "schema": 1})
    view = SwarmReader(folder, cfg, "m", "cpu").view()
    assert view.round == 2 and [row.node_id for row in view.nodes] == ["w-1"]
    assert summarize(folder.root, cfg.cache_dir).rounds_per_hour == pytest.approx(36.0)
    node_key(folder, COORDINATOR)                       # a folder of signed records: unsigned ones count no more
    view = SwarmReader(folder, cfg, "m", "cpu").view()
    assert view.round == 0 and view.nodes == ()


def test_deleting_the_coordinators_key_makes_no_view_trust_a_peers_unsigned_records(swarm, tmp_path):
    """A peer can delete a file: keys/coordinator.pub gone (or all of keys/) must not turn a signed experiment into
    one "from before signed records", whose unsigned lines every view shows (here a made-up round 3 and a worker
    that never ran). Legacy is told from what a peer cannot remove: this machine's key folder, and keys published."""
    import shutil

    from swarm_supervisor.experiments import summarize
    from swarm_supervisor.status import SwarmReader

    cfg, folder = swarm
    write_as(folder, COORDINATOR, folder.round_state_file(1), RoundState(1, 3, 100.0, "x").to_json())
    write_as(folder, "w-1", folder.heartbeat_file("w-1"), beat("w-1").to_json())
    assert SwarmReader(folder, cfg, "m", "cpu").view().round == 1          # this machine looks once: it pins the key
    folder.public_key_file(COORDINATOR).unlink()                            # the peer's doing, then its records
    for round_ in (2, 3):
        write_json_atomic(folder.round_state_file(round_), {**RoundState(round_, 3, 100.0 * round_, "x").to_json(),
                                                            "schema": 1})
    write_json_atomic(folder.heartbeat_file("w-9"), {**beat("w-9").to_json(), "schema": 1})
    elsewhere = cfg.with_overrides(cache_dir=tmp_path / "another-machine")  # never looked before: keys/ still speaks
    for viewer, signed_round in ((cfg, 1), (elsewhere, 0)):
        view = SwarmReader(folder, viewer, "m", "cpu").view()
        assert view.round == signed_round and [row.node_id for row in view.nodes] == ["w-1"]
        assert summarize(folder.root, viewer.cache_dir).rounds_per_hour is None
    shutil.rmtree(folder.keys_dir)                                          # every key gone
    view = SwarmReader(folder, cfg, "m", "cpu").view()
    assert view.round == 1 and "w-9" not in [row.node_id for row in view.nodes]


def test_experiments_counts_the_rounds_the_coordinator_signed_not_a_planted_state_files_name(swarm):
    """`experiments list` said 999999 rounds for a state file a peer named round_999999.json."""
    from swarm_supervisor.experiments import summarize

    cfg, folder = swarm
    for round_ in (1, 2):
        write_as(folder, COORDINATOR, folder.round_state_file(round_),
                 RoundState(round_, 3, 100.0 * round_, "x").to_json())
    for planted in (0, 999999):     # a peer's, before and after the swarm's own
        forged = forger().sign(RoundState(planted, 999999, 1e9, "x").to_json())
        write_json_atomic(folder.round_state_file(planted), forged)
    summary = summarize(folder.root, cfg.cache_dir)
    assert summary.rounds == 2 and summary.rounds_per_hour == pytest.approx(36.0)


def test_validate_checks_the_rounds_the_coordinator_signed_not_a_planted_state_files_name(swarm):
    """A peer's state/round_000003.json made validate say "rounds 1..3" and pass a swarm whose worker was never
    evaluated after its last round 2 (it looked for the evaluation after the planted round 3 instead)."""
    from swarm_supervisor.validation import validate

    cfg, folder = swarm
    write_as(folder, COORDINATOR, folder.config_file, {"schema": 2, "max_rounds": 2, "eval_size": 8})
    for round_ in (1, 2):
        write_as(folder, COORDINATOR, folder.round_state_file(round_), RoundState(round_, 2, 1.0, "x").to_json())
        append_as(folder, "w-1", folder.metrics_file("w-1"), metrics_row("w-1", round_))
    write_as(folder, COORDINATOR, folder.finished_file, SwarmFinished(2, 3.0).to_json())
    append_as(folder, "w-1", folder.eval_file("w-1"), HeldOutEval("w-1", 0, 0.5, 8, 1.0).to_json())
    write_json_atomic(folder.round_state_file(3), forger().sign(RoundState(3, 3, 2.0, "x").to_json()))
    checks = {check.name: check for check in validate(folder.root, cfg.cache_dir)}
    assert checks["round states"].detail == "rounds 1..2 each have a state the coordinator signed"
    assert not checks["held-out evaluations"].passed
    assert "w-1: none after the last round 2" in checks["held-out evaluations"].detail


def test_a_config_json_a_peer_rewrote_counts_for_nothing_and_validate_names_it_and_the_fix(swarm):
    """config.json was not signed: a peer's EVAL_SIZE=0 there made validate pass a swarm whose worker was never
    evaluated on held-out questions ("none asked for"), and its model name was the one experiments listed."""
    from swarm_supervisor.experiments import summarize
    from swarm_supervisor.validation import validate

    cfg, folder = swarm
    write_as(folder, COORDINATOR, folder.round_state_file(1), RoundState(1, 1, 1.0, "x").to_json())
    append_as(folder, "w-1", folder.metrics_file("w-1"), metrics_row("w-1", 1))
    settings = {"schema": 2, "max_rounds": 1, "eval_size": 8, "model_resolved": "gpt2"}
    write_as(folder, COORDINATOR, folder.config_file, settings)
    checks = {check.name: check for check in validate(folder.root, cfg.cache_dir)}
    assert checks["config"].passed and not checks["held-out evaluations"].passed
    for forged in ({**settings, "eval_size": 0, "model_resolved": "peer"},
                   forger().sign({**settings, "eval_size": 0, "model_resolved": "peer"})):
        write_json_atomic(folder.config_file, forged)
        checks = {check.name: check for check in validate(folder.root, cfg.cache_dir)}
        assert not checks["config"].passed
        assert checks["config"].detail.startswith(f"{folder.config_file}: not the experiment's coordinator's (")
        assert checks["config"].detail.endswith("; the next `rl-swarm up` of the experiment on its coordinator's "
                                                "machine writes a signed one")
        assert "\n" not in checks["config"].detail
        assert summarize(folder.root, cfg.cache_dir).model == "?"


def test_an_unsigned_config_json_still_reads_in_a_folder_from_before_signed_records(tmp_path):
    from swarm_supervisor.experiments import summarize
    from swarm_supervisor.validation import validate

    old = ExperimentFolder(tmp_path / "drive" / "experiments" / "old").create()
    write_json_atomic(old.config_file, {"schema": 1, "max_rounds": 3, "model_resolved": "gpt2"})
    assert summarize(old.root, tmp_path / "cache").model == "gpt2"
    [check] = [c for c in validate(old.root, tmp_path / "cache") if c.name == "config"]
    assert check.passed


def test_the_dashboard_checks_an_unchanged_heartbeat_once_and_still_refuses_one_tampered_after_it(swarm, caplog):
    """The table is rebuilt four times a second: a heartbeat it has verified is not verified again, but a peer that
    rewrites it in place (same inode, same size, its mtime set back, a correct checksum) is refused at once."""
    from swarm_supervisor.status import SwarmReader
    from workers.shared_folder.json_records import record_checksum

    class CountingKeyRing(KeyRing):
        checked = 0

        def verify(self, record: dict, node: str, where: str) -> dict:
            self.checked += 1
            return super().verify(record, node, where)

    cfg, folder = swarm
    node_exchange(folder, "w-1").write_heartbeat(beat("w-1", Status.WAITING))
    keyring = CountingKeyRing(folder)
    reader = SwarmReader(folder, cfg, "tiny", "cpu", keyring)
    for _ in range(4):
        assert reader.heartbeats()["w-1"].status == Status.WAITING
    assert keyring.checked == 1
    path = folder.heartbeat_file("w-1")
    before, good = os.stat(path), path.read_text()
    record = json.loads(good)
    forged = {**record, "status": Status.STOPPED}          # "w-1 stopped": rounds would no longer wait for it
    text = good.replace('"status":"waiting"', '"status":"stopped"').replace(record["sha256"], record_checksum(forged))
    assert len(text) == len(good) and text != good
    with open(path, "r+", encoding="utf-8") as f:
        f.write(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert "w-1" not in reader.heartbeats() and "w-1" not in reader.heartbeats()
    assert "its signature is not 'w-1''s" in caplog.text
    node_exchange(folder, "w-1").write_heartbeat(beat("w-1", Status.TRAINING))    # w-1 beats again: shown again
    assert reader.heartbeats()["w-1"].status == Status.TRAINING
