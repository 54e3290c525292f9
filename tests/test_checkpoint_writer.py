"""Checkpoints and best models are written behind the rounds: what is saved is the model as it was when saved,
training goes on while the write runs, and a write that fails is reported, never lost."""

import json
import threading

import pytest
import torch

from tests.test_checkpoint import tiny_model, trained
from workers.best_model import BestModel, read_best, save_best
from workers.checkpoint import CheckpointMeta, load_latest_checkpoint, snapshot_checkpoint, write_checkpoint
from workers.checkpoint_writer import BackgroundWriter
from workers.shared_folder.hostile import forger
from workers.host_copies import HostCopies
from workers.weights import host_weights, weight_tensors

WAIT_S = 30.0


def test_a_checkpoint_written_later_holds_the_model_as_it_was_when_saved(tmp_path, key):
    model, optimizer = trained(0)
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    saved_moment = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    snapshot = snapshot_checkpoint(CheckpointMeta(50, "w-1", "m"), model, optimizer)
    expected_draw = torch.rand(3)           # the RNG as it was when saved comes back on resume
    # training goes on before the write runs: another step changes every weight and moment in place
    model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()
    assert not torch.equal(model.transformer.wte.weight, saved["transformer.wte.weight"])

    write_checkpoint(tmp_path, snapshot, key)
    fresh = tiny_model(1)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert load_latest_checkpoint(tmp_path, fresh, fresh_optimizer, "m", key).round == 50
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], saved_moment)
    assert torch.equal(torch.rand(3), expected_draw)
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()    # still tied


def test_the_worker_goes_on_while_its_checkpoint_is_written(tmp_path, key):
    model, optimizer = trained(0)
    writer = BackgroundWriter("test")
    started, release = threading.Event(), threading.Event()
    snapshot = snapshot_checkpoint(CheckpointMeta(50, "w-1", "m"), model, optimizer)

    def slow_write() -> None:           # a Drive mount taking its time
        started.set()
        assert release.wait(WAIT_S)
        write_checkpoint(tmp_path, snapshot, key)

    writer.submit("checkpoint", 50, "checkpoint of round 50", slow_write)
    assert started.wait(WAIT_S)
    assert not writer.wait(0.05) and writer.finished() == []        # submit returned; the write still runs
    assert not (tmp_path / "round_000050").exists()
    release.set()
    assert writer.wait(WAIT_S)
    [written] = writer.finished()
    assert (written.kind, written.round, written.error) == ("checkpoint", 50, None)
    assert (tmp_path / "round_000050" / "meta.json").is_file()


def test_a_checkpoint_still_being_written_keeps_its_round_while_the_next_ones_are_taken(tmp_path, key, monkeypatch):
    """Snapshots are copied into host memory that earlier writes used (a fresh copy of GPT-2's ~0.95 GB costs
    its page faults inside the round): memory is reused only once the write that read it has ended, so a slow
    write never saves a later round's weights under its own round's name and SHA-256."""
    import workers.host_copies as host_copies

    monkeypatch.setattr(host_copies, "MIN_AVAILABLE", 0.0)      # whatever RAM the test's host has free
    model, optimizer = trained(0)
    copies, writer = HostCopies(), BackgroundWriter("test")
    started, release = threading.Event(), threading.Event()
    at_50 = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    snapshot_50 = snapshot_checkpoint(CheckpointMeta(50, "w-1", "m"), model, optimizer, copies)

    def slow_write() -> None:           # a Drive mount taking its time, while the worker plays on
        started.set()
        assert release.wait(WAIT_S)
        write_checkpoint(tmp_path, snapshot_50, key)

    writer.submit("checkpoint", 50, "checkpoint of round 50", slow_write, snapshot_50.release)
    assert started.wait(WAIT_S)
    model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()                    # round 51 changes every weight and moment in place
    snapshot_51 = snapshot_checkpoint(CheckpointMeta(51, "w-1", "m"), model, optimizer, copies)
    writer.submit("checkpoint", 51, "checkpoint of round 51",
                  lambda: write_checkpoint(tmp_path, snapshot_51, key), snapshot_51.release)
    release.set()
    assert writer.wait(WAIT_S) and [w.error for w in writer.finished()] == [None, None]

    fresh = tiny_model(1)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    (tmp_path / "round_000051" / "meta.json").unlink()        # so the newest whole checkpoint is round 50's
    assert load_latest_checkpoint(tmp_path, fresh, fresh_optimizer, "m", key).round == 50
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, at_50[name]), name
    # both writes ended: the next checkpoint is copied into memory one of them used, not into new memory
    used = {tensor.data_ptr() for snapshot in (snapshot_50, snapshot_51) for tensor in snapshot.weights.values()}
    snapshot_52 = snapshot_checkpoint(CheckpointMeta(52, "w-1", "m"), model, optimizer, copies)
    assert {tensor.data_ptr() for tensor in snapshot_52.weights.values()} <= used
    assert all(torch.equal(snapshot_52.weights[name], tensor) for name, tensor in weight_tensors(model).items())


