"""`python -m bench.memory_probe OUT.json`: where a worker's GPU memory goes, and what each saving buys.

Part 1 times one update of 16 rows x 256 completion tokens under several training set-ups (peak memory
from the allocator). Part 2 runs a worker-like loop (generate, then train, ten times) in a fresh process
per set-up and samples the process's memory from NVML, CUDA context included, as the supervisor sees it.
"""

import gc
import json
import os
import queue as queue_module
import sys
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.workload import MODEL, PROMPT_LEN, naive_logprobs
from workers.learning.generation import generate_ids
from workers.learning.grpo import build_batch, grpo_step
from workers.learning.model import enable_activation_checkpointing, load_policy, update_attention
from workers.learning.optim import AdamWBf16Moments
from workers.learning.update_graph import UpdateGraphs
from workers.processes import cuda_env_defaults

GIB = 2**30


def _batch(policy, rows: int, completion_len: int):
    prompt = [list(range(100, 100 + PROMPT_LEN))] * rows
    completions = [list(range(200, 200 + completion_len))] * rows
    return build_batch(prompt, completions, pad_id=policy.tokenizer.eos_token_id, device=policy.device)


def _optimizer(model, kind: str):
    if kind in ("bf16", "bf16-torch"):         # bf16-torch: the step in torch kernels even where Triton is
        return AdamWBf16Moments(model.parameters(), lr=1e-6, use_triton=False if kind == "bf16-torch" else None)
    return torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, fused=True)


def _step(policy, optimizer, batch, adv, setup: dict, graphs: UpdateGraphs | None = None) -> None:
    model = policy.model
    if graphs is not None:          # as round_loop.train_on_groups runs it
        with update_attention(policy.device), torch.autocast("cuda", dtype=torch.bfloat16):
            stats = graphs.step(optimizer, batch, adv, real_rows=batch.input_ids.shape[0])
        if stats is None:           # a worker would train this batch eagerly: a timed no-op is no row
            raise RuntimeError(f"no update graph served the batch: {graphs.broken or 'no capture for its shape'}")
    elif setup["path"] == "naive":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logp = naive_logprobs(model, batch)
        loss = -(logp * adv[:, None] * batch.completion_mask).sum() / batch.completion_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            grpo_step(model, optimizer, batch, adv, chunk_size=setup["chunk"], micro_batch_size=setup["micro"])


# what a worker does on CUDA with UPDATE_GRAPHS=off (workers/round_loop.py, workers/learning/optim.py,
# GRADIENT_CHECKPOINTING=auto)
WORKER_SETUP = {"name": "ours, eager as with UPDATE_GRAPHS=off (checkpointing, chunk 256, micro 16, bf16 moments)",
                "path": "ours", "chunk": 256, "micro": 16, "opt": "bf16", "ckpt": True, "gen_rows": 8,
                "empty_cache": True}
# the same, as a worker runs it on CUDA by default (UPDATE_GRAPHS=auto where the GPU has room)
GRAPHS_SETUP = {**WORKER_SETUP, "path": "graphs", "name": "ours: the worker's update replayed from CUDA graphs "
                "(checkpointing, chunk 256, micro 16, bf16 moments)"}
NAIVE_SETUP = {"name": "naive: full logits, one batch, fp32 fused AdamW", "path": "naive", "opt": "fp32"}


def train_setups() -> list[dict]:
    return [
        {"name": "naive full logits, fp32 AdamW", "path": "naive", "opt": "fp32"},
        {"name": "ours chunk1024 micro16 fp32", "path": "ours", "chunk": 1024, "micro": 16, "opt": "fp32"},
        {"name": "ours chunk1024 micro8 fp32 (swarm before)", "path": "ours", "chunk": 1024, "micro": 8, "opt": "fp32"},
        {"name": "ours chunk256 micro8 fp32", "path": "ours", "chunk": 256, "micro": 8, "opt": "fp32"},
        {"name": "ours chunk256 micro8 bf16", "path": "ours", "chunk": 256, "micro": 8, "opt": "bf16"},
        {"name": "ours chunk256 micro4 bf16", "path": "ours", "chunk": 256, "micro": 4, "opt": "bf16"},
        {"name": "ours chunk256 micro16 bf16 ckpt", "path": "ours", "chunk": 256, "micro": 16, "opt": "bf16",
         "ckpt": True},
        {"name": "ours chunk256 micro8 bf16 ckpt", "path": "ours", "chunk": 256, "micro": 8, "opt": "bf16",
         "ckpt": True},
        {"name": "ours chunk256 micro8 bf16 eager", "path": "ours", "chunk": 256, "micro": 8, "opt": "bf16",
         "attn": "eager"},
    ]


