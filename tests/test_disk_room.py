"""Before a swarm starts, a disk that will not hold its workers' checkpoints is named, with what they need."""

import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from swarm_supervisor import disk_room
from workers.checkpoint import CheckpointMeta, save_checkpoint
from workers.disk_need import KEEP_LAST, MOMENT_BYTES, WEIGHT_BYTES, bytes_under, worker_checkpoint_bytes
from workers.learning.memory import parameter_count
from workers.shared_folder.folder import ExperimentFolder

GIB = 1024 ** 3


def test_a_checkpoint_on_disk_takes_what_the_estimate_counts_for_one(tmp_path, key):
    config = GPT2Config(n_layer=2, n_embd=128, n_head=2, vocab_size=2000, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)         # the CPU's optimizer: fp32 moments
    model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()
    save_checkpoint(tmp_path, CheckpointMeta(1, "w-1", "m"), model, optimizer, key)
    estimate = parameter_count(config) * (WEIGHT_BYTES + MOMENT_BYTES[False])
    assert 0.95 * estimate < bytes_under(tmp_path) < 1.05 * estimate
    per_worker = worker_checkpoint_bytes(config, on_cuda=False)
    assert per_worker == (KEEP_LAST + 1) * estimate + parameter_count(config) * WEIGHT_BYTES


def test_a_disk_short_of_the_workers_checkpoints_is_named_and_what_they_hold_counts(tmp_path, monkeypatch):
    gpt2 = GPT2Config()                                                 # 124M parameters
    folder = ExperimentFolder(tmp_path / "drive" / "experiments" / "e").create()
    nodes = [f"worker-{i}" for i in range(1, 5)]
    need = 4 * worker_checkpoint_bytes(gpt2, on_cuda=True)
    held = folder.checkpoint_dir("worker-1") / "round_000050"
    held.mkdir(parents=True)
    (held / "model.safetensors").write_bytes(b"\0" * 4096)             # a resumed swarm's own checkpoint

    def free(nbytes: int):
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(disk_room.shutil, "disk_usage", lambda _: usage._replace(free=nbytes))
        return disk_room.disk_warning(tmp_path / "drive", [(folder, nodes)], gpt2, True, "gpt2")

    assert free(need - 4096) is None
    line = free(need - 4097)
    assert line is not None and "\n" not in line
    assert str(tmp_path / "drive") in line and "4 workers' checkpoints of gpt2" in line
    assert f"has {(need - 4097) / GIB:.1f} GiB free" in line and "GDRIVE_PATH on a larger disk" in line
    # GPT-2 124M on a GPU: three checkpoints of weights and bf16 moments, and the best weights, ~3.3 GiB a worker
    assert worker_checkpoint_bytes(gpt2, on_cuda=True) / GIB == pytest.approx(3.3, abs=0.1)
