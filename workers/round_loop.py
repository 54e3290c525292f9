"""One SAPO round of one worker: I local questions x G completions, J external groups, one GRPO update.

Read top to bottom, this is the round of the SAPO paper (arXiv:2509.08721, Sec. 3): sample local
questions, generate, score, share, take J groups from the swarm, drop groups with no signal, update.
"""

import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import torch

from configs_env import SwarmConfig
from workers.shared_folder.exchange import Exchange, Outbox
from workers.learning.generation import (Completion, CompletionMismatch, CompletionTooLong, bucketed_width,
                                         encode_completion, encode_prompt, generate_ids, prompts_per_call,
                                         sample_completions)
from workers.learning.grpo import LOGPROB_CHUNK, build_batch, completion_logprobs, group_advantages, grpo_step
from workers.learning.memory import largest_micro_batch
from workers.learning.model import Policy, update_attention
from workers.learning.update_graph import UpdateGraphs, pad_for_graphs
from workers.shared_folder.protocol import RolloutGroup, RoundMetrics, Status
from workers.learning.tasks import GroupScores, Question, QuestionNotRebuilt, TaskMix, build_prompt, score_group

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingGroup:
    """A group ready for the update: token ids of every completion and the locally computed rewards."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    rewards: list[float]


class RaggedGroup(ValueError):
    """A peer's group of another size than this worker's G: GRPO compares a question's G completions."""


def round_seed(cfg: SwarmConfig, index: int, round_: int) -> int:
    """Deterministic per node and round, so a resumed worker draws what it would have drawn."""
    return (cfg.seed * 1_000_003 + index * 10_007 + round_) % (2**31 - 1)


def _has_signal(rewards: list[float]) -> bool:
    return max(rewards) - min(rewards) > 1e-9


def generate_local(policy: Policy, cfg: SwarmConfig, prompts: list[str], seed: int,
                   splits: int = 1) -> list[list[Completion]]:
    """G completions per prompt, in `splits` batches (more after a CUDA out-of-memory restart)."""
    size = prompts_per_call(len(prompts), splits)
    sampled = []
    for start in range(0, len(prompts), size):
        # GPT-2's own sampler (learning/decode.py): on CUDA from CUDA graphs, ~5x the tokens/s of plain generate
        # (bench/RESULTS.md); on the CPU ~1.5x, without generate's per-step machinery
        sampled += sample_completions(policy, prompts[start:start + size], cfg.num_generations, cfg.max_new_tokens,
                                      cfg.temperature, seed + start, fast=True)
    return sampled


def score_local(cfg: SwarmConfig, questions: list[Question], prompts: list[str], sampled: list[list[Completion]],
                ) -> tuple[list[RolloutGroup], list[TrainingGroup], list[GroupScores]]:
    """The groups to share, the same groups as token ids to train on, and their scores for the metrics."""
    shared, training, scores = [], [], []
    for question, prompt, group in zip(questions, prompts, sampled):
        texts = [c.text for c in group]
        score = score_group(question.task, question.entry(), texts, cfg.format_reward)
        shared.append(RolloutGroup(
            task=question.task, dataset_seed=question.dataset_seed, index=question.index, completions=tuple(texts),
            finished=tuple(c.finished for c in group), rewards=score.rewards,
            for_people={"question": question.question, "answer": question.answer, "metadata": question.metadata,
                        "prompt": prompt}, completion_ids=tuple(c.ids for c in group)))
        training.append(TrainingGroup(prompt_ids=list(group[0].prompt_ids),
                                      completion_ids=[list(c.ids) for c in group], rewards=list(score.rewards)))
        scores.append(score)
    return shared, training, scores


def local_rollouts(policy: Policy, cfg: SwarmConfig, questions: list[Question], seed: int,
                   splits: int = 1) -> tuple[list[RolloutGroup], list[TrainingGroup]]:
    """Generate in `splits` batches, then score locally."""
    prompts = [build_prompt(q.question) for q in questions]
    shared, training, _ = score_local(cfg, questions, prompts, generate_local(policy, cfg, prompts, seed, splits))
    return shared, training


