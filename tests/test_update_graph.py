"""The update replayed from CUDA graphs trains as grpo_step does: on a batch padded to its bucket, on CPU the same
steps run eagerly, and on CUDA the replays match them."""

import math

import pytest
import torch

from tests.test_grpo import EOS, GradRecorder, tiny
from workers.learning.grpo import build_batch, grpo_step
from workers.learning.update_graph import COMPLETION_BUCKET, UpdateGraphs, bucket, pad_for_graphs

PROMPTS = [[5, 6], [7], [8, 9, 3], [4, 4, 4, 4], [6]]
COMPLETIONS = [[10, EOS], [11, 12, 13, EOS], [14], [15, 16], [17, 18, 19, 20, 21, EOS]]
ADVANTAGES = [0.5, -1.0, 1.5, -0.25, 0.75]


def padded_batch(prompts, completions, advantages, micro_batch, prompt_width, device="cpu", dtype=torch.float64):
    padded = pad_for_graphs(prompts, completions, torch.tensor(advantages, dtype=dtype, device=device), EOS,
                            micro_batch, prompt_width, max_new_tokens=64)
    batch = build_batch(padded.prompts, padded.completions, EOS, device, padded.prompt_width, padded.completion_width)
    return batch, padded


def test_a_round_is_padded_to_whole_micro_batches_and_its_completions_to_a_bucket():
    batch, padded = padded_batch(PROMPTS, COMPLETIONS, ADVANTAGES, micro_batch=4, prompt_width=8)
    assert batch.input_ids.shape == (8, 8 + COMPLETION_BUCKET) and padded.real_rows == 5
    assert batch.completion_mask[5:].sum() == 0 and padded.advantages[5:].eq(0).all()
    # every padding row attends to one token: a row with none would be NaN in attention
    assert batch.attention_mask[5:].sum(dim=1).eq(1).all()
    assert batch.completion_mask.sum() == sum(map(len, COMPLETIONS))
    assert [bucket(w, 32, 100) for w in (1, 32, 33, 99, 100)] == [32, 32, 64, 100, 100]


@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_the_step_on_a_padded_batch_is_grpo_steps_on_the_batch_itself(normalize):
    """The same weights, loss, clip fraction, ratio, gradient norm and token count: padding trains nothing."""
    batch = build_batch(PROMPTS, COMPLETIONS, EOS)
    adv = torch.tensor(ADVANTAGES, dtype=torch.float64)
    eager, graphed = tiny(), tiny()
    want = grpo_step(eager, torch.optim.AdamW(eager.parameters(), lr=1e-2), batch, adv, micro_batch_size=2,
                     normalize=normalize, chunk_size=3)
    padded, bucketed = padded_batch(PROMPTS, COMPLETIONS, ADVANTAGES, micro_batch=2, prompt_width=6)
    graphs = UpdateGraphs(graphed, micro_batch=2, chunk_size=3, normalize=normalize)
    assert not graphs.use_graphs                                  # on CPU the same steps run eagerly
    got = graphs.step(torch.optim.AdamW(graphed.parameters(), lr=1e-2), padded, bucketed.advantages,
                      bucketed.real_rows)
    assert got.keys() == want.keys()
    for name in want:                                   # the stats are summed in fp32, grpo_step's in the model's
        assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-9), name
    for a, b in zip(eager.parameters(), graphed.parameters()):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
    assert all(p.grad is None for p in graphed.parameters())     # nothing held between updates but its own


def test_a_step_whose_gradient_is_not_finite_is_skipped_and_the_next_one_trains():
    model = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = GradRecorder(model.parameters())
    graphs = UpdateGraphs(model, micro_batch=4, chunk_size=3)
    batch, padded = padded_batch(PROMPTS, COMPLETIONS, [math.nan] + ADVANTAGES[1:], 4, 6)
    stats = graphs.step(optimizer, batch, padded.advantages, padded.real_rows)
    assert stats["skipped_steps"] == 1.0 and not optimizer.grads
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    batch, padded = padded_batch(PROMPTS, COMPLETIONS, ADVANTAGES, 4, 6)
    stats = graphs.step(optimizer, batch, padded.advantages, padded.real_rows)
    assert stats["skipped_steps"] == 0.0 and torch.isfinite(optimizer.grads[0]).all()
    assert optimizer.grads[0].norm() > 0


