"""The GRPO loss matches a hand-written float64 reference, masks by position, and moves the policy the right way."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from workers.grpo import build_batch, completion_logprobs, group_advantages, grpo_loss, grpo_step

EOS = 0


def tiny(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, eos_token_id=EOS, bos_token_id=EOS,
                                      pad_token_id=EOS)).double()


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    std = group_advantages(rewards, scale="std", eps=0.0 + 1e-4)
    assert torch.allclose(std[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (0.5 + 1e-4))
    assert torch.equal(std[1], torch.zeros(4))                    # no signal, exactly zero
    assert torch.allclose(group_advantages(rewards, scale="none")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def reference_loss(logp, old, adv, mask, ref, beta, lo, hi, normalize):
    """Token by token, in plain Python floats."""
    per_seq, total, tokens = [], 0.0, 0
    for i in range(len(logp)):
        seq_sum, seq_tokens = 0.0, 0
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - lo), 1 + hi)
            value = -min(ratio * adv[i], clipped * adv[i])
            if beta:
                d = ref[i][t] - logp[i][t]
                value += beta * (math.exp(d) - d - 1)
            seq_sum += value
            seq_tokens += 1
        per_seq.append(seq_sum / max(1, seq_tokens))
        total += seq_sum
        tokens += seq_tokens
    return total / tokens if normalize == "token" else sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_match_a_float64_reference(normalize, beta):
    torch.manual_seed(0)
    logp = (torch.randn(3, 5, dtype=torch.float64) - 2).requires_grad_()
    old = logp.detach() + torch.randn(3, 5, dtype=torch.float64) * 0.4        # ratios far enough to clip
    ref = logp.detach() + torch.randn(3, 5, dtype=torch.float64) * 0.2
    adv = torch.tensor([1.3, -0.7, 0.2], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float64)
    loss, stats = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=beta, normalize=normalize)
    args = (old.tolist(), adv.tolist(), mask.tolist(), ref.tolist(), beta, 0.2, 0.28, normalize)
    assert loss.item() == pytest.approx(reference_loss(logp.tolist(), *args), abs=1e-12)
    assert 0 < stats["clip_fraction"].item() < 1
    loss.backward()
    h = 1e-6                                         # central differences of the reference, per token
    for i in range(3):
        for t in range(5):
            up, down = logp.detach().clone(), logp.detach().clone()
            up[i, t] += h
            down[i, t] -= h
            numeric = (reference_loss(up.tolist(), *args) - reference_loss(down.tolist(), *args)) / (2 * h)
            assert logp.grad[i, t].item() == pytest.approx(numeric, abs=1e-7)


def test_padding_gets_no_gradient_and_eos_does():
    logp = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)       # token 1 is EOS, 2-3 padding
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0], dtype=torch.float64), mask)
    loss.backward()
    assert logp.grad[0, 1] != 0
    assert torch.equal(logp.grad[0, 2:], torch.zeros(2, dtype=torch.float64))


def test_completion_logprobs_equal_full_logits_and_ignore_left_padding():
    model = tiny()
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11, EOS], [12]]
    batch = build_batch(prompts, completions, pad_id=EOS)
    got = completion_logprobs(model, batch, chunk_size=2)                    # fewer rows per chunk than rows
    full = torch.log_softmax(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   position_ids=batch.position_ids).logits, dim=-1)
    p = batch.prompt_len
    for i, completion in enumerate(completions):
        for t, token in enumerate(completion):
            assert got[i, t].item() == pytest.approx(full[i, p + t - 1, token].item(), abs=1e-10)
    alone = completion_logprobs(model, build_batch([prompts[1]], [completions[1]], pad_id=EOS))
    assert got[1, 0].item() == pytest.approx(alone[0, 0].item(), abs=1e-10)    # padding changed nothing


def test_a_positive_advantage_raises_the_completions_log_probability():
    model = tiny()
    batch = build_batch([[5, 6], [5, 6]], [[10, 11, EOS], [20, 21, EOS]], pad_id=EOS)
    before = completion_logprobs(model, batch).detach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    grpo_step(model, optimizer, batch, torch.tensor([1.0, -1.0], dtype=torch.float64))
    after = completion_logprobs(model, batch).detach()
    assert after[0].sum() > before[0].sum()
    assert after[1].sum() < before[1].sum()


def test_micro_batches_give_the_gradient_of_the_whole_batch():
    batch = build_batch([[5, 6], [7], [8, 9, 3]], [[10, EOS], [11, 12, 13, EOS], [14]], pad_id=EOS)
    adv = torch.tensor([0.5, -1.0, 1.5], dtype=torch.float64)
    grads = []
    for micro in (None, 1):
        model = tiny()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        original = optimizer.zero_grad
        optimizer.zero_grad = lambda set_to_none=True: None      # keep the gradient to compare
        original()
        grpo_step(model, optimizer, batch, adv, micro_batch_size=micro, max_grad_norm=1e9)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-10)
