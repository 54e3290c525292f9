"""The GRPO update matches a hand-written float64 reference, masks by position, and moves the policy the right way."""

import copy
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from workers.learning.grpo import (build_batch, completion_logprobs, group_advantages, grpo_loss, grpo_step,
                                   head_logprobs)

EOS = 0          # GPT-2 pads with its EOS id; the tiny model does the same so position masking is exercised
VOCAB = 100


def tiny(seed: int = 0, dtype: torch.dtype = torch.float64) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, resid_pdrop=0,
                        embd_pdrop=0, attn_pdrop=0, eos_token_id=EOS, bos_token_id=EOS, pad_token_id=EOS)
    return GPT2LMHeadModel(config).to(dtype)


def full_logit_logprobs(model: GPT2LMHeadModel, batch) -> torch.Tensor:
    """The straightforward way: the model's own forward, log_softmax over every position, then gather."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids).logits
    p = batch.prompt_len
    targets = batch.input_ids[:, p:]
    return torch.gather(torch.log_softmax(logits[:, p - 1:-1], dim=-1), 2, targets[:, :, None]).squeeze(2)


class GradRecorder(torch.optim.SGD):
    """An optimizer that changes nothing and remembers the gradient it was handed."""

    def __init__(self, params) -> None:
        super().__init__(params, lr=0.0)
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None) -> None:
        self.grads.append(torch.cat([p.grad.flatten() for group in self.param_groups for p in group["params"]
                                     if p.grad is not None]))


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    std = group_advantages(rewards, scale="std", eps=1e-4)
    # mean 0.5, population std 0.5 (the sample std would be 0.577)
    assert torch.allclose(std[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (0.5 + 1e-4))
    assert torch.equal(std[1], torch.zeros(4))
    none = group_advantages(torch.tensor([[3.0, 1.0, 2.0]]), scale="none")
    assert torch.allclose(none, torch.tensor([[1.0, -1.0, 0.0]]))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, scale="rank")


def test_a_group_without_signal_gets_exactly_zero_even_when_its_mean_rounds():
    rewards = torch.full((1, 8), 0.1)                 # float32 mean of eight 0.1s is not 0.1
    assert rewards.mean() != rewards[0, 0]
    assert torch.equal(group_advantages(rewards), torch.zeros(1, 8))
    assert torch.equal(group_advantages(rewards, scale="none"), torch.zeros(1, 8))


def reference_loss(logp, old, adv, mask, ref, beta, lo, hi, normalize):
    """Loss, d loss / d logp and clip count, token by token in plain Python floats."""
    rows, width = len(logp), len(logp[0])
    values = [[0.0] * width for _ in range(rows)]
    slopes = [[0.0] * width for _ in range(rows)]
    clipped = 0
    for i in range(rows):
        for t in range(width):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            unclipped, bounded = ratio * adv[i], min(max(ratio, 1 - lo), 1 + hi) * adv[i]
            values[i][t] = -min(unclipped, bounded)
            # d(-ratio A)/d logp = -ratio A, unless the clipped branch is the smaller one and the clip is active
            clip_active = bounded < unclipped and not (1 - lo <= ratio <= 1 + hi)
            slopes[i][t] = 0.0 if clip_active else -ratio * adv[i]
            clipped += clip_active
            if beta:
                d = ref[i][t] - logp[i][t]
                values[i][t] += beta * (math.exp(d) - d - 1)
                slopes[i][t] += beta * (1 - math.exp(d))
    counts = [sum(1 for t in range(width) if mask[i][t]) for i in range(rows)]
    grad = [[0.0] * width for _ in range(rows)]
    if normalize == "token":
        total = sum(counts)
        loss = sum(sum(row) for row in values) / total
        for i in range(rows):
            for t in range(width):
                grad[i][t] = slopes[i][t] / total
    else:
        loss = sum(sum(values[i]) / max(1, counts[i]) for i in range(rows)) / rows
        for i in range(rows):
            for t in range(width):
                grad[i][t] = slopes[i][t] / max(1, counts[i]) / rows
    return loss, grad, clipped / sum(counts)


def test_an_update_whose_gradient_is_not_finite_leaves_the_weights_and_the_optimizer_alone():
    """Seen on the GPU: one NaN update made the worker's model NaN and its metrics unwritable, a crash loop."""
    model = tiny()
    batch = build_batch([[5, 6], [5, 6]], [[10, 11, EOS], [20, 21, EOS]], pad_id=EOS)
    weights = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    stats = grpo_step(model, optimizer, batch, torch.tensor([math.nan, -1.0], dtype=torch.float64))
    assert stats["skipped_steps"] == 1.0 and not math.isfinite(stats["grad_norm"])
    assert all(torch.equal(before, after) for before, after in zip(weights, model.parameters()))
    assert not optimizer.state                      # no moment took the NaN in
    assert all(p.grad is None for p in model.parameters())
    stats = grpo_step(model, optimizer, batch, torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert stats["skipped_steps"] == 0.0 and math.isfinite(stats["loss"])
    assert not all(torch.equal(before, after) for before, after in zip(weights, model.parameters()))


@pytest.mark.parametrize("normalize", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_match_a_float64_reference(normalize, beta):
    torch.manual_seed(0)
    logp = (torch.randn(4, 6, dtype=torch.float64) - 2).requires_grad_()
    old = logp.detach() + torch.randn(4, 6, dtype=torch.float64) * 0.5        # ratios far enough to clip
    ref = logp.detach() + torch.randn(4, 6, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.3, -0.7, 0.2, -1.1], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]],
                        dtype=torch.float64)
    loss, stats = grpo_loss(logp, old, adv, mask, ref_logp=ref if beta else None, beta=beta, normalize=normalize)
    expected, grad, clip_fraction = reference_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(),
                                                   ref.tolist(), beta, 0.2, 0.28, normalize)
    loss.backward()
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert torch.allclose(logp.grad, torch.tensor(grad, dtype=torch.float64), atol=1e-12, rtol=0)
    assert 0 < clip_fraction < 1                                   # the clipped branch really was exercised
    assert stats["clip_fraction"].item() == pytest.approx(clip_fraction, abs=1e-12)
    assert stats["loss"].item() == pytest.approx(expected, abs=1e-12)
    assert ("kl" in stats) == (beta > 0)


