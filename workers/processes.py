"""The processes a supervisor starts, as it sees them: a worker's spec and what its exit codes mean, and the
targets of the worker and warm-up processes.

Torch-free: the supervisor loads none of the learning code (torch, transformers, the tasks' reasoning-gym); each
process imports it itself as it starts, in `start_worker` and `start_warmup`.
"""

import ctypes
import gc
import hashlib
import os
import signal
from dataclasses import dataclass
from typing import Any

from configs_env import SwarmConfig

EXIT_CRASH, EXIT_CONFIG, EXIT_ORPHANED, EXIT_OUT_OF_MEMORY, EXIT_NO_COORDINATOR = 1, 2, 3, 4, 5
# a coordinator may start after its workers, or restart: a worker waits this many PEER_TIMEOUTs for one, then
# exits to be restarted (the supervisor's restart policy decides how often), never failed as misconfigured
COORDINATOR_PATIENCE = 10


@dataclass(frozen=True)
class WorkerSpec:
    cfg: SwarmConfig
    node: str
    index: int
    model_name: str
    device: str
    parent_pid: int
    generation_splits: int = 1    # doubled by the supervisor after each CUDA out-of-memory exit


# Indexes of the workers of a machine that joined: a worker's questions and sampling seeds follow SEED + its index
# (worker.py, round_loop.round_seed), and the coordinator's machine numbers its own 0..N-1, as every joined machine
# would too. Far from the warm-up's SEED + 7919 and below the held-out set's seeds (evaluation.EVAL_SEED).
JOINED_INDEXES = (10_000, 910_000)


def joined_index(node: str) -> int:
    """A joined worker's index, from its name (NODE_IDs are unique in a swarm): its draws differ from every other
    worker's, and stay the same across its restarts."""
    low, high = JOINED_INDEXES
    return low + int.from_bytes(hashlib.sha256(node.encode()).digest()[:8], "big") % (high - low)


PR_SET_PDEATHSIG = 1      # prctl(2): a signal to this process when the thread that started it ends


def stop_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """`sig` to this process when its supervisor dies (Linux; killed with -9, say): a worker then stops as on
    Ctrl-C, its last round checkpointed, instead of dying at its next wait between rounds with the rounds since
    its last checkpoint lost. Call it once the handler is in place, or as a Popen's preexec_fn (the request
    outlives exec). Elsewhere the wait still checks."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):      # no prctl: not Linux
        return
    if prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return
    if os.getppid() != parent_pid:          # it died before the prctl: no signal would come
        os.kill(os.getpid(), sig)


# What a process that uses CUDA takes unless its environment says otherwise, set before its first CUDA call:
# - expandable segments: several processes share the GPU, and they keep each one's cache from fragmenting;
# - cuBLAS's and cuBLASLt's workspaces, one of each per stream it multiplies on (a worker: its own, the sampler's
#   and the update's CUDA graphs'), 4 MiB each instead of torch's 32 MiB on Hopper (pre-Hopper GPUs, the A100
#   included, already take ~4-8 MiB). On an H200 the default swarm's worker peaks at 2.89 GiB by NVML instead of
#   3.07, for 0.179 s a round instead of 0.169 (bench/NOTES.md). Both variables bring torch's workspaces back.
CUDA_ENV_DEFAULTS = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "CUBLAS_WORKSPACE_CONFIG": ":4096:1",
                     "CUBLASLT_WORKSPACE_SIZE": "4096"}


def cuda_env_defaults() -> None:
    """CUDA_ENV_DEFAULTS into this process's environment where it sets none of them itself: the workers, and the
    bench's measurements of what a worker does."""
    for name, value in CUDA_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def start_worker(spec: WorkerSpec) -> None:
    """Process target (spawn) of a worker: workers.worker_process.worker_main."""
    # before torch's import, seconds long: Ctrl-C and a terminal's hang-up are the supervisor's to act on
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from workers.worker_process import worker_main

    try:
        worker_main(spec)
    finally:
        skip_exit_collections()


def start_warmup(cfg: SwarmConfig, model_name: str, device: str, messages: Any) -> None:
    """Process target (spawn) of the warm-up: workers.warmup.warmup_main; `messages` is its multiprocessing queue."""
    from workers.warmup import warmup_main

    try:
        warmup_main(cfg, model_name, device, messages)
    finally:
        skip_exit_collections()


def skip_exit_collections() -> None:
    """Called as a process that loaded torch and transformers ends: the interpreter's last garbage collections
    walk every object those made, about 1 s of a 2-core CPU for memory the process hands back as it exits anyway
    (measured: 1.0 s from the last line to the exit of a process with a worker's imports and model, 0.15 s frozen)."""
    gc.freeze()