def test_a_worker_on_a_host_short_of_ram_lets_its_checkpoint_copy_go(monkeypatch):
    """A copy is kept for the next checkpoint only while the host keeps a fifth of its RAM available: the 32
    workers of a SAPO table would keep ~30 GB between checkpoints, more than a small host has to spare."""
    import collections

    import workers.host_copies as host_copies

    model = tiny_model(0)
    memory = collections.namedtuple("memory", "available total")

    def copied_twice(available: int) -> bool:
        """Whether the second copy lands in the first one's memory, with `available` of 100 units of RAM."""
        monkeypatch.setattr(host_copies.psutil, "virtual_memory", lambda: memory(available, 100))
        copies = HostCopies()
        first, release = copies.copy(weight_tensors(model))
        used = {tensor.data_ptr() for tensor in first.values()}
        release()
        second, _ = copies.copy(weight_tensors(model))
        return {tensor.data_ptr() for tensor in second.values()} == used

    assert copied_twice(available=60)
    assert not copied_twice(available=10)


def test_a_write_that_fails_other_than_by_the_folder_crashes_the_worker():
    writer = BackgroundWriter("test")
    writer.submit("checkpoint", 50, "checkpoint of round 50", lambda: 1 / 0)
    assert writer.wait(WAIT_S)
    with pytest.raises(ZeroDivisionError):          # a bug, not the disk: raised in the worker's thread
        writer.finished()


def test_a_refused_write_is_handed_back_in_order_with_what_landed(tmp_path, key, monkeypatch):
    monkeypatch.setattr("workers.shared_folder.retries.backoff_s", lambda *_: 0.0)
    model, optimizer = trained(0)
    writer = BackgroundWriter("test")

    def refused() -> None:
        raise OSError(28, "No space left on device")

    writer.submit("checkpoint", 50, "checkpoint of round 50", refused)
    snapshot = snapshot_checkpoint(CheckpointMeta(51, "w-1", "m"), model, optimizer)
    writer.submit("checkpoint", 51, "checkpoint of round 51", lambda: write_checkpoint(tmp_path, snapshot, key))
    assert writer.wait(WAIT_S)
    first, second = writer.finished()
    assert first.round == 50 and isinstance(first.error, OSError) and "No space" in str(first.error)
    assert second.round == 51 and second.error is None


def test_a_best_model_whose_write_failed_is_saved_by_the_next_evaluation(tmp_path, key):
    model, _ = trained(0)
    best = BestModel(tmp_path, key, "m")
    assert best.offer(0, 0.5, model) is not None
    best.landed(0, ok=False)                 # the folder refused it: best/ holds nothing yet
    write = best.offer(50, 0.4, model)       # lower than the failed one, still the best on disk
    assert write is not None
    write()
    best.landed(50, ok=True)
    assert read_best(tmp_path, key)["held_out_accuracy"] == 0.4
    assert best.offer(100, 0.3, model) is None and best.offer(100, 0.6, model) is not None
    assert BestModel(tmp_path, key, "m").written == 0.4          # a restart still knows the score it must beat