def test_padding_gets_no_gradient_and_eos_does():
    prompts, completions = [[5, 6], [7, 8, 9]], [[10, EOS], [11, 12, 13, EOS]]
    batch = build_batch(prompts, completions, pad_id=EOS)
    # the EOS at t=1 of row 0 has the pad id but is a completion token; t=2,3 are padding
    assert batch.completion_mask[0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert batch.input_ids[0, batch.prompt_len:].tolist() == [10, EOS, EOS, EOS]
    logp = completion_logprobs(tiny(), batch)
    logp.retain_grad()
    assert torch.equal(logp[0, 2:], torch.zeros(2, dtype=torch.float64))
    old = logp.detach().clone()
    old[0, 2:] = -1000.0                                  # garbage at padding must not leak in: exp(1000) overflows
    loss, _ = grpo_loss(logp, old, torch.tensor([1.0, -1.0]), batch.completion_mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert logp.grad[0, 1] != 0
    assert torch.equal(logp.grad[0, 2:], torch.zeros(2, dtype=torch.float64))


def test_completion_logprobs_equal_full_logits_and_ignore_left_padding():
    model = tiny(dtype=torch.float32)
    prompts, completions = [[5, 6, 7, 8], [9, 10], [11, 12, 13]], [[14, EOS], [15, 16, 17, EOS], [18]]
    batch = build_batch(prompts, completions, pad_id=EOS)
    with torch.no_grad():
        got = completion_logprobs(model, batch, chunk_size=3)            # 12 rows of (B x C) in 4 chunks
        full = full_logit_logprobs(model, batch)
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            n = len(completion)
            assert torch.allclose(got[i, :n], full[i, :n], atol=1e-5, rtol=0)
            alone = completion_logprobs(model, build_batch([prompt], [completion], pad_id=EOS))
            assert torch.allclose(got[i, :n], alone[0], atol=1e-5, rtol=0)     # padding changed nothing
        # the position ids are what makes this true: GPT-2 would otherwise count the left padding
        shifted = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        p = batch.prompt_len
        naive = torch.log_softmax(shifted[1, p - 1], dim=-1)[completions[1][0]]
        assert abs(naive.item() - got[1, 0].item()) > 1e-4


def test_chunked_logprobs_have_the_gradient_of_full_logits_and_keep_no_vocabulary_wide_tensor():
    batch = build_batch([[5, 6, 7], [8]], [[9, 10, EOS], [11, EOS]], pad_id=EOS)
    weights = torch.randn(2, 3, dtype=torch.float64) * batch.completion_mask
    grads, saved_shapes = [], []
    for chunked in (True, False):
        model = tiny()
        with torch.autograd.graph.saved_tensors_hooks(lambda t, c=chunked: saved_shapes.append((c, t.shape)) or t,
                                                      lambda t: t):
            logp = completion_logprobs(model, batch, chunk_size=4) if chunked else full_logit_logprobs(model, batch)
        (logp * weights).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-10, rtol=0)
    # backward recomputes each chunk's logits instead of holding (rows x vocab) for all of them
    assert not [s for chunked, s in saved_shapes if chunked and s[-1] == VOCAB]
    assert [s for chunked, s in saved_shapes if not chunked and s[-1] == VOCAB]      # the check can fail


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_head_logprobs_under_bf16_autocast_match_autocast_logits(device):
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 3000, bias=False, device=device)
    states = torch.randn(50, 64, device=device, requires_grad=True)
    targets = torch.randint(0, 3000, (50,), device=device)
    upstream = torch.randn(50, device=device)
    results = []
    for fused in (True, False):
        head.zero_grad()
        states.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):
            if fused:
                logp = head_logprobs(head, states, targets, chunk_size=16)
            else:
                logits = head(states).float()
                logp = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
        (logp * upstream).sum().backward()
        results.append((logp.detach(), states.grad.clone(), head.weight.grad.clone()))
    (ours, ours_ds, ours_dw), (ref, ref_ds, ref_dw) = results
    assert ours.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=1e-3, rtol=0)            # the same bf16 logits, fp32 softmax
    for got, want in ((ours_ds, ref_ds), (ours_dw, ref_dw)):
        assert (got - want).norm() < 0.02 * want.norm()           # bf16 rounding of the logits' gradient


