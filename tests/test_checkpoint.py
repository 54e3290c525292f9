"""Checkpoints restore weights, optimizer and RNG exactly; broken or foreign ones are never trusted."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from workers.checkpoint import CheckpointMeta, CheckpointMismatch, load_latest_checkpoint, save_checkpoint


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


def test_resume_restores_weights_optimizer_and_rng_exactly(tmp_path):
    model, optimizer = trained(0)
    torch.manual_seed(123)
    save_checkpoint(tmp_path, CheckpointMeta(5, "w-1", "rl-swarm/tiny-gpt2"), model, optimizer)
    expected_draw = torch.rand(3)

    fresh = tiny_model(1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    meta = load_latest_checkpoint(tmp_path, fresh, fresh_opt, "rl-swarm/tiny-gpt2")
    assert meta.round == 5
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(3), expected_draw)
    state = fresh_opt.state_dict()["state"]
    assert torch.equal(state[0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    # the tied lm_head still shares the embedding after loading
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    model, optimizer = trained(0)
    save_checkpoint(tmp_path, CheckpointMeta(1, "w-1", "m"), model, optimizer)
    save_checkpoint(tmp_path, CheckpointMeta(2, "w-1", "m"), model, optimizer)
    (tmp_path / "round_000002" / "model.safetensors").write_bytes(b"garbage")
    meta = load_latest_checkpoint(tmp_path, tiny_model(1), torch.optim.AdamW(tiny_model(1).parameters()), "m")
    assert meta.round == 1
    assert "round_000002 is unusable" in caplog.text


def test_only_the_last_two_checkpoints_are_kept_and_no_temp_folder_remains(tmp_path):
    model, optimizer = trained(0)
    for round_ in range(1, 5):
        save_checkpoint(tmp_path, CheckpointMeta(round_, "w-1", "m"), model, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_000003", "round_000004"]


def test_a_checkpoint_of_another_model_is_refused_with_one_line(tmp_path):
    model, optimizer = trained(0)
    save_checkpoint(tmp_path, CheckpointMeta(1, "w-1", "openai-community/gpt2"), model, optimizer)
    with pytest.raises(CheckpointMismatch, match="set MODEL_NAME=openai-community/gpt2 to resume"):
        load_latest_checkpoint(tmp_path, model, optimizer, "rl-swarm/tiny-gpt2")
