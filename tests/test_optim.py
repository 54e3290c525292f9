"""The memory savings of a GPU worker change how much it stores, not what it learns."""

import pytest
import torch

import workers.learning.optim as optim
from workers.learning.grpo import build_batch, grpo_step
from workers.learning.model import enable_activation_checkpointing, load_policy


def _loss(weights: list[torch.nn.Parameter]) -> torch.Tensor:
    return sum(((w - 3) ** 2).sum() + 0.01 * (w ** 4).sum() for w in weights)


def test_bf16_moment_adamw_follows_torch_adamw(monkeypatch):
    monkeypatch.setattr(optim, "PIECE", 1000)      # small pieces: a parameter is split across several updates
    torch.manual_seed(0)
    reference = [torch.nn.Parameter(torch.randn(3000)), torch.nn.Parameter(torch.randn(7, 50))]
    ours = [torch.nn.Parameter(w.detach().clone()) for w in reference]
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.01)
    bf16_adamw = optim.AdamWBf16Moments(ours, lr=1e-2, weight_decay=0.01)
    start = _loss(reference).item()
    for _ in range(200):
        for weights, optimizer in ((reference, torch_adamw), (ours, bf16_adamw)):
            optimizer.zero_grad()
            _loss(weights).backward()
            optimizer.step()
    assert _loss(reference).item() < 0.5 * start                  # it did learn
    assert abs(_loss(ours).item() - _loss(reference).item()) < 0.01 * _loss(reference).item()
    for a, b in zip(reference, ours):
        assert (a - b).abs().max() < 0.05                  # lr 1e-2: 200 steps apart by under 5 steps' size
    assert all(bf16_adamw.state[w]["exp_avg_sq"].dtype == torch.bfloat16 for w in ours)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_second_moment_still_decays_in_bf16(device):
    # 0.999 x v is under half a bf16 step from v: with round-to-nearest v would never decay
    weight = torch.nn.Parameter(torch.ones(50_000, device=device))
    optimizer = optim.AdamWBf16Moments([weight], lr=1e-3)          # on CUDA, the Triton step where it runs
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    first = optimizer.state[weight]["exp_avg_sq"].float().mean().item()
    for _ in range(300):
        weight.grad = torch.zeros_like(weight)
        optimizer.step()
    ratio = optimizer.state[weight]["exp_avg_sq"].float().mean().item() / first
    assert abs(ratio - 0.999 ** 300) < 0.01


def test_a_checkpoint_of_the_earlier_optimizer_with_its_noise_state_still_loads():
    weight = torch.nn.Parameter(torch.randn(100))
    optimizer = optim.AdamWBf16Moments([weight], lr=1e-3)
    weight.grad = torch.randn(100)
    optimizer.step()
    saved = optimizer.state_dict()
    saved["rounding_noise"] = torch.Generator().get_state()       # what versions before 2026-12-02 wrote
    restored = optim.AdamWBf16Moments([weight], lr=1e-3)
    restored.load_state_dict(saved)
    weight.grad = torch.randn(100)
    restored.step()
    assert int(restored.state[weight]["step"]) == 2 and "rounding_noise" not in restored.state_dict()


def test_a_parameter_that_skipped_steps_keeps_its_own_bias_correction():
    torch.manual_seed(0)
    reference = [torch.nn.Parameter(torch.randn(500)), torch.nn.Parameter(torch.randn(300))]
    ours = [torch.nn.Parameter(w.detach().clone()) for w in reference]
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2)
    bf16_adamw = optim.AdamWBf16Moments(ours, lr=1e-2)
    for k in range(21):
        moves = []
        for weights, optimizer in ((reference, torch_adamw), (ours, bf16_adamw)):
            before = [w.detach().clone() for w in weights]
            optimizer.zero_grad(set_to_none=True)
            # the second weight only takes part from step 20 on (its first step; the first weight's 21st)
            _loss(weights if k == 20 else weights[:1]).backward()
            optimizer.step()
            moves.append([(w.detach() - b).norm().item() for w, b in zip(weights, before)])
    (ref_first, ref_second), (our_first, our_second) = moves
    # each with its own bias correction: one step count for both would move one of them ~2x too far
    assert abs(our_first / ref_first - 1) < 0.05 and abs(our_second / ref_second - 1) < 0.05
    assert int(bf16_adamw.state[ours[1]]["step"]) == 1 and int(bf16_adamw.state[ours[0]]["step"]) == 21


def test_a_resumed_optimizer_keeps_bf16_moments_and_its_step_count():
    weight = torch.nn.Parameter(torch.randn(100))
    optimizer = optim.AdamWBf16Moments([weight], lr=1e-3)
    for _ in range(3):
        weight.grad = torch.randn(100)
        optimizer.step()
    restored = optim.AdamWBf16Moments([weight], lr=1e-3)
    restored.load_state_dict(optimizer.state_dict())
    weight.grad = torch.randn(100)
    restored.step()
    assert restored.state[weight]["exp_avg"].dtype == torch.bfloat16
    assert int(restored.state[weight]["step"]) == 4


