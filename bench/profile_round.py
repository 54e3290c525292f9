"""A torch-profiler summary of one worker's round on the GPU: generation of I x G completions, then the update."""

import random
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.workload import MODEL
from configs_env import SwarmConfig
from workers.learning.model import enable_activation_checkpointing, load_policy, use_activation_checkpointing
from workers.learning.optim import make_optimizer
from workers.round_loop import TrainingGroup, local_rollouts, train_on_groups
from workers.learning.tasks import TaskMix


def profile_round(cache: Path, rows: int = 15) -> str:
    cfg = SwarmConfig.from_env({})          # the default preset: I=2, J=2, G=4, 256 new tokens
    policy = load_policy(MODEL, "cuda:0", cache)
    optimizer = make_optimizer(policy.model, 1e-5)
    if use_activation_checkpointing(cfg.gradient_checkpointing, policy.device):
        enable_activation_checkpointing(policy.model)
    tasks = TaskMix(cfg.tasks, seed=0)

    def one_round(seed: int) -> None:
        questions = tasks.sample(cfg.num_train_samples + cfg.num_transplant_trees, random.Random(seed))
        _, groups = local_rollouts(policy, cfg, questions, seed)
        # a random-init model scores 0 everywhere; alternate rewards so the update runs as in a real round
        groups = [TrainingGroup(g.prompt_ids, g.completion_ids, [float(i % 2) for i in range(len(g.rewards))])
                  for g in groups]
        train_on_groups(policy, optimizer, cfg, groups)
        torch.cuda.synchronize()

    one_round(0)                            # warm-up: allocator, kernels, static cache
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one_round(1)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
