"""The fast generation path (static KV cache, bucketed prompts) and the plain one agree on what they return."""

import pytest
import torch

from workers.generation import sample_completions
from workers.model import load_policy

PROMPTS = ["State the final answer to the following arithmetic problem: 3 + 4 =\nAnswer:", "Calculate 2 + 2.\nAnswer:"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    torch.set_num_threads(2)
    return load_policy("rl-swarm/tiny-gpt2", "cpu", tmp_path_factory.mktemp("cache"))


def test_fast_and_plain_paths_agree_on_shape_masking_and_eos(policy):
    eos = policy.tokenizer.eos_token_id
    for fast in (False, True):
        groups = sample_completions(policy, PROMPTS, num_generations=3, max_new_tokens=12, temperature=1.0,
                                    generator_seed=0, fast=fast)
        assert [len(g) for g in groups] == [3, 3]
        for prompt, group in zip(PROMPTS, groups):
            for c in group:
                # the prompt comes back unpadded, whatever bucket the batch was padded to
                assert list(c.prompt_ids) == policy.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                assert 1 <= len(c.ids) <= 12
                assert c.finished == (c.ids[-1] == eos) and eos not in c.ids[:-1]
                assert c.text == policy.tokenizer.decode([t for t in c.ids if t != eos])


def test_greedy_fast_equals_greedy_plain(policy):
    plain = sample_completions(policy, PROMPTS, 1, 12, 1.0, 0, greedy=True, fast=False)
    fast = sample_completions(policy, PROMPTS, 1, 12, 1.0, 0, greedy=True, fast=True)
    assert [g[0].ids for g in plain] == [g[0].ids for g in fast]     # padding to a bucket changes nothing