def test_activation_checkpointing_gives_the_same_update(tmp_path):
    torch.manual_seed(0)
    batch_rows, advantages = None, torch.tensor([1.0, -1.0, 0.5, -0.5])
    results = []
    for checkpointed in (False, True):
        policy = load_policy("rl-swarm/tiny-gpt2", "cpu", tmp_path)
        if checkpointed:
            enable_activation_checkpointing(policy.model)
        policy.model.train()
        batch_rows = build_batch([[5, 6, 7], [8, 9]] * 2, [[10, 11, 12, 13], [14, 15], [16], [17, 18, 19]],
                                 pad_id=policy.tokenizer.eos_token_id)
        optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.1)
        stats = grpo_step(policy.model, optimizer, batch_rows, advantages, micro_batch_size=2, chunk_size=3)
        results.append((stats, [p.detach().clone() for p in policy.model.parameters()]))
    (plain, plain_weights), (ckpt, ckpt_weights) = results
    assert abs(plain["grad_norm"] - ckpt["grad_norm"]) < 1e-5 * max(1.0, plain["grad_norm"])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_weights, ckpt_weights))


def test_a_resumed_optimizer_rounds_exactly_as_the_uninterrupted_one():
    torch.manual_seed(0)
    grads = [torch.randn(5000) for _ in range(6)]
    start = torch.randn(5000)

    def run(resume_at: int | None) -> torch.Tensor:
        weight = torch.nn.Parameter(start.clone())
        optimizer = optim.AdamWBf16Moments([weight], lr=1e-3)
        for k, grad in enumerate(grads):
            if k == resume_at:                     # a new process: a new optimizer from the checkpoint
                saved = optimizer.state_dict()
                optimizer = optim.AdamWBf16Moments([weight], lr=1e-3)
                optimizer.load_state_dict(saved)
                # the moments are bf16 again at once, not at the first step (memory held until then)
                assert optimizer.state[weight]["exp_avg"].dtype == torch.bfloat16
            weight.grad = grad
            optimizer.step()
        return torch.cat([weight.detach(), optimizer.state[weight]["exp_avg_sq"].float()])

    # the stochastic rounding's noise resumes where it stopped: bit for bit the same run
    assert torch.equal(run(None), run(3))


def _bf16_neighbours(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bf16 values around each fp32 value (equal where it is exact)."""
    down = (value.view(torch.int32) & -65536).view(torch.float32)
    up = (down.view(torch.int32) + 65536).view(torch.float32)
    exact = down == value
    return down, torch.where(exact, down, up)


@pytest.mark.gpu
def test_the_triton_step_updates_as_the_torch_step_and_rounds_unbiased():
    if optim.triton is None:
        pytest.skip("Triton is not installed")
    assert optim._triton_runs(torch.device("cuda", 0))         # its self-check passes where Triton works
    torch.manual_seed(0)
    shapes = [(1_000_003,), (300, 77), (3,)]       # odd sizes: the last block of each is partial
    start = [torch.randn(s, device="cuda") for s in shapes]
    grads = [torch.randn(s, device="cuda") for s in shapes]
    runs = {}
    for use_triton in (True, False):
        weights = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = optim.AdamWBf16Moments(weights, lr=1e-2, weight_decay=0.01, use_triton=use_triton)
        for w, g in zip(weights, grads):
            w.grad = g.clone()
        optimizer.step()
        runs[use_triton] = (weights, optimizer)
    (fast, fast_opt), (slow, _) = runs[True], runs[False]
    for a, b, g in zip(fast, slow, grads):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)            # the first update is fp32 arithmetic
        exact = 0.1 * g                                                # the first moment after one step
        got = fast_opt.state[a]["exp_avg"].float()
        down, up = _bf16_neighbours(exact)
        assert bool(((got == down) | (got == up)).all())               # a neighbour, never further
    # unbiased: over a million elements the rounding errors average out to far under one spacing, for
    # positive and negative values apart (truncation toward zero errs both ways and would cancel overall)
    big, g = fast[0], grads[0]
    exact = 0.1 * g
    down, up = _bf16_neighbours(exact)
    # for a negative value `up` is the one further from zero, below `down`: the spacing is their distance
    spacing = torch.where(up != down, (up - down).abs(), torch.ones_like(up))
    error = (fast_opt.state[big]["exp_avg"].float() - exact) / spacing
    assert error.abs().max() < 1
    for side in (exact > 0, exact < 0):
        assert abs(error[side].mean().item()) < 0.005               # ~12 sigma of a uniform error's mean
        assert 0.3 < (error[side] > 0).float().mean().item() < 0.7  # it does round up, and down


@pytest.mark.gpu
def test_the_triton_step_learns_as_torch_adamw_does():
    if optim.triton is None:
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    reference = [torch.nn.Parameter(torch.randn(3000, device="cuda")),
                 torch.nn.Parameter(torch.randn(7, 50, device="cuda"))]
    ours = [torch.nn.Parameter(w.detach().clone()) for w in reference]
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.01)
    bf16_adamw = optim.AdamWBf16Moments(ours, lr=1e-2, weight_decay=0.01, use_triton=True)
    for _ in range(200):
        for weights, optimizer in ((reference, torch_adamw), (ours, bf16_adamw)):
            optimizer.zero_grad()
            _loss(weights).backward()
            optimizer.step()
    assert abs(_loss(ours).item() - _loss(reference).item()) < 0.01 * _loss(reference).item()
    for a, b in zip(reference, ours):
        assert (a - b).abs().max() < 0.05