def test_a_best_score_a_peer_wrote_never_stops_the_nodes_best_model_saves(tmp_path, key, caplog):
    """checkpoints/<node>/best/ is in the shared folder: a meta.json claiming 100% (unsigned, signed by another
    key, or the node's own beside a model that is not the one it signed for) is no score to beat."""
    model, _ = trained(0)
    save_best(tmp_path, key, "m", 3, 0.5, host_weights(model))
    ours = json.loads((tmp_path / "best" / "meta.json").read_text())
    claims = {"unsigned": {k: v for k, v in ours.items() if k != "signature"} | {"held_out_accuracy": 1.0},
              "signed by a peer": forger().sign({k: v for k, v in ours.items() if k != "signature"}
                                                | {"node": "w-1", "held_out_accuracy": 1.0}),
              "the node's beside another model": key.sign({k: v for k, v in ours.items() if k != "signature"}
                                                          | {"held_out_accuracy": 1.0})}
    for kind, claim in claims.items():
        (tmp_path / "best" / "meta.json").write_text(json.dumps(claim))
        if kind == "the node's beside another model":
            (tmp_path / "best" / "model.safetensors").write_bytes(b"a peer's weights")
        best = BestModel(tmp_path, key, "m")
        assert best.written is None and read_best(tmp_path, key) is None, kind
        write = best.offer(5, 0.9, model)                # a real 90% evaluation is saved as the best model
        assert write is not None, kind
        write()
        assert read_best(tmp_path, key)["held_out_accuracy"] == 0.9, kind
    assert "signature is not 'w-1'" in caplog.text
    assert "its model is not the one its meta.json signed for" in caplog.text


def test_a_new_best_evaluation_is_recorded_only_once_its_model_is_saved(tmp_path, monkeypatch):
    """A kill while the best model is written must not leave a best accuracy in eval.jsonl whose model is lost:
    the line comes after the model, so a restart finds no line and evaluates that round again."""
    import os
    from types import SimpleNamespace

    import workers.best_model as best_model_module
    import workers.worker as worker_module
    from configs_env import SwarmConfig
    from workers.shared_folder.folder import ExperimentFolder
    from workers.shared_folder.held_out import eval_file, read_held_out
    from workers.shared_folder.protocol import HeldOutEval
    from workers.worker import Worker, WorkerSpec

    cfg = SwarmConfig.from_env({"GDRIVE_PATH": str(tmp_path), "EXPERIMENT_NAME": "e",
                                "RL_SWARM_CACHE": str(tmp_path / "cache")})
    ExperimentFolder(cfg.experiment_dir).create()
    worker = Worker(WorkerSpec(cfg=cfg, node="w-1", index=0, model_name="m", device="cpu",
                               parent_pid=os.getppid()), threading.Event())
    worker.best = BestModel(worker.checkpoints, worker.exchange.key, "m")
    monkeypatch.setattr(worker_module, "evaluate_held_out",
                        lambda policy, cfg, questions, node, round_, splits: HeldOutEval(node, round_, 0.75, 10, 0.1))
    started, release = threading.Event(), threading.Event()
    save_best = best_model_module.save_best

    def slow_save_best(*args):          # a Drive mount taking its time, or a kill on the way
        started.set()
        assert release.wait(WAIT_S)
        return save_best(*args)

    monkeypatch.setattr(best_model_module, "save_best", slow_save_best)
    model, _ = trained(0)
    worker._evaluate(SimpleNamespace(policy=SimpleNamespace(model=model), splits=1), 50)
    assert started.wait(WAIT_S)
    path = eval_file(worker.folder, "w-1")
    ring = worker.exchange.keyring
    assert read_held_out(path, ring)[0] == [] and read_best(worker.checkpoints, worker.exchange.key) is None
    release.set()
    assert worker.writer.wait(WAIT_S)
    worker._writes_ended()
    assert [(row.round, row.accuracy) for row in read_held_out(path, ring)[0]] == [(50, 0.75)]
    assert read_best(worker.checkpoints, worker.exchange.key)["round"] == 50
