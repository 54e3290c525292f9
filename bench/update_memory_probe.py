"""Where a worker's GPU memory goes with the update eager (UPDATE_GRAPHS=off) and from CUDA graphs (on): NVML and the
allocator after each phase of ten simulated rounds (the first with every completion MAX_NEW_TOKENS long, as the
rehearsal), then the allocator's segments by pool. Each shape and mode runs in a process of its own.

    python -m bench.update_memory_probe OUT      (on the GPU: OUT/memory_<shape>_<mode>.json, one a process)

bench/probes/update_memory_probe.json keeps a summary of those files (the peaks and the pools); NOTES.md reads it.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

SHAPES = {"default": (2, 2, 4), "paper": (4, 4, 8)}        # I, J, G
PROMPT = 48


def nvml_mib() -> float | None:
    """What NVML counts for this process on GPU 0."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    used = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == os.getpid()]
    return used[0] / 2**20 if used else None


def pools() -> dict[str, dict[str, float]]:
    """The allocator's segments summed by (pool, stream, size class): a graph's private pool is its own id."""
    found: dict[str, dict[str, float]] = {}
    for seg in torch.cuda.memory._snapshot()["segments"]:
        key = f"{seg.get('segment_pool_id')} stream={seg.get('stream')} {seg.get('segment_type')}"
        pool = found.setdefault(key, {"segments": 0, "reserved_mib": 0.0, "allocated_mib": 0.0})
        pool["segments"] += 1
        pool["reserved_mib"] += seg["total_size"] / 2**20
        pool["allocated_mib"] += seg["allocated_size"] / 2**20
    return found


def probe(shape: str, mode: str) -> dict:
    from configs_env import SwarmConfig
    from workers.learning.generation import generate_ids
    from workers.learning.model import enable_activation_checkpointing, load_policy, use_activation_checkpointing
    from workers.learning.optim import make_optimizer
    from workers.round_loop import TrainingGroup, release_cached_memory, train_on_groups

    i, j, g = SHAPES[shape]
    cfg = SwarmConfig.from_env({"NUM_TRAIN_SAMPLES": str(i), "NUM_TRANSPLANT_TREES": str(j), "NUM_GENERATIONS": str(g),
                                "UPDATE_GRAPHS": mode, "MODEL_NAME": "rl-swarm/gpt2-124m-random"})
    device = torch.device("cuda")
    policy = load_policy(cfg.model_name, device, cfg.cache_dir)
    optimizer = make_optimizer(policy.model, 1e-6)
    if use_activation_checkpointing(cfg.gradient_checkpointing, device):
        enable_activation_checkpointing(policy.model)
    optimizer.allocate_state()
    rng, eos, longest = random.Random(0), policy.tokenizer.eos_token_id, cfg.max_new_tokens
    phases = []

    def mark(tag: str) -> None:
        torch.cuda.synchronize()
        phases.append({"tag": tag, "nvml_mib": nvml_mib(), "allocated_mib": torch.cuda.memory_allocated() / 2**20,
                       "reserved_mib": torch.cuda.memory_reserved() / 2**20,
                       "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20})

    mark("loaded")
    for round_ in range(10):
        prompts = torch.tensor([[rng.randrange(100, 30000) for _ in range(PROMPT)] for _ in range(i)], device=device)
        prompts = prompts.repeat_interleave(g, 0)
        out = generate_ids(policy, prompts, torch.ones_like(prompts), longest, cfg.temperature, greedy=False,
                           fast=True, min_new_tokens=longest if round_ == 0 else 0)
        release_cached_memory(device)
        mark(f"round {round_} generated")
        sampled = out[:, PROMPT:].tolist()
        groups = []
        for group in range(i + j):
            lengths = [longest if round_ == 0 else rng.choice([8, 16, 40, 90, 160, longest]) for _ in range(g)]
            completions = [sampled[(group * g + k) % len(sampled)][:n - 1] + [eos] for k, n in enumerate(lengths)]
            rewards = [rng.random() for _ in range(g)]
            groups.append(TrainingGroup(prompts[(group % i) * g].tolist(), completions, rewards))
        train_on_groups(policy, optimizer, cfg, groups)
        release_cached_memory(device)
        mark(f"round {round_} trained")
    graphs = policy.update_graphs
    return {"shape": shape, "mode": mode, "phases": phases, "pools": pools(),
            "captures": sorted(map(list, graphs.captures)) if graphs else [],
            "update_graph_gradients_mib": sum(t.numel() * 4 for t in graphs.grads) / 2**20 if graphs else 0}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for shape in SHAPES:
        for mode in ("off", "on"):
            path = out / f"memory_{shape}_{mode}.json"
            subprocess.run([sys.executable, "-m", "bench.update_memory_probe", "--one", shape, mode, str(path)],
                           check=True, timeout=600)
            result = json.loads(path.read_text())
            print(shape, mode, "NVML peak", max(p["nvml_mib"] or 0 for p in result["phases"]), "MiB", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        Path(sys.argv[4]).write_text(json.dumps(probe(sys.argv[2], sys.argv[3]), indent=1))
    else:
        main(Path(sys.argv[1]))