def external_candidates(policy: Policy, cfg: SwarmConfig, tasks: TaskMix,
                        peer_groups: dict[str, list[RolloutGroup]], exchange: Exchange,
                        round_: int) -> tuple[list[TrainingGroup], int]:
    """Peers' groups on questions rebuilt here, scored here; groups without signal are dropped.

    A peer's group brings its completions and the name of its question (task, dataset seed, index), nothing
    else that is used: the question, its answer, metadata and prompt are built here, so a peer can neither
    choose the rewards nor hand a scorer anything but its answers.
    """
    kept, available = [], 0
    for node, groups in sorted(peer_groups.items()):
        for number, group in enumerate(groups):
            try:
                question, completion_ids = _rebuild_peer_group(policy, cfg, tasks, group)
            except (QuestionNotRebuilt, RaggedGroup, CompletionTooLong, CompletionMismatch) as exc:
                exchange.reject_group(f"round {round_} rollouts of {node}, group {number}", str(exc))
                continue
            available += 1
            # the same rule as our own groups (FORMAT_REWARD included)
            rewards = list(score_group(question.task, question.entry(), list(group.completions),
                                       cfg.format_reward).rewards)
            if _has_signal(rewards):
                kept.append(TrainingGroup(
                    prompt_ids=encode_prompt(policy, build_prompt(question.question), cfg.max_new_tokens),
                    completion_ids=completion_ids, rewards=rewards))
    return kept, available


def _rebuild_peer_group(policy: Policy, cfg: SwarmConfig, tasks: TaskMix,
                        group: RolloutGroup) -> tuple[Question, list[list[int]]]:
    """A peer group's question, rebuilt, and its completions as our tokens; raises when either cannot be used."""
    question = tasks.rebuild(group.task, group.dataset_seed, group.index)
    if len(group.completions) != cfg.num_generations:
        raise RaggedGroup(f"{len(group.completions)} completions, expected G={cfg.num_generations}")
    sampled = group.completion_ids or (None,) * len(group.completions)
    return question, [encode_completion(policy, text, done, cfg.max_new_tokens, ids)
                      for text, done, ids in zip(group.completions, group.finished, sampled)]


def train_on_groups(policy: Policy, optimizer: torch.optim.Optimizer, cfg: SwarmConfig,
                    groups: list[TrainingGroup], reference: torch.nn.Module | None = None) -> dict[str, float]:
    """One GRPO update on the groups that carry signal and grpo_step's stats; zeros, no step, when none does."""
    if not groups:
        return {"loss": 0.0, "grad_norm": 0.0, "clip_fraction": 0.0}
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
    advantages = group_advantages(rewards, scale=cfg.advantage_scale).flatten().to(policy.device)
    prompts = [g.prompt_ids for g in groups for _ in g.completion_ids]
    completions = [ids for g in groups for ids in g.completion_ids]
    policy.model.train()
    with update_attention(policy.device), torch.autocast("cuda", dtype=torch.bfloat16,
                                                         enabled=policy.device.type == "cuda"):
        stats = _graphed_update(policy, optimizer, cfg, prompts, completions, advantages)
        if stats is None:
            batch = build_batch(prompts, completions, pad_id=policy.tokenizer.eos_token_id, device=policy.device)
            stats = grpo_step(policy.model, optimizer, batch, advantages, beta=cfg.kl_beta, ref_model=reference,
                              num_iterations=cfg.steps_per_round, chunk_size=LOGPROB_CHUNK,
                              micro_batch_size=cfg.train_micro_batch, normalize=cfg.loss_normalization)
    if stats.get("skipped_steps"):
        log.warning("update skipped: its gradient was not finite (loss %s, grad norm %s; %d completions of up to "
                    "%d tokens after prompts of up to %d); the weights are unchanged", stats["loss"],
                    stats["grad_norm"], len(completions), max(map(len, completions)), max(map(len, prompts)))
    return stats


def update_graphs(policy: Policy, cfg: SwarmConfig) -> UpdateGraphs | None:
    """The policy's update graphs where UPDATE_GRAPHS allows them: on CUDA, one step a round, no KL term."""
    if not cfg.graphed_update or policy.device.type != "cuda":
        return None
    if policy.update_graphs is None:
        policy.update_graphs = UpdateGraphs(policy.model, largest_micro_batch(cfg), LOGPROB_CHUNK,
                                            normalize=cfg.loss_normalization)
    return policy.update_graphs


def _graphed_update(policy: Policy, optimizer: torch.optim.Optimizer, cfg: SwarmConfig, prompts: list[list[int]],
                    completions: list[list[int]], advantages: torch.Tensor) -> dict[str, float] | None:
    """The update replayed from CUDA graphs on the batch padded to its bucket; None where no graph serves."""
    graphs = update_graphs(policy, cfg)
    if graphs is None or not any(completions):      # no token to learn from: grpo_step returns without a step
        return None
    eos = policy.tokenizer.eos_token_id
    padded = pad_for_graphs(prompts, completions, advantages, eos, graphs.micro_batch,
                            bucketed_width(policy, max(map(len, prompts)), cfg.max_new_tokens), cfg.max_new_tokens)
    batch = build_batch(padded.prompts, padded.completions, eos, policy.device, padded.prompt_width,
                        padded.completion_width)
    return graphs.step(optimizer, batch, padded.advantages, padded.real_rows)