def measure_train(cache: Path, setup: dict, rows: int = 16, completion_len: int = 256, repeats: int = 10) -> dict:
    policy = load_policy(MODEL, "cuda:0", cache)
    if setup.get("attn"):
        policy.model.config._attn_implementation = setup["attn"]
    if setup.get("ckpt"):
        enable_activation_checkpointing(policy.model)
    policy.model.train()
    optimizer = _optimizer(policy.model, setup["opt"])
    batch = _batch(policy, rows, completion_len)
    adv = torch.randn(rows, device=policy.device)
    # its capture happens in the first step; its pool stays reserved, so compare graphs by reserved memory
    graphs = UpdateGraphs(policy.model, setup["micro"], setup["chunk"]) if setup["path"] == "graphs" else None
    _step(policy, optimizer, batch, adv, setup, graphs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(repeats):
        _step(policy, optimizer, batch, adv, setup, graphs)
    torch.cuda.synchronize()
    out = {**setup, "seconds": (time.perf_counter() - started) / repeats,
           "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
           "attn_impl": policy.model.config._attn_implementation}
    del policy, optimizer, batch, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _nvml_sampler(pid: int, stop: threading.Event, peak: list) -> None:
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    while not stop.wait(0.02):
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory:
                peak[0] = max(peak[0], proc.usedGpuMemory)


def worker_peak(cache: Path, setup: dict, cycles: int = 8) -> dict:
    """worker_loop in a fresh process, so NVML sees one process's whole footprint."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=worker_loop, args=(str(cache), setup, cycles, queue))
    proc.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            row = queue.get(timeout=5)
            proc.join(timeout=60)
            return row
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the worker-loop process exited with code {proc.exitcode} and no result") from None
    proc.kill()
    raise TimeoutError("the worker-loop process gave no result in 300 s")


def worker_loop(cache: str, setup: dict, cycles: int, results) -> None:
    """Spawn target: what one worker does each round, at the worst case (every completion 256 tokens)."""
    cuda_env_defaults()
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_nvml_sampler, args=(os.getpid(), stop, peak), daemon=True)
    sampler.start()
    policy = load_policy(MODEL, "cuda:0", Path(cache))
    if setup.get("ckpt"):
        enable_activation_checkpointing(policy.model)
    optimizer = _optimizer(policy.model, setup["opt"])
    ids = torch.randint(100, 50000, (setup["gen_rows"], PROMPT_LEN), device=policy.device)
    batch = _batch(policy, 16, 256)
    adv = torch.randn(16, device=policy.device)
    per_cycle = []
    for _ in range(cycles):
        policy.model.eval()
        generate_ids(policy, ids, torch.ones_like(ids), 256, 1.0, greedy=False, fast=True, min_new_tokens=256)
        if setup.get("empty_cache"):
            torch.cuda.empty_cache()
        policy.model.train()
        _step(policy, optimizer, batch, adv, setup)
        if setup.get("empty_cache"):
            torch.cuda.empty_cache()
        torch.cuda.synchronize()
        time.sleep(0.05)
        per_cycle.append(peak[0] / GIB)
    stop.set()
    sampler.join(timeout=5)
    results.put({**setup, "nvml_peak_gib": peak[0] / GIB, "nvml_peak_by_cycle": per_cycle,
                 "torch_peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB})


def worker_setups() -> list[dict]:
    return [
        {"name": "swarm before: fp32 AdamW chunk1024 micro8", "opt": "fp32", "path": "ours", "chunk": 1024,
         "micro": 8, "gen_rows": 8},
        {"name": "bf16 moments chunk256 micro8", "opt": "bf16", "path": "ours", "chunk": 256, "micro": 8,
         "gen_rows": 8},
        {"name": "bf16 moments chunk256 micro8 empty_cache", "opt": "bf16", "path": "ours", "chunk": 256,
         "micro": 8, "gen_rows": 8, "empty_cache": True},
        {"name": "bf16 moments chunk256 micro4 empty_cache", "opt": "bf16", "path": "ours", "chunk": 256,
         "micro": 4, "gen_rows": 8, "empty_cache": True},
        {"name": "bf16 moments chunk256 micro8 ckpt empty_cache", "opt": "bf16", "path": "ours", "chunk": 256,
         "micro": 8, "gen_rows": 8, "empty_cache": True, "ckpt": True},
    ]


def main() -> None:
    out = Path(sys.argv[1])
    cache = Path(os.environ.get("RL_SWARM_CACHE", "/tmp/rlcache"))
    results: dict = {"device": torch.cuda.get_device_name(0), "train": [], "worker": []}
    for setup in train_setups():
        row = measure_train(cache, setup)
        print(json.dumps(row), flush=True)
        results["train"].append(row)
        out.write_text(json.dumps(results, indent=2))
    for setup in worker_setups():
        row = worker_peak(cache, setup)
        print(json.dumps(row), flush=True)
        results["worker"].append(row)
        out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