def test_a_capture_that_fails_leaves_the_worker_eager_but_running_out_of_memory_is_not_taken_for_that(monkeypatch):
    """A model whose forward a capture refuses trains eagerly from then on (step() answers None: grpo_step serves);
    an out-of-memory error goes up to the worker, whose restart with smaller batches is the answer to it."""
    batch, padded = padded_batch(PROMPTS, COMPLETIONS, ADVANTAGES, 4, 6)
    refused = UpdateGraphs(tiny(), micro_batch=4, chunk_size=3, use_graphs=True)
    monkeypatch.setattr(refused, "_record", lambda capture: (_ for _ in ()).throw(
        RuntimeError("operation not permitted when stream is capturing")))
    assert refused.step(GradRecorder(refused.params), batch, padded.advantages, padded.real_rows) is None
    assert refused.broken == "RuntimeError: operation not permitted when stream is capturing"
    assert all(p.grad is None for p in refused.params)
    short = UpdateGraphs(tiny(), micro_batch=4, chunk_size=3, use_graphs=True)
    monkeypatch.setattr(short, "_record", lambda capture: (_ for _ in ()).throw(torch.OutOfMemoryError("no room")))
    with pytest.raises(torch.OutOfMemoryError):
        short.step(GradRecorder(short.params), batch, padded.advantages, padded.real_rows)
    assert short.broken is None


@pytest.mark.parametrize("other", ["KL_BETA=0.04", "STEPS_PER_ROUND=2"])
def test_update_graphs_on_with_what_they_cannot_hold_is_refused_in_one_line(other):
    from configs_env import ConfigError, SwarmConfig

    name, value = other.split("=")
    with pytest.raises(ConfigError) as refused:
        SwarmConfig.from_env({"UPDATE_GRAPHS": "on", name: value})
    assert str(refused.value) == (f"UPDATE_GRAPHS=on with {other}: the update's CUDA graphs hold one step without the "
                                  "KL term; set UPDATE_GRAPHS=auto (graphs where they apply) or off")
    assert not SwarmConfig.from_env({name: value}).graphed_update         # auto: eager there, without a word


@pytest.mark.gpu
def test_cuda_graph_replays_train_as_the_eager_steps(model_cache):
    """Three rounds of two shapes: the replays give the eager steps' weights and stats; one capture per shape."""
    from workers.learning.model import enable_activation_checkpointing, load_policy, update_attention
    from workers.learning.optim import make_optimizer

    rounds = [(PROMPTS, COMPLETIONS, ADVANTAGES), (PROMPTS[::-1], COMPLETIONS, ADVANTAGES[::-1]),
              (PROMPTS[:3], [c * 12 for c in COMPLETIONS[:3]], ADVANTAGES[:3])]
    results = []
    for use_graphs in (False, True):
        torch.manual_seed(0)
        policy = load_policy("rl-swarm/tiny-gpt2", "cuda", model_cache)
        enable_activation_checkpointing(policy.model)
        policy.model.train()
        optimizer = make_optimizer(policy.model, lr=1e-3)
        graphs = UpdateGraphs(policy.model, micro_batch=4, chunk_size=64, use_graphs=use_graphs)
        stats = []
        with update_attention(policy.device), torch.autocast("cuda", dtype=torch.bfloat16):
            for prompts, completions, advantages in rounds:
                batch, padded = padded_batch(prompts, completions, advantages, 4, 32, "cuda", torch.float32)
                stats.append(graphs.step(optimizer, batch, padded.advantages, padded.real_rows))
        assert graphs.broken is None
        results.append((stats, torch.cat([p.detach().flatten() for p in policy.model.parameters()]), graphs))
    (want, eager_weights, _), (got, graph_weights, graphs) = results
    assert len(graphs.captures) == 2 and all(c.graph is not None for c in graphs.captures.values())
    for a, b in zip(want, got):
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-3, abs=1e-5), name
    assert (graph_weights - eager_weights).norm() < 1e-4 * eager_weights.norm()
