"""Checkpoints restore weights, optimizer and RNG exactly; broken or foreign ones are never trusted."""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from workers.checkpoint import (METRICS_TAIL, CheckpointMeta, CheckpointMismatch, load_latest_checkpoint,
                                rewrite_lost_records, save_checkpoint)
from workers.shared_folder.folder import ExperimentFolder
from workers.shared_folder.signing import NodeKey
from workers.shared_folder.jsonl import read_jsonl
from workers.shared_folder.protocol import RoundMetrics
from workers.shared_folder.exchange import read_signed
from tests.helpers import append_as, key_of_an_older_rl_swarm, keyring, node_key


def tiny_model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def trained(seed: int):
    model = tiny_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss
    loss.backward()
    optimizer.step()
    return model, optimizer


def test_resume_restores_weights_optimizer_and_rng_exactly(tmp_path, key):
    model, optimizer = trained(0)
    torch.manual_seed(123)
    save_checkpoint(tmp_path, CheckpointMeta(5, "w-1", "rl-swarm/tiny-gpt2"), model, optimizer, key)
    expected_draw = torch.rand(3)

    fresh = tiny_model(1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    meta = load_latest_checkpoint(tmp_path, fresh, fresh_opt, "rl-swarm/tiny-gpt2", key)
    assert meta.round == 5
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(3), expected_draw)
    state = fresh_opt.state_dict()["state"]
    assert torch.equal(state[0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    # the tied lm_head still shares the embedding after loading
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()


def test_a_resume_with_another_learning_rate_trains_at_the_new_one(tmp_path, key):
    """The resume says LEARNING_RATE changed and config.json records it: the update must use it, not the
    rate the checkpoint's optimizer was saved with (torch's load_state_dict brings that one back)."""
    model, optimizer = trained(0)          # at lr 1e-2
    save_checkpoint(tmp_path, CheckpointMeta(5, "w-1", "m"), model, optimizer, key)
    fresh = tiny_model(1)
    resumed = torch.optim.AdamW(fresh.parameters(), lr=3e-4)
    load_latest_checkpoint(tmp_path, fresh, resumed, "m", key)
    assert [group["lr"] for group in resumed.param_groups] == [3e-4]
    assert resumed.state_dict()["state"], "the moments came back with the checkpoint"


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, key, caplog):
    model, optimizer = trained(0)
    save_checkpoint(tmp_path, CheckpointMeta(1, "w-1", "m"), model, optimizer, key)
    save_checkpoint(tmp_path, CheckpointMeta(2, "w-1", "m"), model, optimizer, key)
    (tmp_path / "round_000002" / "model.safetensors").write_bytes(b"garbage")
    meta = load_latest_checkpoint(tmp_path, tiny_model(1), torch.optim.AdamW(tiny_model(1).parameters()), "m", key)
    assert meta.round == 1
    assert "round_000002 is unusable" in caplog.text


def test_only_the_last_two_checkpoints_are_kept_and_no_temp_folder_remains(tmp_path, key):
    model, optimizer = trained(0)
    for round_ in range(1, 5):
        save_checkpoint(tmp_path, CheckpointMeta(round_, "w-1", "m"), model, optimizer, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_000003", "round_000004"]


def test_a_checkpoint_of_another_model_is_refused_with_one_line(tmp_path, key):
    model, optimizer = trained(0)
    save_checkpoint(tmp_path, CheckpointMeta(1, "w-1", "openai-community/gpt2"), model, optimizer, key)
    with pytest.raises(CheckpointMismatch, match="set MODEL_NAME=openai-community/gpt2 to resume"):
        load_latest_checkpoint(tmp_path, model, optimizer, "rl-swarm/tiny-gpt2", key)


def round_metrics(round_: int, node: str = "w-1") -> RoundMetrics:
    return RoundMetrics(node=node, round=round_, reward_mean=0.1 * round_, accuracy=0.0, loss=0.5, local_groups=2,
                        external_groups=1, external_available=2, zero_advantage_groups=0, completions=8,
                        mean_completion_tokens=9.0, generate_s=1.0, fetch_s=0.1, train_s=0.2, round_s=1.3)


def test_python_and_numpy_rng_and_the_metrics_tail_come_back(tmp_path, key):
    model, optimizer = trained(0)
    random.seed(5)
    np.random.seed(6)
    tail = tuple(round_metrics(r) for r in range(1, 13))
    save_checkpoint(tmp_path, CheckpointMeta(12, "w-1", "m", tail), model, optimizer, key)
    expected = (random.random(), np.random.rand(3).tolist())
    random.seed(99)
    np.random.seed(99)
    meta = load_latest_checkpoint(tmp_path, tiny_model(1), torch.optim.AdamW(tiny_model(1).parameters()), "m", key)
    assert (random.random(), np.random.rand(3).tolist()) == expected
    assert meta.metrics_tail == tail[-METRICS_TAIL:]          # bounded: only the last rounds are kept
    assert "cuda_rng" not in torch.load(tmp_path / "round_000012" / "state.pt", weights_only=True)


def test_a_checkpoint_written_before_signed_checkpoints_still_loads_for_its_own_node_only(tmp_path, key):
    """An experiment upgraded mid-run keeps its checkpoints (schema 1: unsigned, no numpy RNG or metrics tail);
    a node whose key this rl-swarm made signs every checkpoint, so an unsigned one in its folder is a peer's."""
    model, optimizer = trained(0)
    save_checkpoint(tmp_path, CheckpointMeta(3, "w-1", "m"), model, optimizer, key)
    meta_file = tmp_path / "round_000003" / "meta.json"
    old = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: old[k] for k in ("round", "node", "model_name", "python_rng")} | {"schema": 1}))
    fresh = tiny_model(1)
    assert load_latest_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), "m", key) is None
    restarted = NodeKey.load_or_create(key.path.parent, "w-1")        # the same node, started again: still its own
    assert load_latest_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), "m", restarted) is None
    older = key_of_an_older_rl_swarm(key.path.parent, "w-1")          # a key from before signed checkpoints
    meta = load_latest_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), "m", older)
    assert meta.round == 3 and meta.metrics_tail == ()
    assert torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)