@pytest.mark.gpu
def test_the_triton_softmax_of_the_head_matches_the_torch_one(monkeypatch):
    from workers.learning import softmax_kernels

    if softmax_kernels.triton is None:
        pytest.skip("Triton is not installed")
    assert softmax_kernels.available(torch.empty(2, 8, device="cuda", dtype=torch.bfloat16))   # its self-check
    torch.manual_seed(0)
    vocab = 50257                                    # GPT-2's: the last block of every row is partial
    head = torch.nn.Linear(64, vocab, bias=False, device="cuda")
    states = torch.randn(300, 64, device="cuda", requires_grad=True)
    targets = torch.randint(0, vocab, (300,), device="cuda")
    upstream = torch.randn(300, device="cuda")
    results = []
    for kernels in (True, False):
        if not kernels:
            monkeypatch.setattr(softmax_kernels, "triton", None)
        head.zero_grad()
        states.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logp = head_logprobs(head, states, targets, chunk_size=128)     # 3 chunks, the last one short
        (logp * upstream).sum().backward()
        results.append((logp.detach(), states.grad.clone(), head.weight.grad.clone()))
    (ours, ours_ds, ours_dw), (ref, ref_ds, ref_dw) = results
    assert torch.isfinite(ours).all() and torch.allclose(ours, ref, atol=1e-4, rtol=0)
    for got, want in ((ours_ds, ref_ds), (ours_dw, ref_dw)):
        assert (got - want).norm() < 5e-3 * want.norm()


