"""Measured pieces: generation plain vs fast, the naive log-probs a train step is compared with, scaling runs."""

import time
from pathlib import Path

import torch

from workers.learning.generation import generate_ids
from workers.learning.model import Policy, load_policy

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