def test_a_key_from_before_its_marker_whose_checkpoints_are_all_signed_is_marked_and_refuses_unsigned_ones(
        tmp_path, key):
    """Keys made after signed checkpoints but before the marker beside them look like older keys: such a node took
    a peer's unsigned round for its own whenever its signed ones did not load. One whose checkpoints are all
    signed by its key has proven it signs: its start marks the key, and an unsigned round is no longer its own."""
    model, optimizer = trained(0)
    between = key_of_an_older_rl_swarm(key.path.parent, "w-1")
    save_checkpoint(tmp_path, CheckpointMeta(1, "w-1", "m"), model, optimizer, between)
    unsigned_copy(tmp_path / "round_000001", tmp_path / "round_000002")         # its own from before, maybe
    fresh = tiny_model(1)
    assert load_latest_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), "m", between).round == 1
    assert between.predates_signed_files                      # an unsigned one may be its own: not proven
    shutil.rmtree(tmp_path / "round_000002")
    assert load_latest_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), "m", between).round == 1
    assert not NodeKey.load_or_create(key.path.parent, "w-1").predates_signed_files      # marked on this machine
    unsigned_copy(tmp_path / "round_000001", tmp_path / "round_000009")         # a peer's, later
    (tmp_path / "round_000001" / "model.safetensors").write_bytes(b"torn")      # and its own unusable
    restarted = NodeKey.load_or_create(key.path.parent, "w-1")
    assert load_latest_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), "m", restarted) is None


def unsigned_copy(source: Path, target: Path) -> None:
    """A checkpoint as an rl-swarm before signed checkpoints wrote it (or a peer plants one): its files, and a
    meta.json with no signature and no SHA-256 of them."""
    shutil.copytree(source, target)
    meta = json.loads((source / "meta.json").read_text())
    (target / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("signature", "files")}
                                                 | {"round": int(target.name.removeprefix("round_"))}))


