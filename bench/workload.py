"""Measured pieces: generation plain vs fast, a train step naive vs chunked, and a process for scaling runs."""

import time
from pathlib import Path

import torch

from workers.generation import generate_ids
from workers.grpo import build_batch, completion_logprobs
from workers.model import Policy, load_policy

MODEL = "rl-swarm/gpt2-124m-random"
PROMPT_LEN = 48


def prompts(policy: Policy, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(100, 50000, (batch, PROMPT_LEN), device=policy.device)
    return ids, torch.ones_like(ids)


def generation_tok_s(policy: Policy, batch: int, new_tokens: int, fast: bool, repeats: int = 3) -> float:
    """Completion tokens per second with every row forced to `new_tokens` (min_new_tokens), sampled at T=1."""
    ids, mask = prompts(policy, batch)
    generate_ids(policy, ids, mask, new_tokens, 1.0, greedy=False, fast=fast, min_new_tokens=new_tokens)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        out = generate_ids(policy, ids, mask, new_tokens, 1.0, greedy=False, fast=fast, min_new_tokens=new_tokens)
    torch.cuda.synchronize()
    assert out.shape[1] == PROMPT_LEN + new_tokens
    return repeats * batch * new_tokens / (time.perf_counter() - started)


def naive_logprobs(model: torch.nn.Module, batch) -> torch.Tensor:
    """The straightforward way: full-vocabulary logits for every position, then gather."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids).logits[:, batch.prompt_len - 1:-1].float()
    return torch.gather(torch.log_softmax(logits, -1), 2, batch.input_ids[:, batch.prompt_len:, None]).squeeze(2)


def train_step(policy: Policy, rows: int, completion_len: int, naive: bool, repeats: int = 5) -> dict[str, float]:
    model = policy.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    prompt = [list(range(100, 100 + PROMPT_LEN))] * rows
    completions = [list(range(200, 200 + completion_len))] * rows
    batch = build_batch(prompt, completions, pad_id=policy.tokenizer.eos_token_id, device=policy.device)
    adv = torch.randn(rows, device=policy.device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logp = naive_logprobs(model, batch) if naive else completion_logprobs(model, batch)
        loss = -(logp * adv[:, None] * batch.completion_mask).sum() / batch.completion_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return {"seconds": (time.perf_counter() - started) / repeats,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def scaling_process(cache_dir: str, seconds: float, batch: int, new_tokens: int, results) -> None:
    """One of N concurrent generators on the same GPU (spawn target)."""
    policy = load_policy(MODEL, "cuda:0", Path(cache_dir))
    ids, mask = prompts(policy, batch)
    generate_ids(policy, ids, mask, new_tokens, 1.0, greedy=False, fast=True, min_new_tokens=new_tokens)
    torch.cuda.synchronize()
    tokens, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        generate_ids(policy, ids, mask, new_tokens, 1.0, greedy=False, fast=True, min_new_tokens=new_tokens)
        tokens += batch * new_tokens
    torch.cuda.synchronize()
    results.put({"tokens": tokens, "seconds": time.perf_counter() - started,
                 "peak_gib": torch.cuda.max_memory_reserved() / 2**30})