@dataclass
class Node:
    """What one worker plays its rounds with: its model and optimizer, its questions, its place in the swarm."""

    policy: Policy
    optimizer: torch.optim.Optimizer
    cfg: SwarmConfig
    tasks: TaskMix
    exchange: Exchange
    index: int                                   # its place among this host's workers: seeds its questions
    reference: torch.nn.Module | None = None     # the frozen KL anchor, only when KL_BETA > 0
    splits: int = 1                              # generation batches (more after a CUDA out-of-memory restart)
    outbox: Outbox | None = None                 # the worker's writes the folder refused, tried again in order


def rehearse_largest_round(node: Node) -> int:
    """On CUDA, generate and back-propagate the largest round the settings allow once, before round 1.

    Every completion MAX_NEW_TOKENS long, prompts as long as the longest of a sample of the worker's tasks,
    gradients dropped and no optimizer step (its moments are only allocated). The worker then holds at
    its start what its worst round will need, so round 10's memory is round 2000's and a GPU that is too
    full fails now, not hours in. Returns the rehearsed prompt width (0 on CPU, where nothing is done).
    """
    policy, optimizer, cfg, tasks, splits = node.policy, node.optimizer, node.cfg, node.tasks, node.splits
    if policy.device.type != "cuda":
        return 0
    eos, device = policy.tokenizer.eos_token_id, policy.device
    longest = max(len(encode_prompt(policy, build_prompt(q.question), cfg.max_new_tokens))
                  for q in tasks.sample(32, random.Random(0)))
    width = bucketed_width(policy, longest, cfg.max_new_tokens)                 # as sample_completions pads
    if cfg.num_train_samples:                                                     # a joiner may sample none
        rows = prompts_per_call(cfg.num_train_samples, splits) * cfg.num_generations
        with torch.random.fork_rng(devices=[device]):
            ids = torch.full((rows, width), eos, device=device)
            generate_ids(policy, ids, torch.ones_like(ids), cfg.max_new_tokens, cfg.temperature, greedy=False,
                         fast=True, min_new_tokens=cfg.max_new_tokens)
        release_cached_memory(device)
    train_rows = largest_micro_batch(cfg)
    policy.model.train()
    with update_attention(device):
        graphs = update_graphs(policy, cfg)
        if graphs is not None:          # its capture for this shape is the rehearsal (and sizes its memory)
            batch = build_batch([[eos] * longest] * train_rows, [[eos] * cfg.max_new_tokens] * train_rows, eos,
                                device, prompt_width=width)
            graphs.prepare(batch, train_rows)
        else:
            batch = build_batch([[eos] * longest] * train_rows, [[eos] * cfg.max_new_tokens] * train_rows, eos, device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logp = completion_logprobs(policy.model, batch, LOGPROB_CHUNK)
            (logp.sum() * 0).backward()
    if hasattr(optimizer, "allocate_state"):
        optimizer.allocate_state()
    optimizer.zero_grad(set_to_none=True)
    release_cached_memory(device)
    return width


def play_round(node: Node, round_: int, stop: threading.Event, expected_peers: Callable[[], set[str]],
               set_stage: Callable[[str], None]) -> RoundMetrics | None:
    """One round; None when a stop was requested before the update (nothing half-done is recorded)."""
    cfg, policy = node.cfg, node.policy
    started = time.monotonic()
    seed = round_seed(cfg, node.index, round_)
    questions = node.tasks.sample(cfg.num_train_samples, random.Random(seed))

    set_stage(Status.GENERATING)
    prompts = [build_prompt(q.question) for q in questions]
    sampled = generate_local(policy, cfg, prompts, seed, node.splits)
    if cfg.decode_cache == "release" and policy.decoder is not None:
        policy.decoder.release()        # the update may use the cache's memory; the next round captures again
    release_cached_memory(policy.device)
    generated = time.monotonic()
    shared, local, scores = score_local(cfg, questions, prompts, sampled)
    scored = time.monotonic()
    publish(node, round_, shared)
    if stop.is_set():
        return None

    chosen, candidates, available = [], [], 0
    if cfg.num_transplant_trees > 0:
        set_stage(Status.FETCHING)
        found = node.exchange.wait_for_peers(round_, expected_peers() - {node.exchange.node},
                                             cfg.rollout_fetch_timeout, stop)
        candidates, available = external_candidates(policy, cfg, node.tasks, found, node.exchange, round_)
        chosen = random.Random(seed + 1).sample(candidates, min(cfg.num_transplant_trees, len(candidates)))
    fetched = time.monotonic()
    if stop.is_set():
        return None

    set_stage(Status.TRAINING)
    with_signal = [g for g in local if _has_signal(g.rewards)]
    stats = train_on_groups(policy, node.optimizer, cfg, with_signal + chosen, node.reference)
    release_cached_memory(policy.device)
    trained = time.monotonic()
    timings = {"generate_s": generated - started, "score_s": scored - generated, "fetch_s": fetched - scored,
               "train_s": trained - fetched, "round_s": trained - started}
    return round_metrics(node, round_, questions, local, scores, stats, timings,
                         ExternalCounts(len(chosen), available, available - len(candidates)))


def publish(node: Node, round_: int, shared: list[RolloutGroup]) -> None:
    """Our groups to the folder; a folder that is down costs the peers this round, not our update."""
    if not shared:
        return
    parts = list(enumerate([[group] for group in shared])) if node.cfg.rollout_publish_frequency == "generation" \
        else [(None, shared)]
    for part, groups in parts:
        try:
            node.exchange.publish_rollouts(round_, groups, part=part)
        except OSError as exc:
            log.warning("round %d: rollouts not published (%s); training on local rollouts only", round_, exc)
            if node.outbox is not None:     # written late, for the record (peers have moved on by then)
                node.outbox.keep(f"publishing round {round_}'s rollouts",
                                 partial(node.exchange.publish_rollouts, round_, groups, part=part))


class ExternalCounts(NamedTuple):
    chosen: int            # peers' groups trained on (at most J)
    available: int         # peers' groups that could be used
    without_signal: int    # of those, dropped for equal rewards


def round_metrics(node: Node, round_: int, questions: list[Question], local: list[TrainingGroup],
                  scores: list[GroupScores], stats: dict[str, float], timings: dict[str, float],
                  external: ExternalCounts) -> RoundMetrics:
    """The round's line of metrics: this node's own completions; peers' groups count only in external_*."""
    with_signal = sum(_has_signal(g.rewards) for g in local)
    rewards = [r for g in local for r in g.rewards]
    n = max(1, len(rewards))
    mean = sum(rewards) / n
    lengths = [len(ids) for g in local for ids in g.completion_ids]
    device = node.policy.device
    return RoundMetrics(
        node=node.exchange.node, round=round_,
        reward_mean=mean, reward_std=(sum((r - mean) ** 2 for r in rewards) / n) ** 0.5,
        reward_max=max(rewards, default=0.0),
        # exact match is the scorer's 1.0, not the reward: FORMAT_REWARD lifts rewards, never accuracy
        accuracy=sum(c >= 1.0 for s in scores for c in s.correctness) / n,
        format_rate=sum(f for s in scores for f in s.well_formed) / n,
        loss=_finite(stats["loss"]), grad_norm=_finite(stats["grad_norm"]),
        clip_fraction=_finite(stats["clip_fraction"]), kl=_finite(stats.get("kl")),
        skipped_steps=int(stats.get("skipped_steps", 0)),
        learning_rate=float(node.optimizer.param_groups[0]["lr"]),
        local_groups=len(local), external_groups=external.chosen, external_available=external.available,
        zero_advantage_groups=len(local) - with_signal, external_zero_advantage_groups=external.without_signal,
        completions=len(rewards),
        mean_completion_tokens=sum(lengths) / max(1, len(lengths)), max_completion_tokens=max(lengths, default=0),
        gpu_peak_mib=torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None,
        task_rewards=task_means(questions, local), **timings)


def _finite(value: float | None) -> float | None:
    """A statistic of the update as JSON can hold it: None for a NaN or inf (never a crash when recorded)."""
    return value if value is not None and math.isfinite(value) else None


def task_means(questions: list[Question], groups: list[TrainingGroup]) -> dict[str, float]:
    """Mean reward of the round's own completions, per task."""
    sums: dict[str, list[float]] = {}
    for question, group in zip(questions, groups):
        sums.setdefault(question.task, []).extend(group.rewards)
    return {task: sum(rewards) / len(rewards) for task, rewards in sorted(sums.items()) if rewards}


def release_cached_memory(device: torch.device) -> None:
    """Hand the allocator's cached blocks back between generation and the update.

    Generation and training allocate differently shaped blocks; kept cached, one phase's blocks sit
    beside the other's and NVML counts both (a worker measured 2.7 GiB in its first round, 3.0 from
    its second on). Sixteen workers share one GPU, so a freed block is worth the few ms it costs.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