def test_a_checkpoint_a_peer_planted_is_never_resumed_from(tmp_path, key, caplog):
    """Newer rounds than the node's own, each skipped: unsigned, signed by another node, or its weights swapped."""
    model, optimizer = trained(0)
    save_checkpoint(tmp_path, CheckpointMeta(1, "w-1", "m"), model, optimizer, key)
    restarted = key_of_an_older_rl_swarm(key.path.parent, "w-1")     # unsigned ones are looked at too
    peer = NodeKey.load_or_create(tmp_path.parent / "peer.keys", "w-1")    # another machine, the same name
    forged, _ = trained(2)
    elsewhere = tmp_path.parent / f"{tmp_path.name}.elsewhere"      # made apart, then copied in as a peer would
    save_checkpoint(elsewhere, CheckpointMeta(7, "w-1", "m"), forged, optimizer, peer)
    save_checkpoint(elsewhere, CheckpointMeta(8, "w-1", "m"), model, optimizer, key)
    (elsewhere / "round_000008" / "model.safetensors").write_bytes(
        (elsewhere / "round_000007" / "model.safetensors").read_bytes())
    for round_ in ("round_000007", "round_000008"):
        shutil.copytree(elsewhere / round_, tmp_path / round_)
    planted = json.loads((tmp_path / "round_000001" / "meta.json").read_text())
    (tmp_path / "round_000009").mkdir()
    for name in ("model.safetensors", "state.pt"):
        (tmp_path / "round_000009" / name).write_bytes((tmp_path / "round_000007" / name).read_bytes())
    (tmp_path / "round_000009" / "meta.json").write_text(json.dumps(
        {k: v for k, v in planted.items() if k not in ("signature", "files")} | {"round": 9, "schema": 2}))
    fresh = tiny_model(1)
    meta = load_latest_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), "m", restarted)
    assert meta.round == 1 and torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)
    assert "round_000007 is unusable" in caplog.text and "signature is not 'w-1'" in caplog.text
    assert "round_000008/model.safetensors: not the file its signed meta.json names" in caplog.text
    # the node's next save keeps its own checkpoints: planted later rounds never push them out
    save_checkpoint(tmp_path, CheckpointMeta(2, "w-1", "m"), model, optimizer, key)
    assert {"round_000001", "round_000002"} <= {p.name for p in tmp_path.iterdir()}


def test_a_state_file_holding_code_is_never_run_and_the_older_checkpoint_is_used(tmp_path, key, caplog):
    model, optimizer = trained(0)
    save_checkpoint(tmp_path, CheckpointMeta(1, "w-1", "m"), model, optimizer, key)
    save_checkpoint(tmp_path, CheckpointMeta(2, "w-1", "m"), model, optimizer, key)
    marker = tmp_path / "ran"
    torch.save({"optimizer": Planted(str(marker))}, tmp_path / "round_000002" / "state.pt")
    meta = load_latest_checkpoint(tmp_path, tiny_model(1), torch.optim.AdamW(tiny_model(1).parameters()), "m", key)
    assert meta.round == 1 and not marker.exists()
    assert "round_000002 is unusable" in caplog.text


