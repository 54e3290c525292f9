"""What a checkpoint round costs a GPT-2 124M worker: the snapshot (device -> host, inside the round), into new
host memory and into the memory the previous write used (as a worker copies it, workers/host_copies.py), the
write (behind it, in the worker's writer thread), the best model's copy, and whether a write slows GPU work
beside it.

    python -m bench.checkpoint_probe [cpu]     (on the GPU; bench/probes/checkpoint_cost.txt, NOTES.md)
"""

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from workers.checkpoint import CheckpointMeta, snapshot_checkpoint, write_checkpoint
from workers.host_copies import HostCopies
from workers.learning.model import load_policy
from workers.learning.optim import make_optimizer
from workers.shared_folder.signing import NodeKey
from workers.weights import host_weights


def timed(what: str, step) -> object:  # noqa: ANN001 - any callable
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = step()
    print(f"{what}: {time.perf_counter() - wall:.3f} s ({time.process_time() - cpu:.3f} s of CPU)", flush=True)
    return result


def gpu_work(x: torch.Tensor, steps: int = 200) -> float:
    """Seconds of matmuls the host waits on step by step, as a round's generation does."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        (x @ x).sum().item()
    return time.perf_counter() - started


def main() -> None:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    if device.type == "cpu":
        torch.set_num_threads(1)          # as a worker on the CPU
    cache = Path(os.environ.get("RL_SWARM_CACHE") or tempfile.mkdtemp())     # the offline model is built there
    policy = load_policy("rl-swarm/gpt2-124m-random", device, cache)
    optimizer = make_optimizer(policy.model, 1e-6)
    for param in policy.model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()                      # moments and step counts, as a checkpoint of a trained worker holds
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root)
        key = NodeKey.load_or_create(folder / "keys", "worker-1")
        meta = CheckpointMeta(1, "worker-1", policy.name, ())
        copies = HostCopies()
        for _ in range(3):
            timed("snapshot_checkpoint into new memory", lambda: snapshot_checkpoint(meta, policy.model, optimizer))
            timed("host_weights (the best model's copy) into new memory", lambda: host_weights(policy.model))
            snapshot = timed("snapshot_checkpoint into the previous write's memory",
                             lambda: snapshot_checkpoint(meta, policy.model, optimizer, copies))
            timed("write_checkpoint", lambda s=snapshot: write_checkpoint(folder / "checkpoints", s, key))
            snapshot.release()            # as the writer thread does: the next snapshot reuses this memory
        if device.type != "cuda":
            return
        x = torch.randn(4096, 4096, device=device)
        gpu_work(x, 20)                   # cuBLAS's first calls, outside the timing
        print(f"GPU work alone: {gpu_work(x):.3f} s", flush=True)
        snapshot = snapshot_checkpoint(meta, policy.model, optimizer)
        writer = threading.Thread(target=write_checkpoint, args=(folder / "checkpoints", snapshot, key))
        writer.start()
        print(f"GPU work beside a write: {gpu_work(x):.3f} s (the write still running: {writer.is_alive()})")
        writer.join()


if __name__ == "__main__":
    main()
