"""The fast generation path (static KV cache, bucketed prompts) and the plain one agree on what they return."""

import pytest
import torch

from workers.learning.generation import bucketed_width, generate_ids, sample_completions
from workers.learning.model import load_policy

PROMPTS = ["State the final answer to the following arithmetic problem: 3 + 4 =\nAnswer:", "Calculate 2 + 2.\nAnswer:"]


@pytest.fixture(scope="module")
def policy(model_cache):
    return load_policy("rl-swarm/tiny-gpt2", "cpu", model_cache)


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


def _left_padded(policy, prompts):
    eos = policy.tokenizer.eos_token_id
    enc = [policy.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, enc))
    ids = torch.tensor([[eos] * (width - len(e)) + e for e in enc], device=policy.device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=policy.device)
    return ids, mask


@pytest.fixture()
def eos_prone(model_cache):
    """The tiny model with EOS made likely, so rows finish at different steps."""
    policy = load_policy("rl-swarm/tiny-gpt2", "cpu", model_cache)
    with torch.no_grad():
        policy.model.lm_head.weight[policy.tokenizer.eos_token_id] *= 40
    policy.model.eval()
    return policy


RAGGED = [*PROMPTS, "Hi", "What is 12 * 3? Think, then answer in tags."]


@pytest.mark.parametrize("min_new", [0, 6])
def test_our_gpt2_decoder_matches_generate_token_for_token(eos_prone, min_new):
    ids, mask = _left_padded(eos_prone, RAGGED)
    plain = generate_ids(eos_prone, ids, mask, 16, 1.0, greedy=True, fast=False, min_new_tokens=min_new)
    ours = generate_ids(eos_prone, ids, mask, 16, 1.0, greedy=True, fast=True, min_new_tokens=min_new)
    eos = eos_prone.tokenizer.eos_token_id
    new = plain[:, ids.shape[1]:]
    # the case under test: rows end at different steps, and generate stops when the last one does
    ends = [row.index(eos) if eos in row else None for row in new.tolist()]
    assert len(set(ends)) > 1 and all(e is None or e >= min_new for e in ends)
    assert ours.shape == plain.shape and torch.equal(ours, plain)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_our_gpt2_decoder_samples_from_softmax_over_temperature(model_cache, device):
    policy = load_policy("rl-swarm/tiny-gpt2", device, model_cache)
    with torch.no_grad():                        # sharper than the untrained model's near-uniform guess
        policy.model.lm_head.weight.mul_(2.5)
    policy.model.eval()
    draws = 6000
    ids, mask = _left_padded(policy, ["Calculate 2 + 2.\nAnswer:"] * draws)
    torch.manual_seed(0)
    first = generate_ids(policy, ids, mask, 1, 0.7, greedy=False, fast=True)[:, -1]
    with torch.no_grad():
        logits = policy.model(ids[:1]).logits[0, -1].double()
    first, logits = first.cpu(), logits.cpu()
    counts = torch.bincount(first, minlength=logits.numel()).double()

    def chi_square(temperature: float) -> float:
        """Pearson's statistic over the 10 likeliest tokens and the rest (10 degrees of freedom)."""
        probs = torch.softmax(logits / temperature, dim=-1)
        top = probs.topk(10).indices
        expected = draws * torch.cat([probs[top], 1 - probs[top].sum(0, keepdim=True)])
        seen = torch.cat([counts[top], draws - counts[top].sum(0, keepdim=True)])
        return float(((seen - expected) ** 2 / expected).sum())

    assert chi_square(0.7) < 29.6                # the 99.9% quantile of chi-square(10)
    # and the test can tell a wrong temperature (both are in the hundreds)
    assert chi_square(0.6) > 100 and chi_square(1.0) > 100


def test_the_decoder_sees_each_update_and_reuses_its_cache(eos_prone):
    ids, mask = _left_padded(eos_prone, RAGGED)
    before = generate_ids(eos_prone, ids, mask, 8, 1.0, greedy=True, fast=True)
    cache = eos_prone.decoder._cache
    with torch.no_grad():                        # an in-place update, as the optimizer makes
        for p in eos_prone.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    after = generate_ids(eos_prone, ids, mask, 8, 1.0, greedy=True, fast=True)
    plain = generate_ids(eos_prone, ids, mask, 8, 1.0, greedy=True, fast=False)
    assert torch.equal(after, plain) and not torch.equal(after, before)
    assert eos_prone.decoder._cache is cache     # same shapes: no new memory


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_decode_cache_release_frees_the_cache_and_samples_the_same(model_cache, device):
    """DECODE_CACHE=release: the cache (and on CUDA the graphs) go before the update, and the next round,
    allocated and captured again, draws what a kept cache would have drawn."""
    from workers.learning.decode import GPT2Decoder

    policy = load_policy("rl-swarm/tiny-gpt2", device, model_cache)
    policy.model.eval()
    ids, mask = _left_padded(policy, RAGGED * 2)
    eos = policy.tokenizer.eos_token_id
    kept, released = GPT2Decoder(policy.model), GPT2Decoder(policy.model)
    for round_ in range(3):
        outs = []
        for decoder in (kept, released):
            torch.manual_seed(round_)
            outs.append(decoder.generate(ids, mask, 24, 1.0, False, eos))
        released.release()
        assert torch.equal(outs[0], outs[1])
        assert released._cache is None and not released._steps and kept._cache is not None


@pytest.mark.gpu
def test_the_cuda_graph_replays_what_the_step_computes_eagerly(model_cache):
    from workers.learning.decode import GPT2Decoder

    policy = load_policy("rl-swarm/tiny-gpt2", "cuda", model_cache)
    with torch.no_grad():
        policy.model.lm_head.weight[policy.tokenizer.eos_token_id] *= 40
    policy.model.eval()
    ids, mask = _left_padded(policy, RAGGED * 4)
    eos = policy.tokenizer.eos_token_id
    graphed, eager = GPT2Decoder(policy.model), GPT2Decoder(policy.model, use_graphs=False)
    for greedy, min_new in ((True, 0), (False, 0), (False, 20)):
        outs = []
        for decoder in (graphed, eager, graphed):          # the second replay reuses the captured graph
            torch.manual_seed(7)
            outs.append(decoder.generate(ids, mask, 40, 0.9, greedy, eos, min_new_tokens=min_new))
        assert torch.equal(outs[0], outs[2])                # a replay depends on its inputs only
        # the graph and the eager step may pick different cuBLAS kernels: near-ties of an untrained model
        # can flip, so most tokens, not all, must agree
        n = min(outs[0].shape[1], outs[1].shape[1])
        assert (outs[0][:, :n] == outs[1][:, :n]).float().mean() > 0.9
        if min_new:
            assert (outs[0][:, ids.shape[1]:ids.shape[1] + min_new] != eos).all()
    assert graphed._steps and all(s.graph is not None for s in graphed._steps.values())


def test_fast_prompt_widths_are_bucketed_but_never_past_the_context(policy):
    context = policy.model.config.n_positions
    assert bucketed_width(policy, 5, 12) == 32                      # a bucket
    assert bucketed_width(policy, 5, context - 12) == 12            # what the context leaves, not 32
    ids, mask = _left_padded(policy, PROMPTS)
    assert torch.equal(generate_ids(policy, ids[:0], mask[:0], 8, 1.0, greedy=False, fast=True), ids[:0])