class Planted:
    """Unpickling this would create a file: what a hostile state.pt in the shared folder could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_kill_after_the_checkpoint_loses_no_metrics_line_or_rewards_file(tmp_path):
    folder = ExperimentFolder(tmp_path).create()
    model, optimizer = trained(0)
    for round_ in (1, 2):
        append_as(folder, "w-1", folder.metrics_file("w-1"), round_metrics(round_).to_json())
    tail = tuple(round_metrics(r) for r in (1, 2, 3))
    key = node_key(folder, "w-1")
    save_checkpoint(folder.checkpoint_dir("w-1"), CheckpointMeta(3, "w-1", "m", tail), model, optimizer, key)
    # the process died here: round 3's metrics line and rewards file (the coordinator's "done") are missing
    meta = load_latest_checkpoint(folder.checkpoint_dir("w-1"), model, optimizer, "m", key)
    assert rewrite_lost_records(folder, "w-1", meta, key) == ([3], set())
    assert [row["round"] for row in read_jsonl(folder.metrics_file("w-1"))] == [1, 2, 3]
    rewards = read_signed(folder.reward_file(3, "w-1"), "w-1", keyring(folder))     # the coordinator counts it
    assert rewards["reward_mean"] == pytest.approx(0.3)
    assert rewrite_lost_records(folder, "w-1", meta, key) == ([], set())     # a second restart adds nothing
    # round 4 recorded, then a kill before its checkpoint landed: the restart replays it, its line already there
    append_as(folder, "w-1", folder.metrics_file("w-1"), round_metrics(4).to_json())
    assert rewrite_lost_records(folder, "w-1", meta, key) == ([], {4})


@pytest.mark.gpu
def test_cuda_rng_of_every_device_is_restored(tmp_path, key):
    model, optimizer = trained(0)
    model.cuda()
    torch.cuda.manual_seed_all(7)
    save_checkpoint(tmp_path, CheckpointMeta(1, "w-1", "m"), model, optimizer, key)
    expected = [torch.rand(3, device=f"cuda:{d}").cpu() for d in range(torch.cuda.device_count())]
    torch.cuda.manual_seed_all(99)
    fresh = tiny_model(1).cuda()
    load_latest_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), "m", key)
    assert all(torch.equal(torch.rand(3, device=f"cuda:{d}").cpu(), expected[d])
               for d in range(torch.cuda.device_count()))


def test_a_checkpoint_the_disk_refuses_is_an_oserror_and_leaves_no_half_folder(tmp_path, key, monkeypatch):
    import workers.checkpoint as checkpoint_module

    model, optimizer = trained(0)
    save_checkpoint(tmp_path, CheckpointMeta(1, "w-1", "m"), model, optimizer, key)

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)     # how torch reports a full disk
    with pytest.raises(OSError, match="checkpoint of round 2 not written: .*PytorchStreamWriter failed"):
        save_checkpoint(tmp_path, CheckpointMeta(2, "w-1", "m"), model, optimizer, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_000001"]     # the old one intact, no temp folder


def test_a_checkpoint_the_drive_cannot_read_now_stops_the_resume_instead_of_starting_from_scratch(tmp_path, key,
                                                                                                monkeypatch):
    """An EIO is the mount, not the checkpoint: going on from the base would prune the trained checkpoints at the
    next saves. The worker exits instead, and its restart resumes once the Drive answers again."""
    import errno

    import workers.checkpoint as checkpoint_module

    monkeypatch.setattr("workers.shared_folder.retries.backoff_s", lambda *_: 0.0)
    model, optimizer = trained(0)
    save_checkpoint(tmp_path, CheckpointMeta(1, "w-1", "m"), model, optimizer, key)
    save_checkpoint(tmp_path, CheckpointMeta(2, "w-1", "m"), model, optimizer, key)
    read_checked = checkpoint_module.read_checked
    monkeypatch.setattr(checkpoint_module, "read_checked",
                        lambda *args, **kwargs: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    fresh = tiny_model(1)
    with pytest.raises(OSError, match="Input/output error"):
        load_latest_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), "m", key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_000001", "round_000002"]     # both still there
    monkeypatch.setattr(checkpoint_module, "read_checked", read_checked)      # the Drive is back
    assert load_latest_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), "m", key).round == 2


def plant_unsigned_checkpoint(root: Path, round_: int, model, optimizer) -> None:
    """A checkpoint as an rl-swarm before signed checkpoints wrote it (or a peer writes one): no signature."""
    made_by = NodeKey.load_or_create(root.parent / f"{root.name}.planter", "w-1")
    save_checkpoint(root, CheckpointMeta(round_, "w-1", "m"), model, optimizer, made_by)
    meta_file = root / f"round_{round_:06d}" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("signature", "files")} | {"schema": 2}))


def test_a_new_worker_that_up_starts_never_resumes_from_an_unsigned_checkpoint_a_peer_planted(tmp_path):
    """`up` makes each worker's key before the worker starts (so a worker never sees its key made): its first
    start must still take no unsigned checkpoint in its folder for its own."""
    from swarm_supervisor.cli import publish_worker_keys
    from configs_env import SwarmConfig
    from workers.shared_folder.signing import KeyRing
    from workers.worker import node_exchange as worker_exchange

    cfg = SwarmConfig(gdrive_path=tmp_path / "drive", experiment_name="e", cache_dir=tmp_path / "cache")
    folder = ExperimentFolder(cfg.experiment_dir).create()
    publish_worker_keys(cfg, folder, ["w-1"], KeyRing(folder))      # as `up` does, before starting its workers
    key = worker_exchange(folder, cfg, "w-1").key                    # the worker's first start
    planted, optimizer = trained(2)
    plant_unsigned_checkpoint(folder.checkpoint_dir("w-1"), 5, planted, optimizer)
    fresh = tiny_model(1)
    assert load_latest_checkpoint(folder.checkpoint_dir("w-1"), fresh, torch.optim.AdamW(fresh.parameters()), "m",
                                  key) is None
    assert not torch.equal(fresh.transformer.wte.weight, planted.transformer.wte.weight)


def test_a_round_saved_twice_whose_second_write_dies_at_the_rename_keeps_the_first(tmp_path, key, monkeypatch):
    """The same round saved again (a leaving worker's save of a round whose write had failed, say): the old folder
    was deleted before the new one was renamed in, so a kill between the two left no checkpoint of the round."""
    import os

    model, optimizer = trained(0)
    save_checkpoint(tmp_path, CheckpointMeta(3, "w-1", "m"), model, optimizer, key)
    rename = os.replace

    def killed_at_the_rename(source, target, *args, **kwargs):
        if Path(source).name.startswith(".round_000003.") and Path(source).name.endswith(".tmp"):
            raise OSError(5, "killed")
        return rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", killed_at_the_rename)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, CheckpointMeta(3, "w-1", "m"), trained(2)[0], optimizer, key)
    monkeypatch.setattr(os, "replace", rename)
    fresh = tiny_model(1)
    meta = load_latest_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()), "m", key)
    assert meta is not None and meta.round == 3
    assert torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)


def test_a_checkpoints_weights_load_with_safetensors_and_a_big_file_is_synced_as_it_is_written(tmp_path, monkeypatch):
    import workers.paced_files as paced

    tensors = {"h.0.w": torch.randn(3, 5), "steps": torch.arange(7), "moment": torch.randn(4).bfloat16(),
               "empty": torch.zeros(0), "scale": torch.tensor(2.5), "mask": torch.tensor([True, False])}
    paced.save_safetensors(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(ValueError, match="complex64"):
        paced.save_safetensors({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")

    # a file of 10 steps is synced at least once a step: the disk never holds more than a step unwritten
    synced = []
    monkeypatch.setattr(paced, "SYNC_EVERY", 1000)
    monkeypatch.setattr(paced.os, "fdatasync", lambda fd: synced.append(os.fstat(fd).st_size))
    with paced.PacedFile(tmp_path / "state.pt") as f:
        torch.save({"w": torch.randn(2500), "round": 3}, f)
    size = (tmp_path / "state.pt").stat().st_size
    assert size > 10_000 and synced[-1] == size
    assert max(b - a for a, b in zip([0, *synced], synced)) <= 1000 + 1000     # a step, and what was buffered
    assert torch.load(tmp_path / "state.pt", weights_only=True)["round"] == 3
    with pytest.raises(FileExistsError):           # never over an existing file, nor through a planted link
        paced.PacedFile(tmp_path / "state.pt")