@pytest.mark.gpu
def test_the_head_gradient_sums_chunks_in_fp32_on_cuda():
    from workers.learning.grpo import _accumulate_product, _fp32_out_addmm

    if not _fp32_out_addmm(torch.device("cuda", 0)):
        pytest.skip(f"torch {torch.__version__} has no addmm(out_dtype=): the bf16 product is added instead")
    torch.manual_seed(0)
    parts = [(torch.randn(256, 3000, device="cuda", dtype=torch.bfloat16),
              torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)) for _ in range(8)]
    acc = torch.zeros(3000, 64, device="cuda")
    for grad, states in parts:
        _accumulate_product(acc, grad.t(), states)
    want = sum(g.t().double() @ h.double() for g, h in parts)
    # a product rounded to bf16 before each addition would be ~2e-3 off
    assert ((acc.double() - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.gpu
def test_a_cuda_update_attends_without_cudnn_and_its_padded_batch_matches_the_math_kernel(model_cache):
    """On CUDA an update's attention skips cuDNN (a plan per new batch shape) while generation keeps it; the
    kernel the update gets gives a left-padded batch (fully masked query rows included) the log-probs and
    gradient of plain math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from workers.learning.model import load_policy, update_attention

    policy = load_policy("rl-swarm/tiny-gpt2", "cuda", model_cache)
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    batch = build_batch([[5, 6, 7, 8, 9, 10, 11], [5], [8, 9]], [[10, 11, 12, 13], [11, 12], [14]],
                        pad_id=policy.tokenizer.eos_token_id, device="cuda")
    results = []
    for kernels in (update_attention(policy.device), sdpa_kernel([SDPBackend.MATH])):
        policy.model.zero_grad(set_to_none=True)
        with kernels:
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            logp = completion_logprobs(policy.model, batch)
            (logp * batch.completion_mask).sum().backward()
        grad = torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None])
        results.append((logp.detach(), grad))
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn_before     # generation's kernels are untouched
    (logp, grad), (ref_logp, ref_grad) = results
    assert torch.isfinite(logp).all() and torch.isfinite(grad).all()
    assert torch.allclose(logp, ref_logp, atol=1e-4, rtol=0)
    assert (grad - ref_grad).norm() < 1e-3 * ref_grad.norm()


def test_a_positive_advantage_raises_the_completions_log_probability():
    model = tiny()
    batch = build_batch([[5, 6], [5, 6]], [[10, 11, EOS], [20, 21, EOS]], pad_id=EOS)
    before = completion_logprobs(model, batch).detach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    stats = grpo_step(model, optimizer, batch, torch.tensor([1.0, -1.0], dtype=torch.float64))
    after = completion_logprobs(model, batch).detach()
    assert after[0].sum() > before[0].sum()
    assert after[1].sum() < before[1].sum()
    assert stats["tokens"] == 6.0 and stats["clip_fraction"] == 0.0 and stats["grad_norm"] > 0
    assert all(isinstance(v, float) for v in stats.values())


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_micro_batches_give_the_gradient_of_the_whole_batch(normalize):
    batch = build_batch([[5, 6], [7], [8, 9, 3]], [[10, EOS], [11, 12, 13, EOS], [14]], pad_id=EOS)
    adv = torch.tensor([0.5, -1.0, 1.5], dtype=torch.float64)
    grads, losses = [], []
    for micro in (None, 2, 1):
        model = tiny()
        optimizer = GradRecorder(model.parameters())
        stats = grpo_step(model, optimizer, batch, adv, micro_batch_size=micro, normalize=normalize,
                          max_grad_norm=math.inf, chunk_size=3)
        grads.append(optimizer.grads[0])
        losses.append(stats["loss"])
    for g, loss in zip(grads[1:], losses[1:]):
        assert torch.allclose(grads[0], g, atol=1e-6, rtol=0)
        assert loss == pytest.approx(losses[0], abs=1e-12)


def test_later_iterations_measure_the_ratio_against_the_policy_before_the_first_step():
    batch = build_batch([[5, 6], [7]], [[10, 11, EOS], [12, EOS]], pad_id=EOS)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    stepped = tiny()
    stats = grpo_step(stepped, torch.optim.SGD(stepped.parameters(), lr=2.0), batch, adv, num_iterations=3,
                      max_grad_norm=math.inf)
    by_hand = tiny()
    optimizer = torch.optim.SGD(by_hand.parameters(), lr=2.0)
    with torch.no_grad():
        old = completion_logprobs(by_hand, batch)
    for _ in range(3):
        optimizer.zero_grad()
        loss, _ = grpo_loss(completion_logprobs(by_hand, batch), old, adv, batch.completion_mask)
        loss.backward()
        optimizer.step()
    assert stats["clip_fraction"] > 0                                # the policy moved far enough to clip
    for a, b in zip(stepped.parameters(), by_hand.parameters()):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_the_kl_term_pulls_towards_the_reference_model():
    batch = build_batch([[5, 6], [7]], [[10, 11, EOS], [12, EOS]], pad_id=EOS)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    model = tiny()
    same = GradRecorder(model.parameters())
    stats = grpo_step(model, same, batch, adv, ref_model=copy.deepcopy(model), beta=0.5, max_grad_norm=math.inf)
    plain = GradRecorder(model.parameters())
    grpo_step(model, plain, batch, adv, max_grad_norm=math.inf)
    # k3 and its gradient vanish where the policy equals the reference
    assert stats["kl"] == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(same.grads[0], plain.grads[0], atol=1e-12, rtol=0)
    other = tiny(seed=1)
    stats = grpo_step(model, GradRecorder(model.parameters()), batch, adv, ref_model=other, beta=0.5)
    assert stats["kl"] > 0


def test_a_head_with_a_bias_gets_its_log_probs_the_unfused_way():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, dtype=torch.float64)
    states = torch.randn(9, 16, dtype=torch.float64)
    targets = torch.randint(0, 40, (9,))
    got = head_logprobs(head, states, targets, chunk_size=4)
    want = torch.log_softmax(head(states), -1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
